"""Streaming corpus files as seqio sources: exact positions, bounded memory, clear bad data.

  source = FileSource({"train": "gs://bucket/c4/en/c4-train.*.json.gz"}, fields=("text",))
  ds = source.get_dataset("train", shuffle=True, seed=3, shard_info=seqio.ShardInfo(1, 16))

The format follows the file name: `.json` / `.jsonl` (one JSON object a line,
optionally `.gz`), `.txt` (one example a line, optionally `.gz`), `.parquet`
(pyarrow, one row group at a time) and `.tfrecord` (tf.train.Example, read
by TensorFlow itself). Paths are local, `gs://` or anything `etils.epath`
opens (`hf://datasets/...` with `huggingface_hub` installed).

Positions. Every file is read in chunks of at most `CHUNK_RECORDS` records
by a Python reader driven by a `tf.data` scan whose state is the exact place
of the next chunk: (byte offset of the uncompressed stream, line number) for
text formats, (row, row) for parquet. That state, the file being read and
the records of the current chunk not yet used are tf.data iterator state, so
`pipeline.DatasetIterator.save` writes them into the checkpoint step with the
rest of the pipeline (shuffle buffer, packing, noise), and a restored run
continues at exactly the next record. A reader keeps its open stream
between chunks; a restore reopens the file and seeks (for gzip that
decompresses up to the offset, once).

Shards. All shards share one file order (sorted paths): with at least as
many files as shards, file i belongs to shard i % num_shards; with fewer,
every shard reads every file and keeps the records whose line (row) number
is its own modulo num_shards. Shards are therefore disjoint and cover the
split whatever their seeds; a shard's seed only orders its own files.

Bad data (a line that is not JSON, a record without the field, a truncated
gzip, a parquet file without the column) raises `BadRecordError`, one line
`path:record: what is wrong. What to do.`; with `skip_bad_records` the record
(or the rest of a truncated file) is skipped and counted in
`skipped_records()`.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import threading
import zlib
from typing import IO, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf
from etils import epath

# Records per chunk handed from Python to tf.data (a C4 document is ~2 KB).
CHUNK_RECORDS = 256
# Open streams a source keeps between chunks (one per file being read).
_MAX_OPEN_STREAMS = 16

FORMATS = ("json", "text", "parquet", "tfrecord")
_FORMAT_OF_SUFFIX = (((".json", ".jsonl", ".json.gz", ".jsonl.gz"), "json"),
                     ((".txt", ".txt.gz", ".text", ".text.gz"), "text"),
                     ((".parquet",), "parquet"))
_REMOTE_SCHEMES = ("hf://", "s3://", "az://")

# What a bad record's error looks like once it crossed tf.data (the marker
# survives TensorFlow's wrapping of a py_function's exception).
_BAD_RECORD_MARK = "BadRecordError: "


class BadRecordError(ValueError):
  """A corpus record (or file) that cannot be read: `path:record: what. What to do.`"""


_skipped = 0
_skipped_lock = threading.Lock()


def skipped_records() -> int:
  """Bad records this process's sources skipped so far (with `skip_bad_records`)."""
  return _skipped


def file_format(path: str) -> str:
  """The format a corpus file's name says: "json", "text", "parquet" or "tfrecord"."""
  name = path.rsplit("/", 1)[-1].lower()
  for suffixes, fmt in _FORMAT_OF_SUFFIX:
    if name.endswith(suffixes):
      return fmt
  if ".tfrecord" in name:  # also TFDS-style names: x.tfrecord-00000-of-01024
    return "tfrecord"
  raise ValueError(
      f"Cannot tell the format of {path} from its name: name corpus files *.json, *.jsonl, "
      "*.txt (each optionally .gz), *.parquet or *.tfrecord.")


_format_of = file_format  # for functions whose argument shadows the name


