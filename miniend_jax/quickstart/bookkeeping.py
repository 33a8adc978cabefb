"""Which stages are finished, with which settings: what makes a re-run resume.

Every stage directory records the settings it was made with
(`quickstart_stage.json`, or the file name a caller chooses): `claim_settings`
writes them the first time and refuses other settings later, naming what
changed. A training stage is finished when its run's summary.json reaches its
step count (`run_finished`); an evaluation when its result file exists.
`StageLog` runs the stages in order, skipping the finished ones, and keeps the
record of what ran. `miniend sweep` uses the same pieces for its grid points.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping

from etils import epath

from miniend_jax.train import run_record

STAGE_FILE = "quickstart_stage.json"


class StageMismatchError(RuntimeError):
  """A stage directory was made with other settings than the ones asked for now."""


class Preempted(RuntimeError):
  """A training stage stopped early on SIGTERM (its checkpoint is saved; re-run to resume)."""


def fingerprint(settings: Mapping[str, Any]) -> str:
  """A short hash of JSON-able settings (key order does not matter)."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def claim_settings(directory: str, settings: Mapping[str, Any], filename: str = STAGE_FILE) -> str:
  """Records `settings` in `directory` (or checks them against the recorded ones).

  The run loop's own mechanism (`train.run_record.claim`), with no change
  allowed: a stage is redone only by hand. Returns the settings' fingerprint;
  raises StageMismatchError, naming what changed, when `directory` was made
  with other settings.
  """
  try:
    run_record.claim(directory, settings, filename=filename, safe_to_change=(),
                     what="these settings",
                     advice="Re-run with the same flags to resume, use another --workdir, or "
                            "delete that directory (and those made from it) to redo it.")
  except run_record.RunMismatchError as e:
    raise StageMismatchError(str(e)) from e
  return fingerprint(settings)


def read_json(path: str) -> dict | None:
  """The JSON in `path` (local or gs://), or None when it is missing or unreadable."""
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, json.JSONDecodeError):
    return None


def run_finished(directory: str, num_steps: int) -> bool:
  """Whether the training run in `directory` completed `num_steps` (its summary says so)."""
  summary = read_json(os.path.join(directory, "summary.json"))
  return bool(summary) and summary.get("step") == num_steps and not summary.get("preempted")


class StageLog:
  """Runs named stages in order, skipping finished ones, and records what happened.

  `records` holds (name, "ran" | "skipped", seconds) per stage. Skipped
  stages are announced together, on one line, before the next one that runs.
  """

  def __init__(self, say: Callable[[str], None],
               on_stage: Callable[[str, str], None] | None = None):
    self.say = say
    self.on_stage = on_stage
    self.records: list[tuple[str, str, float]] = []
    self._skipped: list[str] = []

  def flush_skipped(self) -> None:
    if self._skipped:
      self.say(f"finished earlier, skipped: {', '.join(self._skipped)}")
      self._skipped.clear()

  def run(self, name: str, done: bool, body: Callable[[], Any], what: str = "") -> Any:
    """Runs `body` unless `done`; returns its result (None when skipped)."""
    if done:
      self.records.append((name, "skipped", 0.0))
      self._skipped.append(name)
      if self.on_stage:
        self.on_stage(name, "skipped")
      return None
    self.flush_skipped()
    self.say(f"{name}: {what}..." if what else f"{name}...")
    began = time.perf_counter()
    out = body()
    seconds = time.perf_counter() - began
    self.records.append((name, "ran", seconds))
    self.say(f"{name}: done in {seconds:.0f} s")
    if self.on_stage:
      self.on_stage(name, "ran")
    return out

  @property
  def ran(self) -> int:
    return sum(1 for _, status, _ in self.records if status == "ran")
