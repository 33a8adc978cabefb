"""A Google Cloud Storage bucket on this machine, for tests of gs:// paths (no network).

The store is gcp-storage-emulator (a Python emulator of the GCS JSON API). Every
client the library uses reaches it as it would reach GCS:

- TensorFlow's GCS filesystem (tf.io.gfile, and etils.epath, which uses it for
  gs://; seqio, TFDS and JAX's compilation cache go through these) has its
  endpoints built in (https://www.googleapis.com, https://storage.googleapis.com).
  It honours HTTPS_PROXY and CURL_CA_BUNDLE, so `FakeGcs` is that proxy: it answers
  CONNECT, speaks TLS with a certificate for those hosts from a test CA (trustme),
  and hands the requests to the emulator.
- tensorstore (orbax's arrays) takes its endpoint from TENSORSTORE_GCS_HTTP_URL.
- google-cloud-storage (orbax asks it whether a bucket has hierarchical
  namespaces) takes it from STORAGE_EMULATOR_HOST, and then needs no credentials.
- TensorFlow and tensorstore accept the bearer token in
  GOOGLE_AUTH_TOKEN_FOR_TESTING (no credentials).

The proxy also smooths two differences between curl's requests and the emulator's
reading of them, so that what reaches the store is what GCS would store: a body
sent chunked (TensorFlow's resumable uploads declare a Content-Length as well;
HTTP says chunked wins, the emulator reads the declared length of raw chunk
framing) is de-chunked, and `Expect: 100-continue` is answered at once (the
emulator speaks HTTP/1.0 and never answers it, so curl would wait a second per
upload). Requests reach the emulator one at a time (it serves one at a time).

Use `FakeGcs.env` as the environment of a subprocess: it leaves this process's
environment, and so every other test, alone.
"""

import http.client
import json
import os
import pathlib
import socket
import ssl
import threading
import urllib.parse

import trustme
from gcp_storage_emulator import server as emulator

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_read_data = emulator._read_data  # pylint: disable=protected-access


def _read_data_of_empty_uploads(handler, query):
  """The emulator reads an empty body as None and then fails to store an empty
  object (TensorFlow makes one per directory, "dir/"): store it empty."""
  data = _read_data(handler, query)
  if data is None and query.get("uploadType") == ["media"]:
    return b""
  return data


emulator._read_data = _read_data_of_empty_uploads  # pylint: disable=protected-access
# The emulator writes an answer's head and body separately: with Nagle's algorithm the
# body waits for the client's delayed ACK (40 ms a request).
emulator.RequestHandler.disable_nagle_algorithm = True


