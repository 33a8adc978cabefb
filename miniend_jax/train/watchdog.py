"""Ends a run whose process lives but makes no progress.

A dead host ends a multi-host job (its peers abort), but a live, stuck one runs
for ever: an input read that never returns (a stalled GCS request), a wedged
chip, or a host waiting in a collective for a peer that is stuck. So does every
host waiting for it. The watchdog is a daemon thread the run loop tells when a
step has finished (`progress`). When none has finished for `step_time_factor`
times the recent step time (at least `min_seconds`), or for `max_seconds`, it
writes every thread's Python stack to stderr (`faulthandler`), then one line
saying so, and ends the process with status `EXIT_HUNG` (4). `miniend` run again
resumes from the last checkpoint; `tpu_scripts/resume.sh` does that by itself
(it relaunches a run that exited on any worker).

It is armed by the first finished step: loading and the first step's compile
take as long as they take (`resume.sh --hung-after` watches those). The recent
step time is the mean interval between the last `window` finished steps, so the
first, compiling step never counts, and neither does the host running ahead of
the device between two reads of the metrics.
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import os
import sys
import threading
import time

import gin

EXIT_HUNG = 4


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WatchdogConfig:
  """When a run counts as hung.

  A run is hung when no step has finished for
  `min(max(min_seconds, step_time_factor * recent step time), max_seconds)`.

  Attributes:
    step_time_factor: how many recent step times without a finished step make a
      hang; 0 leaves only `max_seconds`.
    min_seconds: never sooner than this after the last finished step: evaluations
      and checkpoint saves run between two steps (raise it when one of them takes
      longer).
    max_seconds: a fixed limit, whatever the step time (None: none).
    window: how many of the last steps the recent step time is averaged over.
  """

  step_time_factor: float = 20.0
  min_seconds: float = 1200.0
  max_seconds: float | None = None
  window: int = 100

  def __post_init__(self):
    if self.step_time_factor < 0 or self.min_seconds < 0 or self.window < 1 or (
        self.max_seconds is not None and self.max_seconds <= 0):
      raise ValueError(
          f"{self}: step_time_factor and min_seconds must be >= 0, window >= 1 and "
          "max_seconds > 0 or None (step_time_factor=0 with max_seconds=None turns the "
          "watchdog off).")

  @property
  def enabled(self) -> bool:
    return self.step_time_factor > 0 or self.max_seconds is not None

  def timeout(self, recent_step_seconds: float | None) -> float | None:
    """Seconds without a finished step that make a hang (None: no limit yet).

    `recent_step_seconds` is None while only the first step has finished.
    """
    limits = []
    if self.step_time_factor > 0:
      limits.append(max(self.min_seconds, self.step_time_factor * (recent_step_seconds or 0.0)))
    if self.max_seconds is not None:
      limits.append(self.max_seconds)
    return min(limits) if limits else None


class Watchdog:
  """A thread that ends the process when the run stops finishing steps.

    with Watchdog(WatchdogConfig()) as watchdog:
      for step ...:
        state = train_step(state, batch)
        watchdog.progress(step + 1)
  """

  def __init__(self, config: WatchdogConfig):
    self.config = config
    # (time.monotonic(), step) of the last finished steps.
    self._finished = collections.deque(maxlen=config.window + 1)
    self._lock = threading.Lock()
    self._closed = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "Watchdog":
    if self.config.enabled:
      self._thread = threading.Thread(target=self._watch, name="miniend-watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._closed.set()
    if self._thread is not None:
      self._thread.join()

  def progress(self, step: int) -> None:
    """Records that `step` has finished (call it from the loop, after each step)."""
    with self._lock:
      self._finished.append((time.monotonic(), int(step)))

  def recent_step_seconds(self) -> float | None:
    """The mean interval between the last finished steps (None before the second)."""
    with self._lock:
      finished = list(self._finished)
    if len(finished) < 2:
      return None
    return (finished[-1][0] - finished[0][0]) / (len(finished) - 1)

  def _watch(self) -> None:
    poll = 1.0
    while not self._closed.wait(poll):
      with self._lock:
        last = self._finished[-1] if self._finished else None
      if last is None:
        continue  # not armed before the first step finished
      recent = self.recent_step_seconds()
      timeout = self.config.timeout(recent)
      idle = time.monotonic() - last[0]
      if timeout is not None and idle > timeout:
        self._fire(idle, timeout, last[1], recent)
      poll = min(max((timeout or 10.0) / 20, 0.05), 10.0)

  def _fire(self, idle: float, timeout: float, step: int, recent: float | None) -> None:
    stream = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    stream.flush()
    faulthandler.dump_traceback(file=stream, all_threads=True)
    recent_text = "unknown yet" if recent is None else f"{recent:.3g} s"
    stream.write(
        f"miniend: no training step finished for {idle:.0f} s since step {step} (limit "
        f"{timeout:.0f} s: {self.config.step_time_factor:g} x the recent step time of "
        f"{recent_text}, at least {self.config.min_seconds:g} s, at most "
        f"{self.config.max_seconds} s): the run is hung (an input read that never returns, "
        "a wedged accelerator, or a peer host stuck; every thread's stack is above). "
        f"Exiting with status {EXIT_HUNG}; run the same command again to resume from the "
        "last checkpoint (tpu_scripts/resume.sh does), or raise WatchdogConfig.min_seconds "
        "if an evaluation or a checkpoint save takes that long.\n")
    stream.flush()
    os._exit(EXIT_HUNG)  # the main thread is stuck: only the process can end
