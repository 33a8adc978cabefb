"""Hugging Face Hub repositories as checkpoints: `ID` or `ID@REVISION`, one format fetched.

`resolve` returns a directory for a local or gs:// path as given, and for a
hub id lists the repository's files at the revision first (huggingface_hub's
`HfApi.list_repo_files`), then downloads config.json, the tokenizer files and
only the best weight format present (`tensor_files.FORMATS`: safetensors, then
Flax msgpack, then PyTorch .bin), never every copy a repository carries.
A revision is a branch, tag, commit or pull-request ref:
`google/t5-v1_1-xxl@refs/pr/2`.

A job of several processes refuses hub ids: each host would download the
whole checkpoint to its own disk on every start. Convert once to a bucket
(`miniend convert`) and pass that.
"""

from __future__ import annotations

import os
import re

from etils import epath

from miniend_jax.model import tensor_files
from miniend_jax.model.tensor_files import CheckpointError

CONFIG_NAME = "config.json"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# A repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def parse(source: str) -> tuple[str, str | None] | None:
  """(repo id, revision or None) when `source` reads as a hub id (`ID` or
  `ID@REVISION`), else None. Paths (absolute, relative, `~`, any URL scheme)
  are never hub ids."""
  if not source or "://" in source or source.startswith((".", "/", "~")):
    return None
  repo_id, _, revision = source.partition("@")
  if not _REPO_ID.fullmatch(repo_id) or (source.count("@") and not revision):
    return None
  return repo_id, revision or None


def name(source: str) -> str:
  """The model name of a hub id (`google/t5-v1_1-xl@main` -> `t5-v1_1-xl`)."""
  parsed = parse(source)
  return parsed[0].rsplit("/", 1)[-1] if parsed else source


def refuse_on_many_processes(source: str) -> None:
  """Raises ValueError (one line, what to do) when a job of several processes
  names a hub id."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    raise ValueError(
        f"{source!r} is a Hugging Face Hub id and this job runs {jax.process_count()} "
        "processes: every host would download the whole checkpoint to its own disk on every "
        f"start. Convert it once to a bucket (`miniend convert --teacher {source} --out_dir "
        "gs://BUCKET/teachers/NAME` on one VM) and pass that directory instead, or download "
        "it once to storage every host reads")


def resolve(source: str, *, weights: bool = True) -> str:
  """A directory holding the checkpoint `source` names: a local or gs:// (any
  etils.epath) directory as given, or a hub id's download of one format (of
  config.json alone without `weights`)."""
  source = os.path.expanduser(source)
  path = epath.Path(source)
  if path.is_dir():
    return source
  parsed = parse(source)
  if parsed is None or path.exists():
    raise FileNotFoundError(
        f"{source!r} is not a checkpoint directory. Pass a directory holding config.json and "
        "weights (or a Hugging Face hub id such as 'google/t5-v1_1-base', optionally "
        "ID@REVISION)")
  refuse_on_many_processes(source)
  return download(*parsed, weights=weights)


def download(repo_id: str, revision: str | None = None, *, weights: bool = True) -> str:
  """Downloads config.json, tokenizer files and the best weight format of a
  repository (at `revision`; only config.json without `weights`) through
  huggingface_hub; returns the local directory."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import errors  # pylint: disable=import-outside-toplevel
  where = f"{repo_id}@{revision}" if revision else repo_id
  api = huggingface_hub.HfApi()
  try:
    files = api.list_repo_files(repo_id, revision=revision)
  except errors.RevisionNotFoundError as e:
    raise FileNotFoundError(f"The Hugging Face repository {repo_id} has no revision "
                            f"{revision!r}. Name a branch, tag, commit or refs/pr/N") from e
  except errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(f"There is no Hugging Face repository {repo_id!r} (or it is "
                            "private: log in with `hf auth login`)") from e
  except Exception as e:  # Network errors come in many types; all mean the same here.
    raise FileNotFoundError(
        f"Could not list the Hugging Face repository {where} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}). Without network access, download "
        f"it elsewhere (`hf download {repo_id}"
        f"{' --revision ' + revision if revision else ''} --local-dir DIR`) and pass the local "
        "directory instead") from e
  fmt = tensor_files.choose_format(files)
  if fmt is None or CONFIG_NAME not in files:
    raise CheckpointError(
        f"{'No weights to read' if fmt is None else 'No config.json'}: "
        + tensor_files.describe(f"the Hugging Face repository {where}", files))
  wanted = [CONFIG_NAME]
  if weights:
    wanted += [*(f for f in TOKENIZER_FILES if f in files), *tensor_files.format_files(fmt, files)]
  try:
    return api.snapshot_download(repo_id, revision=revision, allow_patterns=wanted)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(f"Could not download {wanted} from {where} ({type(e).__name__}: "
                            f"{e}). Retry, or download them elsewhere and pass the directory") from e
