"""What the run loop does around its steps, one small class per concern.

In the manner of t5x's trainer (`TerminateOnNanAction`, `_AsyncTimer`): the
loop in `loop.py` runs the steps and asks these objects what to do after each.

- `GoodputTimers`: host time outside the steps (data wait, evaluation,
  checkpointing) since the last log, which goodput and MFU leave out;
- `IntervalLog`: every `log_every` steps, the means of the steps' metrics,
  throughput, goodput and MFU, written and shown on the progress bar; the
  check that no step since the last one was non-finite (`NonFiniteLossError`);
- `PeriodicEvaluation`: validation loss and token accuracy every `eval_every`
  steps and at the end, the same number of batches on every host;
- `PeriodicCheckpoints`: a save every `save_interval_steps` steps;
- `StopConditions`: a stop signal every host agrees on (preemption, Ctrl-C),
  before the first step or after any step but the last.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

import jax
import numpy as np

from miniend_jax.data import sources
from miniend_jax.train import inputs, partitioning, preemption, steps
from miniend_jax.train.setup import PreparedRun, shard_datasets


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


class GoodputTimers:
  """Host seconds spent since the last log outside the steps, by what they were spent on."""

  def __init__(self):
    self.seconds = {"data": 0.0, "eval": 0.0, "checkpoint": 0.0}

  def add(self, name: str, began: float) -> None:
    """Counts the time since `began` (a `time.perf_counter()` reading) as `name`'s."""
    self.seconds[name] += time.perf_counter() - began

  def reset(self) -> None:
    self.seconds = dict.fromkeys(self.seconds, 0.0)


class IntervalLog:
  """The metrics of the steps since the last log: written every `log_every` steps and
  after the last, with the interval's throughput and goodput; the progress bar."""

  def __init__(self, run: PreparedRun, writer, timers: GoodputTimers, start_step: int,
               progress: bool):
    self._run, self._writer, self.timers = run, writer, timers
    self._peak = steps.device_peak_flops(jax.devices()[0].device_kind)
    self._bar = _progress(progress, start_step, run.train.num_steps)
    self._pending = []  # the steps' metrics since the last log, on the devices
    self.last = {}  # the last log's means and rates
    self._began, self._steps = time.perf_counter(), 0

  def add(self, metrics) -> None:
    self._pending.append(metrics)
    self._steps += 1

  def check_finite(self, step_number: int) -> None:
    """Raises NonFiniteLossError if any step since the last log was non-finite."""
    _check_finite(jax.device_get(self._pending), step_number)

  def due(self, done: int) -> bool:
    return done % self._run.train.log_every == 0 or done == self._run.train.num_steps

  def write(self, done: int) -> None:
    """Writes the interval's means (raising on a non-finite step) and rates; starts the next."""
    self.last = _summarise(self._pending, done, self._writer)
    self._pending = []
    prog = self._run.program
    rates = _rates(time.perf_counter() - self._began, self._steps, self.timers.seconds,
                   prog.tokens_per_step, prog.analytic_flops, self._peak)
    if self._run.train.skip_bad_records:
      rates["data/skipped_records"] = float(sources.skipped_records())
    self._writer.write_scalars(done, rates)
    self.last.update(rates)
    self._began, self._steps = time.perf_counter(), 0
    self.timers.reset()
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{self.last['loss']:.4f}",
                            tok_s=f"{rates['perf/tokens_per_s']:.0f}")

  def advance(self) -> None:
    """One more step on the progress bar."""
    if self._bar is not None:
      self._bar.update(1)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class PeriodicEvaluation:
  """The student's validation loss and token accuracy, every `eval_every` steps (0: only
  at the end) and after the last step, on at most `eval_batches` global batches read
  from the start of the split each time."""

  def __init__(self, run: PreparedRun, writer, timers: GoodputTimers):
    self._run, self._writer, self._timers = run, writer, timers
    self._step = steps.jitted_eval_step(run.program.student_config, run.program.mesh)
    self._reader = None  # built at the first evaluation
    self.last = {}  # the last evaluation's metrics

  def after_step(self, state, done: int) -> None:
    cfg = self._run.train
    if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.num_steps:
      self.last = self.evaluate(state, done)

  def at_end(self, state, step_number: int) -> None:
    self.last = self.evaluate(state, step_number) or self.last

  def evaluate(self, state, step_number: int) -> dict:
    """{"eval/loss", "eval/token_accuracy", "eval/tokens"} ({} when the split is empty)."""
    run, cfg, prog = self._run, self._run.train, self._run.program
    began = time.perf_counter()
    if self._reader is None:
      self._reader = inputs.GlobalBatchReader(
          shard_datasets(cfg, run.task, run.layout, cfg.eval_split, train=False), run.layout,
          run.host_rows, pad_exhausted=True)
    self._reader.reset()
    sums = None
    for _ in range(cfg.eval_batches):
      # Every host steps until the global batch is all padding: the eval step's
      # replicated sums are the same number on every host, so they stop together.
      batch = partitioning.host_local_to_global(next(self._reader), prog.mesh, prog.rules,
                                                global_batch_size=cfg.batch_size)
      with partitioning.mesh_context(prog.mesh, prog.rules):
        out = jax.device_get(self._step(state.params["model"], batch))
      if float(out["weight_sum"]) == 0:
        break
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    self._timers.add("eval", began)
    logging.info("Evaluated at step %d in %.1f s (%s tokens).", step_number,
                 time.perf_counter() - began, None if sums is None else int(sums["weight_sum"]))
    if sums is None:
      return {}
    metrics = {"eval/loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
               "eval/token_accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0)),
               "eval/tokens": float(sums["weight_sum"])}
    self._writer.write_scalars(step_number, metrics)
    return metrics


