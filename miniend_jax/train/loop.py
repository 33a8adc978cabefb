"""The run loop behind `miniend distill | pretrain | finetune`.

The same program on one host and on many. `train` first builds and checks
everything that can be wrong (recipe against the two models, vocabulary
against the task, mesh against the devices, batch against the mesh:
`program.build_step_program`), so a wrong setting fails before anything loads
or compiles. Then:

- every process starts JAX's distributed runtime when it is one of several
  (`partitioning.maybe_initialize_distributed`);
- the teacher (and finetuning's initial weights) load straight into their
  shardings, each host reading only the slices its devices hold;
- each host reads its rows of every global batch from logical data shards
  (`inputs.py`), so the batches do not depend on the number of hosts;
- the single jitted step of `train/steps.py` runs; every host logs goodput
  (step, data-wait, evaluation and checkpoint time) and MFU on compute time;
- checkpoints (orbax) hold the state and every shard's data position in one
  atomic step; a run resumes from the latest one every host can read, on any
  number of hosts;
- SIGTERM or Ctrl-C on any host stops every host after the same step, which
  they save together, or before the first step when it came while loading
  (`preemption.py`); a non-finite loss stops with a clear error and the last
  good checkpoint untouched; a run that stops finishing steps while alive is
  ended by its watchdog (`watchdog.py`, exit status 4);
- evaluation runs the same number of steps on every host (exhausted shards
  give zero-weight rows).

`train` is a sequence of named stages over a frozen `PreparedRun`:
`setup.prepare_run` (the checks above, the data reader, the checkpointer),
`initialise_or_restore` (the weights and state), `record_run`, `run_steps`,
`end_steps` (the final evaluation and save) and `finish` (the summary). What
the loop does around its steps (interval log, evaluation and checkpoint
cadence, stop conditions) is in `loop_concerns.py`; the other commands are in
`evaluate.py` and `export.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import gin
import jax
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.distill.recipe import Recipe
from miniend_jax.model import student as student_lib, t5
from miniend_jax.train import (checkpoints, host_memory, partitioning, preemption, profiling,
                               state as state_lib, watchdog as watchdog_lib, writers)
from miniend_jax.train.loop_concerns import (GoodputTimers, IntervalLog, PeriodicCheckpoints,
                                             PeriodicEvaluation, StopConditions)
from miniend_jax.train.program import MODES, ModelSetup, TrainConfig  # noqa: F401  (gin + API)
from miniend_jax.train.setup import PreparedRun, load_params, prepare_run
# re-exported: users import them from here
from miniend_jax.train.evaluate import evaluate  # noqa: F401
from miniend_jax.train.export import convert, export  # noqa: F401
from miniend_jax.train.loop_concerns import NonFiniteLossError  # noqa: F401
from miniend_jax.train.setup import (check_vocabulary, default_data_dir,  # noqa: F401
                                     load_model, named_vocabulary, task_vocabulary)


@gin.configurable(denylist=["mode", "workdir"])
def train(mode: str, workdir: str, *, train_config: TrainConfig | None = None,
          model: ModelSetup | None = None, optimizer: state_lib.OptimizerConfig | None = None,
          checkpoint: checkpoints.CheckpointConfig | None = None,
          mesh: partitioning.MeshConfig | None = None,
          recipe: str | Recipe = "miniend_d", progress: bool = True,
          allow_changes: bool = False,
          watchdog: watchdog_lib.WatchdogConfig | None = None) -> dict:
  """Runs (or resumes) a distill / pretrain / finetune job in `workdir`.

  Every process of a multi-host job calls this with the same settings. The
  config objects default to their gin-configured instances (built here, at
  call time, so `TrainConfig.num_steps = ...` bindings apply). A work
  directory made with other settings is refused before anything is touched
  (`run_record`), unless `allow_changes`.

  Returns:
    A summary: final step, last train and eval metrics, whether the run was
    stopped early (`preempted`), by which signal on this host (`stopped_by`),
    and the process exit code that goes with it (`exit_code`: 0, or 130 after
    Ctrl-C).
  """
  partitioning.maybe_initialize_distributed()
  host_memory.keep_freed_memory()
  # Signals are caught from here on, after JAX's distributed runtime (whose own SIGTERM
  # handler would swallow one sent while loading or compiling): see preemption.py.
  with preemption.StopSignals() as signals:
    run = prepare_run(mode, workdir, train_config=train_config, model=model,
                      optimizer=optimizer, checkpoint=checkpoint, mesh=mesh, recipe=recipe,
                      allow_changes=allow_changes, watchdog=watchdog)
    state, teacher_params = initialise_or_restore(run)
    record_run(run)
    start_step = int(state.step)
    writer = open_metric_writer(run, start_step)
    concerns = LoopConcerns.create(run, writer, signals, start_step, progress)
    with watchdog_lib.Watchdog(run.watchdog) as hung_run_check:
      state = run_steps(run, state, teacher_params, concerns, hung_run_check)
      final_step = end_steps(run, state, concerns)
    return finish(run, concerns, final_step, writer)


# ----------------------------------------------------------------------------
# Weights: straight into their shardings.


def initialise_or_restore(run: PreparedRun) -> tuple[state_lib.TrainState, Any]:
  """(train state, teacher params or None): the state restored from the latest
  checkpoint every host reads, else initialised (from `init_from`'s weights when
  finetuning, from the teacher's layers when the student is made of them)."""
  began = time.perf_counter()
  prog = run.program
  teacher_params = None
  if prog.teacher_config is not None:
    teacher_params = load_params(run.model.teacher, prog.teacher_config, prog.teacher_shardings)
  if run.latest_step is not None:
    state = _restore(run)
  else:
    state = _initial_state(run, teacher_params)
  logging.info("Weights and state ready in %.1f s (step %d).", time.perf_counter() - began,
               int(state.step))
  return state, teacher_params


def _restore(run: PreparedRun) -> state_lib.TrainState:
  """The latest checkpoint every host reads, and the data position saved with it."""
  try:
    state, _ = run.checkpointer.restore_latest_good(target_state=run.program.abstract_state,
                                                    data_iterator=run.reader)
  except Exception:
    run.checkpointer.close()  # orbax's background threads would otherwise fail noisily at exit
    raise
  logging.info("Resumed from step %d of %s.", int(state.step), run.checkpointer.directory)
  return state


def _initial_state(run: PreparedRun, teacher_params) -> state_lib.TrainState:
  prog, model, seed = run.program, run.model, run.train.seed
  model_shardings = prog.state_shardings.params["model"]
  init_args = (jax.random.key(seed),)
  if run.mode == "finetune":
    init_args += (load_params(model.init_from, prog.student_config, model_shardings),)
  elif prog.init_from_params:  # a student initialised from the teacher's layers
    init_args += (_student_from_teacher(run, teacher_params, model_shardings),)
  return prog.create_state(*init_args)


def _student_from_teacher(run: PreparedRun, teacher_params, model_shardings):
  """The student's parameters copied from the teacher's layers (loaded here when the
  recipe itself needs no teacher, and freed on return)."""
  prog, teacher_config, seed = run.program, run.teacher_config, run.train.seed
  teacher = teacher_params
  if teacher is None:  # the recipe itself needs no teacher
    teacher_shardings = partitioning.logical_to_sharding(
        t5.param_logical_axes(teacher_config), prog.mesh, prog.rules)
    teacher = load_params(run.model.teacher, teacher_config, teacher_shardings)
  copy = jax.jit(lambda t: student_lib.init_student(
      prog.student_config, jax.random.key(seed), teacher_config=teacher_config,
      teacher_params=t), out_shardings=model_shardings)
  return copy(teacher)


def record_run(run: PreparedRun) -> None:
  """The run is under way: process 0 records what made it (settings, gin config)."""
  if jax.process_index() == 0:
    changes = run.claim(True)
    if changes:
      logging.info("Continuing %s with changed settings: %s", run.workdir,
                   "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    epath.Path(run.workdir, f"{run.mode}_config.gin").write_text(gin.config_str())


# ----------------------------------------------------------------------------
# The steps.


def open_metric_writer(run: PreparedRun, start_step: int):
  """The run's metric writer (`<workdir>/logs`), without rows of the steps after
  `start_step` (they will be logged again)."""
  if jax.process_index() == 0:
    # Steps after the restored one (all, on a fresh start) will be logged again.
    writers.drop_rows_after(os.path.join(run.log_dir, "train_metrics.jsonl"), start_step)
  return writers.create_writer(run.log_dir)


@dataclasses.dataclass(frozen=True)
class LoopConcerns:
  """What the step loop consults around each step (see loop_concerns.py)."""

  evaluation: PeriodicEvaluation
  saves: PeriodicCheckpoints
  stop: StopConditions
  log: IntervalLog
  profiler: profiling.Profiler

  @classmethod
  def create(cls, run: PreparedRun, writer, signals: preemption.StopSignals, start_step: int,
             progress: bool) -> "LoopConcerns":
    """The concerns of a run whose steps start at `start_step`. Every host agrees here
    on a stop signal received while loading (it waits for the others), before the
    interval log's clock starts."""
    timers = GoodputTimers()
    evaluation = PeriodicEvaluation(run, writer, timers)
    saves = PeriodicCheckpoints(run, timers)
    stop = StopConditions(signals, run.train.num_steps)
    stop.before_first_step()
    log = IntervalLog(run, writer, timers, start_step, progress)
    profiler = profiling.Profiler(run.train.profile_steps, os.path.join(run.log_dir, "profile"))
    return cls(evaluation=evaluation, saves=saves, stop=stop, log=log, profiler=profiler)


def run_steps(run: PreparedRun, state: state_lib.TrainState, teacher_params,
              concerns: LoopConcerns, hung_run_check: watchdog_lib.Watchdog
              ) -> state_lib.TrainState:
  """Steps from the state's step to TrainConfig.num_steps, or until the hosts agree to
  stop; logs, evaluates and checkpoints on their cadences. -> the last state."""
  cfg, prog = run.train, run.program
  stop, log, profiler = concerns.stop, concerns.log, concerns.profiler
  rng = jax.random.key(cfg.seed + 1)
  start_step = int(state.step)
  for step_number in range(start_step, stop.end(start_step)):
    began = time.perf_counter()
    batch = partitioning.host_local_to_global(next(run.reader), prog.mesh, prog.rules,
                                              global_batch_size=cfg.batch_size)
    log.timers.add("data", began)
    profiler.before(step_number)
    state, metrics = prog.step(state, teacher_params, batch, rng)
    profiler.after(step_number, metrics)
    if step_number == start_step:
      jax.block_until_ready(metrics)
      logging.info("First step compiled and ran in %.1f s.", time.perf_counter() - began)
    log.add(metrics)
    done = step_number + 1
    stopping = stop.after_step(done)
    # The last step is saved after the loop, with the final evaluation's metrics.
    save_due = concerns.saves.due(done)
    if (save_due or stopping) and done % cfg.log_every:
      log.check_finite(done)  # never checkpoint past a bad step
    if log.due(done):
      log.write(done)
    log.advance()
    if stopping:
      break
    concerns.evaluation.after_step(state, done)
    if save_due:
      concerns.saves.save(state, done, metrics=concerns.evaluation.last or None)
    hung_run_check.progress(done)
  return state


def end_steps(run: PreparedRun, state: state_lib.TrainState, concerns: LoopConcerns) -> int:
  """After the last step (or the agreed stop): checks the steps since the last log,
  evaluates a run that reached its end, saves the final step with that evaluation's
  metrics and waits for the save. -> the final step."""
  concerns.log.close()
  concerns.profiler.close()
  final_step = int(state.step)
  concerns.log.check_finite(final_step)  # steps since the last check, if any
  if not concerns.stop.preempted and final_step == run.train.num_steps:
    concerns.evaluation.at_end(state, final_step)
  concerns.saves.save(state, final_step, metrics=concerns.evaluation.last or None)
  run.checkpointer.wait_until_finished()
  return final_step


def finish(run: PreparedRun, concerns: LoopConcerns, final_step: int, writer) -> dict:
  """Closes the checkpointer and the writer; the run's summary (see `train`), which
  process 0 also writes to `<workdir>/summary.json`."""
  run.checkpointer.close()
  writer.flush()
  preempted, stopped_by = concerns.stop.preempted, concerns.stop.stopped_by()
  if preempted:
    logging.warning("Stopped at step %d (%s): checkpoint saved in %s; run the same command "
                    "again to resume.", final_step, stopped_by or "another host was signalled",
                    run.checkpointer.directory)
  summary = {"mode": run.mode, "step": final_step, "preempted": preempted,
             "stopped_by": stopped_by, "exit_code": concerns.stop.exit_code(),
             "train": concerns.log.last, "eval": concerns.evaluation.last,
             "workdir": run.workdir}
  if jax.process_index() == 0:
    epath.Path(run.workdir, "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