class FakeGcs:
  """An emulated GCS with `bucket` created, reachable through `env`.

  Args:
    bucket: the bucket to create.
    directory: where the CA certificate is written.
  """

  def __init__(self, bucket: str, directory: pathlib.Path):
    self.bucket = bucket
    ca = trustme.CA()
    self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*GCS_HOSTS).configure_cert(self._tls)
    ca_file = directory / "fake_gcs_ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    self._store = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
    self._store.start()
    self._store_port = self._store._api._httpd.server_address[1]  # pylint: disable=protected-access
    self._one_at_a_time = threading.Lock()
    self.requests = []  # (request line, bytes answered) of each request, for diagnoses
    self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    self.port = self._listener.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    threading.Thread(target=self._accept, daemon=True).start()
    self.env = {
        "HTTPS_PROXY": self.url, "https_proxy": self.url, "CURL_CA_BUNDLE": str(ca_file),
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "STORAGE_EMULATOR_HOST": self.url, "NO_GCE_CHECK": "true",
        # TensorFlow retries as with GCS, a few times and quickly (by default it
        # retries for minutes before it reports an error).
        "GCS_RETRY_CONFIG_MAX_RETRIES": "4", "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "1000000",
    }

  def close(self):
    self._listener.close()
    self._store.stop()

  # -- Files in and out, through the JSON API as any client would.

  def upload_tree(self, local: pathlib.Path, prefix: str) -> None:
    """Copies the files under `local` to gs://bucket/prefix/..."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
      name = f"{prefix}/{path.relative_to(local).as_posix()}"
      self._call("POST", f"/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
                 + urllib.parse.quote(name, safe=""), path.read_bytes())

  def names(self, prefix: str = "") -> list[str]:
    """The object names under gs://bucket/prefix."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
      page = json.loads(self._call("GET", f"/storage/v1/b/{self.bucket}/o?{query}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def download_tree(self, prefix: str, local: pathlib.Path) -> pathlib.Path:
    """Copies gs://bucket/prefix/... to `local` (directory placeholders skipped)."""
    for name in self.names(prefix.rstrip("/") + "/"):
      if name.endswith("/"):
        continue
      target = local / name[len(prefix.rstrip("/")) + 1:]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(self._call(
          "GET", f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"))
    return local

  def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
    connection.request(method, path, body=body)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.status >= 300:
      raise OSError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
    return data

  # -- The proxy.

  def _accept(self):
    while True:
      try:
        client, _ = self._listener.accept()
      except OSError:  # closed
        return
      client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      threading.Thread(target=self._serve, args=(client,), daemon=True).start()

  def _serve(self, client: socket.socket):
    try:
      stream = client.makefile("rb")
      request_line, headers = _read_head(stream)
      if request_line.startswith(b"CONNECT "):
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        client = self._tls.wrap_socket(client, server_side=True)
        stream = client.makefile("rb")
        request_line, headers = _read_head(stream)
      self._forward(client, stream, request_line, headers)
    except (OSError, ssl.SSLError, ValueError):
      pass  # the client went away; it retries or reports it
    finally:
      client.close()

  def _forward(self, client, stream, request_line: bytes, headers: list[tuple[bytes, bytes]]):
    """Sends one request on to the emulator and its answer back (then the connection
    closes, as the emulator's HTTP/1.0 answers say)."""
    fields = {k.lower(): v for k, v in headers}
    if fields.get(b"expect", b"").lower() == b"100-continue":
      client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
      body = _read_chunked(stream)
    else:
      body = stream.read(int(fields.get(b"content-length", b"0")))
    # The emulator writes its Host into upload URLs: make them come back here.
    dropped = (b"host", b"expect", b"transfer-encoding", b"content-length", b"connection")
    head = [request_line, b"Host: 127.0.0.1:%d" % self.port,
            b"Content-Length: %d" % len(body), b"Connection: close"]
    head += [k + b": " + v for k, v in headers if k.lower() not in dropped]
    request = b"\r\n".join(head) + b"\r\n\r\n" + body
    with self._one_at_a_time:
      answer = self._media_read(request_line, request) or self._ask_store(request)
    client.sendall(answer)
    self.requests.append((request_line.decode(errors="replace"), len(answer)))

  def _ask_store(self, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", self._store_port)) as store:
      store.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      store.sendall(request)
      answer = []
      while data := store.recv(1 << 16):
        answer.append(data)
    return b"".join(answer)

  def _media_read(self, request_line: bytes, request: bytes) -> bytes | None:
    """GCS's answer to a conditional JSON-API media read (tensorstore's), which the
    emulator ignores: 304 / 412 when the generation says so. Otherwise None, and the
    read goes to the emulator with the generation headers GCS adds (the emulator
    leaves them out; tensorstore then fails "Malformed StorageGeneration")."""
    method, target = request_line.split(b" ")[:2]
    url = urllib.parse.urlsplit(target.decode())
    query = urllib.parse.parse_qs(url.query)
    if method != b"GET" or query.get("alt") != ["media"] or not url.path.startswith(
        "/storage/v1/b/"):
      return None
    meta = self._ask_store(f"GET {url.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Connection: close\r\n\r\n".encode())
    if not meta.startswith(b"HTTP/1.0 200") and not meta.startswith(b"HTTP/1.1 200"):
      return None  # the emulator's own 404
    resource = json.loads(meta.split(b"\r\n\r\n", 1)[1])
    generation = resource["generation"]
    if query.get("ifGenerationNotMatch") == [generation]:
      return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    if query.get("ifGenerationMatch", [generation]) != [generation]:
      return b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    status, rest = self._ask_store(request).split(b"\r\n", 1)
    return (status + b"\r\nx-goog-generation: " + generation.encode()
            + b"\r\nx-goog-metageneration: " + resource["metageneration"].encode()
            + b"\r\n" + rest)


def _read_head(stream) -> tuple[bytes, list[tuple[bytes, bytes]]]:
  request_line = stream.readline().rstrip(b"\r\n")
  if not request_line:
    raise ValueError("no request")
  headers = []
  while (line := stream.readline().rstrip(b"\r\n")):
    key, _, value = line.partition(b":")
    headers.append((key.strip(), value.strip()))
  return request_line, headers


def _read_chunked(stream) -> bytes:
  body = b""
  while (size := int(stream.readline().split(b";")[0].strip() or b"0", 16)):
    body += stream.read(size)
    stream.readline()
  while stream.readline().rstrip(b"\r\n"):  # trailers
    pass
  return body