class PeriodicCheckpoints:
  """A checkpoint every `save_interval_steps` steps, the state with every data shard's
  position; the last step is saved by the run's end, with the final evaluation."""

  def __init__(self, run: PreparedRun, timers: GoodputTimers):
    self._run, self._timers = run, timers

  def due(self, done: int) -> bool:
    return (done % self._run.checkpoint.save_interval_steps == 0
            and done < self._run.train.num_steps)

  def save(self, state, step_number: int, metrics=None) -> None:
    began = time.perf_counter()
    self._run.checkpointer.save(step_number, state, data_iterator=self._run.reader,
                                metrics=metrics, force=True)
    self._timers.add("checkpoint", began)


class StopConditions:
  """Whether the loop stops before its last step: when any host has been signalled
  (`preemption.StopSignals`: every host agrees, at the same step). A non-finite loss
  stops it by raising (`IntervalLog`)."""

  def __init__(self, signals: preemption.StopSignals, num_steps: int):
    self._signals, self._num_steps = signals, num_steps
    self.preempted = False

  def before_first_step(self) -> None:
    """A signal while loading: every host stops before compiling (nothing to save
    beyond the checkpoint it started from; a fresh start saves its step 0)."""
    self.preempted = self._signals.agree_now()

  def end(self, start_step: int) -> int:
    """The step the loop runs up to (exclusive)."""
    return start_step if self.preempted else self._num_steps

  def after_step(self, done: int) -> bool:
    """Whether to stop after step `done`. Call once per step on every host, after
    dispatching it: the hosts agree on the answer."""
    stopping = self._signals.should_stop() and done < self._num_steps
    if stopping:
      self.preempted = True
    return stopping

  def stopped_by(self) -> str | None:
    """The signal this host received, when the run was stopped early."""
    if not self.preempted:
      return None
    return self._signals.signal_name or "a signal to another host"

  def exit_code(self) -> int:
    """0, or 130 after Ctrl-C (`preemption.EXIT_CODES`)."""
    return self._signals.exit_code if self.preempted else 0


def _rates(elapsed: float, num_steps: int, timers: Mapping[str, float], tokens_per_step: int,
           flops_per_step: float, peak: float | None) -> dict[str, float]:
  """Throughput and goodput of the steps since the last log.

  Host time not spent waiting for data, evaluating or checkpointing is the
  steps' own time (the host waits on the device at least once per step), so
  MFU is computed on it rather than on the wall clock.
  """
  overhead = sum(timers.values())
  compute = max(elapsed - overhead, 1e-9)
  rates = {"perf/steps_per_s": num_steps / elapsed,
           "perf/tokens_per_s": num_steps * tokens_per_step / elapsed,
           "perf/step_time_s": compute / num_steps,
           "perf/goodput": compute / elapsed}
  rates.update({f"perf/{name}_s": seconds for name, seconds in timers.items()})
  if peak:
    rates["perf/mfu"] = flops_per_step * num_steps / compute / (peak * jax.device_count())
  return rates


def _progress(enabled: bool, start: int, total: int):
  if not enabled or jax.process_index() != 0:
    return None
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _check_finite(host_metrics: list, step_number: int) -> None:
  """Raises NonFiniteLossError if any step since the last check was non-finite."""
  bad = [i for i, m in enumerate(host_metrics) if int(m["nonfinite"])]
  if bad:
    first = step_number - len(host_metrics) + bad[0] + 1
    m = host_metrics[bad[0]]
    raise NonFiniteLossError(
        f"Training became non-finite at step {first} (loss={float(m['loss'])}, "
        f"gradient norm={float(m['grad_norm/total'])}). That update was not applied "
        "and the last good checkpoint is kept; lower the learning "
        "rate, raise warm-up, enable gradient clipping, or use float32 compute, then rerun "
        "(it resumes from the last checkpoint).")


def _summarise(pending: list, step_number: int, writer) -> dict:
  """Means of the metrics of the steps since the last log; raises on a non-finite step."""
  host = jax.device_get(pending)
  _check_finite(host, step_number)
  means = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k != "nonfinite"}
  writer.write_scalars(step_number, means)
  return means
