"""What made a run directory, recorded when it starts and checked by every later command.

A work directory holds one run: its checkpoints only make sense with the
settings that wrote them. So the first invocation records them in
`<workdir>/run.json`, and every later one compares its own settings before it
touches anything: the same settings resume; settings that only say how long
or how often (more steps, another evaluation cadence, another mesh) are safe
and continue; anything else (another command, recipe, model, task,
vocabulary, batch, optimizer, ...) is refused with the differences listed.
`miniend sweep` and the quickstart claim their directories the same way
(`claim`).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import hashlib
import json
from typing import Any, Mapping, Sequence

from etils import epath

RECORD_FILE = "run.json"

# Settings a resumed run may change: how long, how often, where, and on what
# devices; never what is trained, on what, or how.
SAFE_TO_CHANGE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.profile_steps", "train.compilation_cache_dir", "train.data_dir",
    "optimizer.total_steps_from_num_steps", "checkpoint.*", "mesh.*",
    "model.attention_impl",  # the kernel, not the math
    "train.skip_bad_records",  # how to go past a bad record the run stopped at
)


class RunMismatchError(ValueError):
  """A work directory was made with other settings than the ones given now."""

  def __init__(self, message: str, differences: Mapping[str, tuple[Any, Any]]):
    super().__init__(message)
    self.differences = dict(differences)


def _jsonable(value):
  return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _flatten(prefix: str, obj) -> dict[str, Any]:
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
  return {f"{prefix}.{k}": _jsonable(v) for k, v in dict(obj).items()}


def vocabulary_id(vocabulary) -> str:
  """A content fingerprint of a seqio vocabulary (not its path, which may move)."""
  model = getattr(vocabulary, "sp_model", None)
  if model is None:
    model = repr(vocabulary).encode()
  return f"{type(vocabulary).__name__}:{hashlib.sha256(model).hexdigest()[:16]}"


def describe_run(mode: str, *, train, model, optimizer, checkpoint, mesh, recipe,
                 vocabulary: str) -> dict[str, Any]:
  """The flat, JSON-able settings of a training run (the record's content)."""
  settings = {"command": mode, "vocabulary": vocabulary}
  settings.update(_flatten("train", train))
  settings.update(_flatten("model", model))
  derived = optimizer.total_steps is None
  settings.update(_flatten("optimizer", dataclasses.replace(optimizer, total_steps=None)
                           if derived else optimizer))
  settings["optimizer.total_steps_from_num_steps"] = derived
  settings.update(_flatten("checkpoint", checkpoint))
  settings.update(_flatten("mesh", mesh))
  settings["recipe"] = _jsonable(dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe)
                                 else recipe)
  return settings


def _safe(key: str, safe_to_change: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in safe_to_change)


ALLOW_CHANGES_ADVICE = ("Use a new --workdir, or pass --allow_changes to continue this run with "
                        "the new settings anyway.")


def claim(directory, settings: Mapping[str, Any], *, filename: str = RECORD_FILE,
          safe_to_change: Sequence[str] = SAFE_TO_CHANGE, allow_changes: bool = False,
          what: str = "this command", write: bool = True,
          advice: str = ALLOW_CHANGES_ADVICE) -> dict[str, tuple[Any, Any]]:
  """Checks `settings` against the record in `directory`, or records them.

  Args:
    directory: the run directory (local or gs://).
    settings: flat JSON-able settings.
    filename: the record's name in `directory`.
    safe_to_change: key patterns that may differ from the record.
    allow_changes: continue even when other keys differ (the caller's choice).
    what: how to name the refused invocation in the message.
    write: record (or update) the settings; False only checks (other hosts).
    advice: what the refusal tells the user to do.
  Returns:
    {key: (recorded, given)} of every setting that differs.
  Raises:
    RunMismatchError: keys outside `safe_to_change` differ (nothing was written).
  """
  settings = _jsonable(dict(settings))
  path = epath.Path(directory) / filename
  recorded = None
  if path.exists():
    try:
      recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      recorded = None
  differences = {}
  if recorded is not None:
    old = recorded.get("settings", {})
    differences = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings))
                   if old.get(k) != settings.get(k)}
    unsafe = {k: v for k, v in differences.items() if not _safe(k, safe_to_change)}
    if unsafe and not allow_changes:
      shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(unsafe.items())[:8])
      more = f"; and {len(unsafe) - 8} more" if len(unsafe) > 8 else ""
      raise RunMismatchError(
          f"{directory} holds a run made with other settings than {what} ({shown}{more}). "
          f"Nothing was changed. {advice}", unsafe)
  if write and (recorded is None or differences):
    history = list((recorded or {}).get("history", []))
    history.append({"at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "changed": {k: list(v) for k, v in differences.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{filename}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "history": history}, indent=1,
                              sort_keys=True))
    tmp.replace(path)
  return differences