def list_files(patterns: Union[str, Sequence[str]]) -> list[str]:
  """The sorted files matching glob `patterns` (local, gs://, or an fsspec filesystem)."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = set()
  for pattern in patterns:
    if pattern.startswith(_REMOTE_SCHEMES):
      import fsspec  # pylint: disable=import-outside-toplevel
      scheme = pattern.split("://", 1)[0]
      files.update(f"{scheme}://{p}" for p in fsspec.filesystem(scheme).glob(pattern))
    else:
      files.update(tf.io.gfile.glob(pattern))
  return sorted(files)


def _bad(path: str, record, what: str, fix: str) -> BadRecordError:
  where = f"{path}:{record}" if record is not None else path
  return BadRecordError(f"{where}: {what}. {fix}")


# ----------------------------------------------------------------------------
# Python readers: one chunk of records from a known position.


def _open_binary(path: str) -> IO[bytes]:
  """`path` opened for reading bytes, whichever epath backend serves it.

  etils' TensorFlow backend (the one `gs://` gets) returns a context manager
  rather than a file, so the file is taken from `GFile` directly there.
  """
  if "://" not in path:
    return open(path, "rb")  # pylint: disable=consider-using-with
  if path.startswith(_REMOTE_SCHEMES):
    return epath.Path(path).open("rb")
  return tf.io.gfile.GFile(path, "rb")


class _TextStream:
  """A line reader over a (gzip) text file, positioned at an uncompressed byte offset."""

  def __init__(self, path: str, offset: int):
    self.path = path
    self._raw = _open_binary(path)
    self._file = gzip.GzipFile(fileobj=self._raw, mode="rb") if path.endswith(".gz") else self._raw
    if offset:
      self._file.seek(offset)  # gzip: decompresses up to it, once per restore
    self.offset = offset

  def readline(self) -> bytes:
    line = self._file.readline()
    self.offset += len(line)
    return line

  def close(self) -> None:
    self._file.close()
    self._raw.close()


class _ParquetStream:
  """Rows of one column set of a parquet file, one row group in memory at a time."""

  def __init__(self, path: str, columns: Sequence[str]):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    self.path = path
    self._raw = _open_binary(path)
    self._file = pq.ParquetFile(self._raw)
    names = self._file.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
      raise _bad(path, None, f"has no column {missing[0]!r} (its columns: {', '.join(names)})",
                 "Name the column that holds the text (--text_field)")
    self._columns = list(columns)
    meta = self._file.metadata
    self._starts = np.cumsum([0] + [meta.row_group(i).num_rows
                                    for i in range(meta.num_row_groups)])
    self._group, self._rows = -1, None

  @property
  def num_rows(self) -> int:
    return int(self._starts[-1])

  def rows(self, start: int, stop: int) -> dict[str, list]:
    """Columns of rows [start, stop), all inside the row group holding `start`."""
    group = int(np.searchsorted(self._starts, start, side="right")) - 1
    if group != self._group:
      table = self._file.read_row_group(group, columns=self._columns)
      self._group, self._rows = group, {c: table.column(c).to_pylist() for c in self._columns}
    lo = start - int(self._starts[group])
    hi = min(stop, int(self._starts[group + 1])) - int(self._starts[group])
    return {c: v[lo:hi] for c, v in self._rows.items()}

  def close(self) -> None:
    self._raw.close()


class ChunkReader:
  """Reads the records of one shard of a split's files, chunk by chunk.

  `read(file_index, offset, record)` returns the next chunk of that file from
  that position and the position after it; the output depends only on those
  arguments (open streams are kept to avoid re-reading, never to decide what
  comes next), which is what makes the tf.data state an exact position.
  """

  def __init__(self, files: Sequence[str], fmt: str, features: Mapping[str, tf.DType], *,
               stride: int = 1, phase: int = 0, skip_bad_records: bool = False,
               chunk_records: int = CHUNK_RECORDS):
    self.files = list(files)
    self.format = fmt
    self.features = dict(features)
    self.stride, self.phase = stride, phase
    self.skip_bad_records = skip_bad_records
    self.chunk_records = chunk_records
    self._streams: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def _stream(self, file_index: int, offset: int):
    stream = self._streams.pop((file_index, offset), None)
    if stream is None:
      path = self.files[file_index]
      stream = (_ParquetStream(path, list(self.features)) if self.format == "parquet"
                else _TextStream(path, offset))
    return stream

  def _keep(self, file_index: int, offset: int, stream) -> None:
    self._streams[(file_index, offset)] = stream
    while len(self._streams) > _MAX_OPEN_STREAMS:
      self._streams.popitem(last=False)[1].close()

  def _skip_or_raise(self, error: BadRecordError) -> None:
    if not self.skip_bad_records:
      raise error
    global _skipped
    with _skipped_lock:
      _skipped += 1

  def _parse_json(self, path: str, number: int, line: bytes) -> Optional[tuple]:
    try:
      record = json.loads(line)
    except ValueError as e:  # also UnicodeDecodeError
      self._skip_or_raise(_bad(path, number, f"is not valid JSON ({e})",
                               "Fix or remove the line, or set TrainConfig.skip_bad_records"))
      return None
    fields = record if isinstance(record, dict) else {}
    missing = [f for f in self.features if not isinstance(fields.get(f), str)]
    if missing:
      missing = missing[0]
      self._skip_or_raise(_bad(path, number, f"has no string field {missing!r}",
                               "Name the text field with --text_field, or set "
                               "TrainConfig.skip_bad_records"))
      return None
    return tuple(record[f] for f in self.features)

  def _read_lines(self, file_index: int, offset: int, record: int):
    path = self.files[file_index]
    stream = self._stream(file_index, offset)
    rows, ended = [], False
    try:
      while len(rows) < self.chunk_records:
        line = stream.readline()
        if not line:
          ended = True
          break
        record += 1
        if (record - 1) % self.stride != self.phase or not line.strip():
          continue
        if self.format == "json":
          values = self._parse_json(path, record, line)
        else:
          try:
            values = (line.rstrip(b"\r\n").decode("utf-8"),)
          except UnicodeDecodeError as e:
            self._skip_or_raise(_bad(path, record, f"is not UTF-8 ({e})",
                                     "Re-encode the file as UTF-8"))
            values = None
        if values is not None:
          rows.append(values)
    except (EOFError, OSError, gzip.BadGzipFile, zlib.error) as e:
      stream.close()
      self._skip_or_raise(_bad(path, record + 1, f"cannot be read ({e}: a truncated or "
                               "corrupt file)", "Copy the file again, or remove it from the "
                               "pattern"))
      return rows, stream.offset, record, True
    if ended:
      stream.close()
    else:
      self._keep(file_index, stream.offset, stream)
    return rows, stream.offset, record, ended

  def _read_rows(self, file_index: int, offset: int, record: int):
    del offset  # parquet positions are rows
    stream = self._stream(file_index, record)
    rows = []
    while len(rows) < self.chunk_records and record < stream.num_rows:
      columns = stream.rows(record, record + self.chunk_records * self.stride)
      count = len(next(iter(columns.values())))
      for i in range(count):
        if (record + i) % self.stride != self.phase:
          continue
        values = tuple(columns[c][i] for c in self.features)
        if any(v is None for v in values):
          self._skip_or_raise(_bad(stream.path, f"row {record + i}", "has a null field",
                                   "Fix the row, or set TrainConfig.skip_bad_records"))
          continue
        rows.append(values)
      record += count
    ended = record >= stream.num_rows
    if ended:
      stream.close()
    else:
      self._keep(file_index, record, stream)
    return rows, record, record, ended

  def read(self, file_index: int, offset: int, record: int):
    """(columns as numpy arrays, next offset, next record, whether the file ended)."""
    with self._lock:  # tf.data may call from several threads; a reader is sequential
      if self.format == "parquet":
        rows, offset, record, ended = self._read_rows(file_index, offset, record)
      else:
        rows, offset, record, ended = self._read_lines(file_index, offset, record)
    columns = []
    for i, (name, dtype) in enumerate(self.features.items()):
      values = [r[i] for r in rows]
      if dtype == tf.string:
        columns.append(np.array([v.encode("utf-8") if isinstance(v, str) else v
                                 for v in values], dtype=object).reshape(len(rows)))
      else:
        columns.append(np.array(values, dtype=dtype.as_numpy_dtype).reshape(len(rows)))
    return columns, offset, record, ended


def _file_dataset(reader: ChunkReader, file_index: tf.Tensor) -> tf.data.Dataset:
  """One file's records, {name: scalar}, through a scan whose state is the position."""
  names, dtypes = list(reader.features), list(reader.features.values())

  def step(state, _):
    offset, record, done = state

    @tf.autograph.experimental.do_not_convert
    def read(file_index, offset, record, done):
      if done:
        return [np.zeros([0], d.as_numpy_dtype if d != tf.string else object)
                for d in dtypes] + [offset, record, np.bool_(True)]
      columns, offset, record, ended = reader.read(int(file_index), int(offset), int(record))
      return columns + [np.int64(offset), np.int64(record), np.bool_(ended)]

    out = tf.numpy_function(read, [file_index, offset, record, done],
                            dtypes + [tf.int64, tf.int64, tf.bool], stateful=True)
    columns = [tf.ensure_shape(c, [None]) for c in out[:len(names)]]
    offset, record, ended = (tf.ensure_shape(t, []) for t in out[len(names):])
    # `done` in the output marks a chunk read after the end: none follows.
    return (offset, record, ended), (dict(zip(names, columns)), done)

  start = (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.constant(False))
  chunks = tf.data.Dataset.from_tensors(0).repeat().scan(start, step)
  chunks = chunks.take_while(lambda columns, done: tf.logical_not(done))
  return chunks.map(lambda columns, done: columns).unbatch()


