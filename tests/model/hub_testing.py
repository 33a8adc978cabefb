"""A local stand-in for the Hugging Face Hub client (`huggingface_hub.HfApi`).

It implements the two calls the loader makes with huggingface_hub's own
signatures, return values and errors, over a local tree
`<root>/<repo_id>/<revision>/<files>` (revision "main" by default; a
pull-request ref such as "refs/pr/2" is a nested directory), and records
every file it hands out, so tests see what a download fetched. Tests install
it in place of `huggingface_hub.HfApi` (no network is touched).
"""

from __future__ import annotations

import os
import shutil

import httpx2
from huggingface_hub import errors
from huggingface_hub.utils import filter_repo_objects


class LocalHubApi:
  """`HfApi` over a local tree; set `root` (and read `downloaded`) on the class."""

  root: str = ""
  cache: str = ""
  downloaded: list[tuple[str, str, str]] = []  # (repo_id, revision, file)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def _revision_dir(self, repo_id: str, revision: str | None) -> str:
    url = f"https://huggingface.co/api/models/{repo_id}/revision/{revision or 'main'}"
    response = httpx2.Response(404, request=httpx2.Request("GET", url))
    if not os.path.isdir(os.path.join(self.root, repo_id)):
      raise errors.RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: "
                                           f"{url}.", response=response)
    path = os.path.join(self.root, repo_id, revision or "main")
    if not os.path.isfile(os.path.join(path, ".revision")):
      raise errors.RevisionNotFoundError(f"404 Client Error. Revision Not Found for url: {url}.",
                                         response=response)
    return path

  def list_repo_files(self, repo_id: str, *, revision: str | None = None,
                      repo_type: str | None = None, token=None) -> list[str]:
    del repo_type, token
    path = self._revision_dir(repo_id, revision)
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path)
                  for f in files if f != ".revision")

  def snapshot_download(self, repo_id: str, *, revision: str | None = None,
                        allow_patterns=None, ignore_patterns=None, **kwargs) -> str:
    del kwargs
    files = filter_repo_objects(self.list_repo_files(repo_id, revision=revision),
                                allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    source = self._revision_dir(repo_id, revision)
    snapshot = os.path.join(self.cache, repo_id.replace("/", "--"), revision or "main")
    for name in files:
      os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
      shutil.copyfile(os.path.join(source, name), os.path.join(snapshot, name))
      type(self).downloaded.append((repo_id, revision or "main", name))
    return snapshot


def publish(root: str, repo_id: str, directory: str, revision: str = "main") -> None:
  """Puts the files of `directory` in the stand-in repository at `revision`."""
  target = os.path.join(root, repo_id, revision)
  shutil.copytree(directory, target, dirs_exist_ok=True)
  open(os.path.join(target, ".revision"), "w").close()
