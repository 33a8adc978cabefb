"""The run loop behind `miniend distill | pretrain | finetune | evaluate | export | convert`.

One function per command, the same program on one host and on many. `train`
first builds and checks everything that can be wrong (recipe against the two
models, vocabulary against the task, mesh against the devices, batch against
the mesh: `program.build_step_program`), so a wrong setting fails before
anything loads or compiles. Then:

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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Mapping

import gin
import jax
import numpy as np
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)
from jax.sharding import NamedSharding, PartitionSpec

from miniend_jax.data import sources, tasks as tasks_lib, vocab as vocab_lib
from miniend_jax.distill.recipe import Recipe
from miniend_jax.model import student as student_lib, t5
from miniend_jax.train import (checkpoints, host_memory, inputs, partitioning, preemption,
                               profiling, program, run_record, state as state_lib, steps,
                               watchdog as watchdog_lib, writers)
from miniend_jax.train.program import MODES, ModelSetup, TrainConfig  # noqa: F401  (gin + API)
from miniend_jax.train.setup import (check_vocabulary, default_data_dir, load_params,
                                     named_vocabulary, shard_datasets, task_vocabulary,
                                     use_compilation_cache, warn_if_schedule_mismatches)
# re-exported: users import them from here
from miniend_jax.train.evaluate import evaluate  # noqa: F401
from miniend_jax.train.export import convert, export  # noqa: F401
from miniend_jax.train.setup import load_model  # noqa: F401


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


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
  with preemption.StopSignals() as stop:
    return _train(mode, workdir, stop, train_config=train_config, model=model,
                  optimizer=optimizer, checkpoint=checkpoint, mesh=mesh, recipe=recipe,
                  progress=progress, allow_changes=allow_changes, watchdog=watchdog)


def _train(mode: str, workdir: str, stop: preemption.StopSignals, *, train_config, model,
           optimizer, checkpoint, mesh, recipe, progress, allow_changes, watchdog) -> dict:
  cfg = train_config or TrainConfig()
  model = model or ModelSetup()
  optimizer = optimizer or state_lib.OptimizerConfig()
  checkpoint = checkpoint or checkpoints.CheckpointConfig()
  mesh = mesh or partitioning.MeshConfig()
  watchdog = watchdog or watchdog_lib.WatchdogConfig()
  began = time.perf_counter()

  # -- Everything that can be wrong, before anything loads or compiles.
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory. Pass a directory "
                     "(it is created if missing).")
  vocabulary = named_vocabulary(cfg.vocabulary, model.teacher)
  task, vocabulary = task_vocabulary(tasks_lib.register_data_tasks(cfg, vocabulary),
                                     default_data_dir(cfg.data_dir), vocabulary)
  student_config, teacher_config = program.model_configs(
      mode, model, vocab_size=vocab_lib.padded_vocab_size(vocabulary))
  if teacher_config is not None:
    check_vocabulary(teacher_config, vocabulary, "teacher")
  check_vocabulary(student_config, vocabulary, "student" if mode == "distill" else "model")
  prog = program.build_step_program(mode, cfg, model, optimizer, mesh, recipe,
                                    student_config=student_config,
                                    teacher_config=teacher_config)
  device_mesh, rules = prog.mesh, prog.rules
  warn_if_schedule_mismatches(optimizer, cfg.num_steps)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = checkpoints.latest_step(ckpt_dir)  # reads only: nothing is created yet
  rows_by_process = partitioning.rows_by_process(device_mesh, cfg.batch_size, rules)
  saved = (inputs.saved_layout(os.path.join(ckpt_dir, str(latest), checkpoints.DATA_ITERATOR))
           if latest is not None else None)
  num_shards = cfg.data_shards or (saved or {}).get("num_shards") or len(
      {tuple(rows) for rows in rows_by_process.values()})
  layout = inputs.ShardLayout(cfg.batch_size, num_shards)
  if saved is not None:
    inputs.check_layout(os.path.join(ckpt_dir, str(latest), checkpoints.DATA_ITERATOR), layout)
  # The record holds the data shards in use, so leaving data_shards unset on a
  # resumed run (it then keeps the checkpoint's) is no change.
  settings = run_record.describe_run(
      mode, train=dataclasses.replace(cfg, data_shards=num_shards), model=model,
      optimizer=optimizer, checkpoint=checkpoint, mesh=mesh, recipe=prog.recipe,
      vocabulary=run_record.vocabulary_id(vocabulary))
  claim = lambda write: run_record.claim(workdir, settings, allow_changes=allow_changes,
                                         what=f"`miniend {mode}` with these settings",
                                         write=write)
  claim(False)  # refuses a directory made by another run before touching anything
  use_compilation_cache(cfg.compilation_cache_dir, workdir)
  ckpt = checkpoints.Checkpointer(
      ckpt_dir, checkpoint, model_config=prog.student_config,
      metadata={"mode": mode, "task": task, "recipe": prog.recipe.name,
                "teacher": model.teacher, "student_shape": model.student_shape,
                "vocabulary": vocab_lib.vocabulary_reference(vocabulary)})
  host_rows = rows_by_process[jax.process_index()]
  owned = [s for s, p in layout.owners(rows_by_process).items() if p == jax.process_index()]
  reader = inputs.GlobalBatchReader(shard_datasets(cfg, task, layout, "train", train=True),
                                    layout, host_rows, owned)

  logging.info("Run checked in %.1f s: %s on %d process(es) x %d devices, mesh %s, %d logical "
               "data shard(s), this host reads %s.", time.perf_counter() - began, mode,
               jax.process_count(), jax.local_device_count(), dict(device_mesh.shape),
               layout.num_shards, reader.shards)

  # -- Weights: straight into their shardings.
  began = time.perf_counter()
  teacher_params = None
  if prog.teacher_config is not None:
    teacher_params = load_params(model.teacher, prog.teacher_config, prog.teacher_shardings)
  model_shardings = prog.state_shardings.params["model"]
  if latest is not None:
    try:
      state, _ = ckpt.restore_latest_good(target_state=prog.abstract_state, data_iterator=reader)
    except Exception:
      ckpt.close()  # orbax's background threads would otherwise fail noisily at exit
      raise
    logging.info("Resumed from step %d of %s.", int(state.step), ckpt.directory)
  else:
    init_args = (jax.random.key(cfg.seed),)
    if mode == "finetune":
      init_args += (load_params(model.init_from, prog.student_config, model_shardings),)
    elif prog.init_from_params:  # a student initialised from the teacher's layers
      teacher = teacher_params
      if teacher is None:  # the recipe itself needs no teacher
        teacher_shardings = partitioning.logical_to_sharding(
            t5.param_logical_axes(teacher_config), device_mesh, rules)
        teacher = load_params(model.teacher, teacher_config, teacher_shardings)
      copy = jax.jit(lambda t: student_lib.init_student(
          prog.student_config, jax.random.key(cfg.seed), teacher_config=teacher_config,
          teacher_params=t), out_shardings=model_shardings)
      init_args += (copy(teacher),)
      del teacher
    state = state_lib.create_sharded_state(prog.init_fn, prog.tx, device_mesh, rules,
                                           prog.logical_specs, init_args)
  start_step = int(state.step)
  logging.info("Weights and state ready in %.1f s (step %d).", time.perf_counter() - began,
               start_step)
  if jax.process_index() == 0:  # the run is under way: record what made it
    changes = claim(True)
    if changes:
      logging.info("Continuing %s with changed settings: %s", workdir,
                   "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    epath.Path(workdir, f"{mode}_config.gin").write_text(gin.config_str())

  replicated = NamedSharding(device_mesh, PartitionSpec())
  eval_step = jax.jit(steps.make_eval_step(prog.student_config), out_shardings=replicated)
  log_dir = os.path.join(workdir, "logs")
  if jax.process_index() == 0:
    # Steps after the restored one (all, on a fresh start) will be logged again.
    writers.drop_rows_after(os.path.join(log_dir, "train_metrics.jsonl"), start_step)
  writer = writers.create_writer(log_dir)
  peak = steps.device_peak_flops(jax.devices()[0].device_kind)
  rng = jax.random.key(cfg.seed + 1)
  eval_reader = None
  timers = {"data": 0.0, "eval": 0.0, "checkpoint": 0.0}

  def save(step_number: int, metrics=None) -> None:
    began = time.perf_counter()
    ckpt.save(step_number, state, data_iterator=reader, metrics=metrics, force=True)
    timers["checkpoint"] += time.perf_counter() - began

  def evaluate_now(step_number: int) -> dict:
    nonlocal eval_reader
    began = time.perf_counter()
    if eval_reader is None:
      eval_reader = inputs.GlobalBatchReader(
          shard_datasets(cfg, task, layout, cfg.eval_split, train=False), layout, host_rows,
          pad_exhausted=True)
    eval_reader.reset()
    sums = None
    for _ in range(cfg.eval_batches):
      # Every host steps until the global batch is all padding: the eval step's
      # replicated sums are the same number on every host, so they stop together.
      batch = partitioning.host_local_to_global(next(eval_reader), device_mesh, rules,
                                                global_batch_size=cfg.batch_size)
      with partitioning.mesh_context(device_mesh, rules):
        out = jax.device_get(eval_step(state.params["model"], batch))
      if float(out["weight_sum"]) == 0:
        break
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    timers["eval"] += time.perf_counter() - began
    logging.info("Evaluated at step %d in %.1f s (%s tokens).", step_number,
                 time.perf_counter() - began, None if sums is None else int(sums["weight_sum"]))
    if sums is None:
      return {}
    metrics = {"eval/loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
               "eval/token_accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0)),
               "eval/tokens": float(sums["weight_sum"])}
    writer.write_scalars(step_number, metrics)
    return metrics

  pending, last_train, last_eval = [], {}, {}
  # A signal while loading: every host stops before compiling (nothing to save beyond
  # the checkpoint it started from; a fresh start saves its step 0).
  preempted = stop.agree_now()
  bar = _progress(progress, start_step, cfg.num_steps)
  interval_start, interval_steps = time.perf_counter(), 0
  profiler = profiling.Profiler(cfg.profile_steps, os.path.join(log_dir, "profile"))
  with watchdog_lib.Watchdog(watchdog) as hung_run_check:
    for step_number in range(start_step, start_step if preempted else cfg.num_steps):
      began = time.perf_counter()
      batch = partitioning.host_local_to_global(next(reader), device_mesh, rules,
                                                global_batch_size=cfg.batch_size)
      timers["data"] += time.perf_counter() - began
      profiler.before(step_number)
      state, metrics = prog.step(state, teacher_params, batch, rng)
      profiler.after(step_number, metrics)
      if step_number == start_step:
        jax.block_until_ready(metrics)
        logging.info("First step compiled and ran in %.1f s.", time.perf_counter() - began)
      pending.append(metrics)
      interval_steps += 1
      done = step_number + 1
      stopping = stop.should_stop() and done < cfg.num_steps
      # The last step is saved after the loop, with the final evaluation's metrics.
      save_due = done % checkpoint.save_interval_steps == 0 and done < cfg.num_steps
      if (save_due or stopping) and done % cfg.log_every:
        _check_finite(jax.device_get(pending), done)  # never checkpoint past a bad step
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        last_train = _summarise(pending, done, writer)
        pending = []
        rates = _rates(time.perf_counter() - interval_start, interval_steps, timers,
                       prog.tokens_per_step, prog.analytic_flops, peak)
        if cfg.skip_bad_records:
          rates["data/skipped_records"] = float(sources.skipped_records())
        writer.write_scalars(done, rates)
        last_train.update(rates)
        interval_start, interval_steps = time.perf_counter(), 0
        timers = dict.fromkeys(timers, 0.0)
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['loss']:.4f}",
                          tok_s=f"{rates['perf/tokens_per_s']:.0f}")
      if bar is not None:
        bar.update(1)
      if stopping:
        preempted = True
        break
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.num_steps:
        last_eval = evaluate_now(done)
      if save_due:
        save(done, metrics=last_eval or None)
      hung_run_check.progress(done)
    if bar is not None:
      bar.close()
    profiler.close()
    final_step = int(state.step)
    _check_finite(jax.device_get(pending), final_step)  # steps since the last check, if any
    if not preempted and final_step == cfg.num_steps:
      last_eval = evaluate_now(final_step) or last_eval
    save(final_step, metrics=last_eval or None)
    ckpt.wait_until_finished()
  ckpt.close()
  writer.flush()
  stopped_by = (stop.signal_name or "a signal to another host") if preempted else None
  if preempted:
    logging.warning("Stopped at step %d (%s): checkpoint saved in %s; run the same command "
                    "again to resume.", final_step, stopped_by or "another host was signalled",
                    ckpt.directory)
  summary = {"mode": mode, "step": final_step, "preempted": preempted,
             "stopped_by": stopped_by, "exit_code": stop.exit_code if preempted else 0,
             "train": last_train, "eval": last_eval, "workdir": workdir}
  if jax.process_index() == 0:
    epath.Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


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