def _ignore_python_state(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Lets tf.data save iterators through the readers' Python calls: their results
  depend only on the positions tf.data saves (see `ChunkReader`)."""
  options = tf.data.Options()
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return ds.with_options(options)


def shard_files(num_files: int, shard_info: Optional[seqio.ShardInfo]
                ) -> tuple[list[int], int, int]:
  """(file indices, record stride, record phase) of one shard; see the module doc."""
  if shard_info is None or shard_info.num_shards == 1:
    return list(range(num_files)), 1, 0
  if num_files >= shard_info.num_shards:
    return list(range(shard_info.index, num_files, shard_info.num_shards)), 1, 0
  return list(range(num_files)), shard_info.num_shards, shard_info.index


class FileSource(seqio.DataSource):
  """A seqio source over corpus files of any format `file_format` knows (see module doc).

  Examples are {field: tf.string []} for `fields` (and other dtypes for the
  columns named in `dtypes`, parquet only).
  """

  def __init__(self, split_to_filepattern: Mapping[str, Union[str, Sequence[str]]],
               fields: Sequence[str] = ("text",), *,
               dtypes: Optional[Mapping[str, tf.DType]] = None,
               file_format: Optional[str] = None, skip_bad_records: bool = False,
               chunk_records: int = CHUNK_RECORDS):
    if file_format not in (None, *FORMATS):
      raise ValueError(f"file_format must be one of {FORMATS} (or None: from the file "
                       f"names), got {file_format!r}.")
    self._format = file_format
    self._patterns = dict(split_to_filepattern)
    self._features = {f: (dtypes or {}).get(f, tf.string) for f in fields}
    self._skip = skip_bad_records
    self._chunk_records = chunk_records
    self._files: dict[str, list[str]] = {}
    super().__init__(splits=self._patterns.keys())

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # shards by files, or by records when files are fewer than shards

  @property
  def output_features(self) -> dict[str, tf.DType]:
    return dict(self._features)

  def list_shards(self, split: str) -> Sequence[str]:
    if split not in self._files:
      files = list_files(self._patterns[split])
      if not files:
        raise FileNotFoundError(f"Split {split!r}: no file matches {self._patterns[split]!r}.")
      formats = {self._format or file_format(f) for f in files}
      if len(formats) > 1:
        raise ValueError(f"Split {split!r} mixes formats {sorted(formats)}; give one format "
                         "per pattern.")
      self._files[split] = files
    return self._files[split]

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None,
                  **unused_kwargs) -> tf.data.Dataset:
    """This shard's examples of `split`, its files in an order its `seed` draws."""
    files = list(self.list_shards(split))
    fmt = self._format or file_format(files[0])
    indices, stride, phase = shard_files(len(files), shard_info)
    if fmt == "tfrecord":
      return self._tfrecords([files[i] for i in indices], stride, phase, shuffle, seed)
    reader = ChunkReader(files, fmt, self._features, stride=stride, phase=phase,
                         skip_bad_records=self._skip, chunk_records=self._chunk_records)
    order = tf.data.Dataset.from_tensor_slices(np.array(indices, np.int64))
    if shuffle:
      order = order.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    return _ignore_python_state(order.flat_map(lambda i: _file_dataset(reader, i)))

  def _tfrecords(self, files, stride, phase, shuffle, seed) -> tf.data.Dataset:
    spec = {f: tf.io.FixedLenFeature([], d) for f, d in self._features.items()}
    order = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
      order = order.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    records = order.flat_map(tf.data.TFRecordDataset)
    if stride > 1:
      records = records.shard(stride, phase)
    return records.map(lambda r: tf.io.parse_single_example(r, spec))

  def num_input_examples(self, split: str) -> Optional[int]:
    return None  # unknown without reading the corpus (and never cached in memory)


def check_files(split_to_filepattern: Mapping[str, Union[str, Sequence[str]]],
                fields: Sequence[str] = ("text",), *, file_format: Optional[str] = None,
                files_to_check: int = 3, records_to_check: int = 8) -> dict[str, list[str]]:
  """The start-up check: every pattern matches, and the first records of a few files
  read (never the corpus). Returns split -> files.

  Raises:
    FileNotFoundError: a pattern matches no file.
    ValueError / BadRecordError: an unknown format, or a first record that is bad.
  """
  matched = {}
  for split, patterns in split_to_filepattern.items():
    source = FileSource({split: patterns}, fields, file_format=file_format)
    files = list(source.list_shards(split))
    fmt = file_format or _format_of(files[0])
    for path in files[:files_to_check]:
      if not path.startswith(_REMOTE_SCHEMES) and tf.io.gfile.stat(path).length == 0:
        raise ValueError(f"{path} is empty; a corpus file needs at least one non-blank "
                         "example. Remove it from the pattern or fill it.")
    if fmt != "tfrecord":
      reader = ChunkReader(files, fmt, {f: tf.string for f in fields},
                           chunk_records=records_to_check)
      for index in range(min(files_to_check, len(files))):
        columns, *_ = reader.read(index, 0, 0)
        if not any(v.strip() for v in columns[0]):
          raise ValueError(f"{files[index]} has no non-blank text in its first "
                           f"{records_to_check} records; a corpus file needs examples. Remove "
                           "it from the pattern, or name the text field (--text_field).")
    matched[split] = files
  return matched


def bad_record_message(error: tf.errors.OpError) -> Optional[str]:
  """The one-line message of a `BadRecordError` raised inside tf.data, else None."""
  match = re.search(re.escape(_BAD_RECORD_MARK) + r"(.*)", error.message)
  return match.group(1).strip() if match else None
