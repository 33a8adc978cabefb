"""Traces chosen training steps with jax.profiler, from the first process only.

Each host's trace would show the same program; on a pod, every host writing
(or uploading, with a gs:// work directory) its own is N times the bytes and
time for nothing new, so only process 0 traces, as MaxText does.
"""

from __future__ import annotations

from typing import Iterable

import jax


class Profiler:
  """Traces the steps in `profile_steps` (consecutive steps in one trace) into `log_dir`.

    profiler = Profiler((100, 101), "WORKDIR/logs/profile")
    for step ...:
      profiler.before(step)
      metrics = train_step(...)
      profiler.after(step, metrics)
    profiler.close()
  """

  def __init__(self, profile_steps: Iterable[int], log_dir: str, *,
               process_index: int | None = None):
    """`process_index`: this process's (default `jax.process_index()`); only 0 traces."""
    if process_index is None:
      process_index = jax.process_index()
    self._steps = set(profile_steps) if process_index == 0 else set()
    self._log_dir = log_dir
    self._active = False

  def before(self, step_number: int) -> None:
    if step_number in self._steps and not self._active:
      jax.profiler.start_trace(self._log_dir)
      self._active = True

  def after(self, step_number: int, metrics) -> None:
    if self._active and step_number + 1 not in self._steps:
      jax.block_until_ready(metrics)
      self.close()

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
