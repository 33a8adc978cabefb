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
from typing import Any, Mapping

import gin
import jax
import numpy as np
import seqio
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)
from jax.sharding import NamedSharding, PartitionSpec

from miniend_jax.data import local_corpus, sources, tasks as tasks_lib, vocab as vocab_lib
from miniend_jax.distill.recipe import Recipe
from miniend_jax.model import hf, student as student_lib, t5
from miniend_jax.train import (checkpoints, host_memory, inputs, partitioning, preemption,
                               profiling, program, run_record, state as state_lib, steps,
                               watchdog as watchdog_lib, writers)
from miniend_jax.train.program import MODES, ModelSetup, TrainConfig  # noqa: F401  (gin + API)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


# ----------------------------------------------------------------------------
# Set-up helpers.


def task_vocabulary(task_name: str, data_dir: str,
                    vocabulary: seqio.Vocabulary | None = None) -> tuple[str, seqio.Vocabulary]:
  """(task name, vocabulary) a run reads.

  Builds and registers the pydoc tasks on demand. With `vocabulary`, the task
  is re-tokenised with it (`tasks.retokenized`: `<task>.<tag>`); a name such
  as `pydoc_summary.byt5` (what such runs record) is re-derived on demand too.
  """
  base = task_name
  if task_name not in seqio.TaskRegistry.names() | seqio.MixtureRegistry.names():
    stem, _, tag = task_name.rpartition(".")
    if tag == vocab_lib.BYT5 and vocabulary is None:
      base, vocabulary = stem, vocab_lib.byt5_vocabulary()
    elif stem and vocabulary is not None and tag == tasks_lib.vocabulary_tag(vocabulary):
      base = stem
  if base.startswith("pydoc_"):
    local_corpus.setup_pydoc_tasks(data_dir)
  try:
    provider = seqio.get_mixture_or_task(base)
  except ValueError as e:
    raise ValueError(
        f"Unknown task or mixture {task_name!r}. Registered: "
        f"{sorted(seqio.TaskRegistry.names())[:40]} (and mixtures "
        f"{sorted(seqio.MixtureRegistry.names())}).") from e
  if vocabulary is None:
    return base, provider.output_features["targets"].vocabulary
  return tasks_lib.retokenized(base, vocabulary), vocabulary


def named_vocabulary(name: str | None, teacher: str | None) -> seqio.Vocabulary | None:
  """The vocabulary `TrainConfig.vocabulary` names (None: the task's own).

  "teacher": the teacher checkpoint's own (`vocab.checkpoint_vocabulary` of a
  Hugging Face directory, or what a miniend checkpoint recorded); "byt5"; a
  Hugging Face checkpoint directory; or a SentencePiece `.model` file.
  """
  if name is None:
    return None
  if name != "teacher":
    return vocab_lib.vocabulary_from_reference(os.path.expanduser(name))
  if not teacher:
    raise ValueError("TrainConfig.vocabulary='teacher' needs a teacher: set ModelSetup.teacher "
                     "(--teacher), or name the vocabulary itself.")
  if program.is_miniend_checkpoint(teacher):
    reference = checkpoints.load_metadata(program.checkpoint_directory(teacher)).get(
        "run", {}).get("vocabulary")
    if not reference:
      raise ValueError(f"The teacher checkpoint {teacher} records no vocabulary; set "
                       "TrainConfig.vocabulary to its spiece.model (or 'byt5').")
    return vocab_lib.vocabulary_from_reference(reference)
  path = os.path.expanduser(teacher)
  if not epath.Path(path).is_dir():
    raise ValueError(
        f"TrainConfig.vocabulary='teacher' reads the teacher's tokenizer files, but "
        f"{teacher!r} is not a checkpoint directory (a preset or hub id has none here). "
        "Point --teacher at the downloaded checkpoint, or set TrainConfig.vocabulary to "
        "its spiece.model (or 'byt5').")
  return vocab_lib.checkpoint_vocabulary(path)


def check_vocabulary(config: t5.T5Config, vocabulary: seqio.Vocabulary, who: str) -> None:
  if vocabulary.vocab_size > config.vocab_size:
    raise ValueError(
        f"The {who} has vocab_size={config.vocab_size}, but the task's vocabulary has "
        f"{vocabulary.vocab_size} ids (with sentinels). Use a model trained with this "
        "vocabulary, or tokenise the task with the model's own: TrainConfig.vocabulary = "
        "'teacher', 'byt5' or the model's spiece.model.")


def load_model(source: str, **config_overrides) -> tuple[t5.T5Config, dict]:
  """(config, host numpy params) from a miniend checkpoint directory, a Hugging Face
  one (any published format) / hub id, or a T5X checkpoint. For one host's worth of
  model; runs use `load_params`."""
  if program.is_miniend_checkpoint(source):
    directory = program.checkpoint_directory(source)
    config = checkpoints.load_model_config(directory).replace(**config_overrides)
    return config, checkpoints.load_params_from_checkpoint(directory)
  return hf.load_hf(source, **config_overrides)


def load_params(source: str, config: t5.T5Config, shardings) -> Any:
  """A model's parameters straight into `shardings`, in `config.param_dtype` and
  its layout (scanned or not, whatever the checkpoint's).

  A miniend checkpoint (e.g. from `miniend convert`) is restored by orbax into
  the shardings; a Hugging Face directory (local, gs://; safetensors, Flax
  msgpack or PyTorch .bin), hub id or T5X checkpoint is read slice by slice
  (`hf.load_hf_sharded`). Either way each host reads only what its devices hold.
  """
  if program.is_miniend_checkpoint(source):
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, np.dtype(config.param_dtype), sharding=sh),
        t5.param_shapes(config), shardings)
    return checkpoints.load_params_from_checkpoint(program.checkpoint_directory(source),
                                                   target_params=target)
  return hf.load_hf_sharded(source, shardings, config=config)[1]


def default_data_dir(data_dir: str | None) -> str:
  """Where the embedded pydoc corpus and its vocabulary are built and cached:
  `data_dir`, else $MINIEND_DATA_DIR, else ~/.cache/miniend_jax."""
  return (data_dir or os.environ.get("MINIEND_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "miniend_jax"))


def _warn_if_schedule_mismatches(optimizer: state_lib.OptimizerConfig, num_steps: int) -> None:
  """One line when an explicit OptimizerConfig.total_steps is not the run's length."""
  updates = max(num_steps // optimizer.grad_accum_steps, 1)
  if optimizer.total_steps is not None and optimizer.total_steps != updates:
    logging.warning(
        "OptimizerConfig.total_steps=%d but the run makes %d optimizer updates: the "
        "learning-rate schedule %s. Leave total_steps unset to follow --num_steps.",
        optimizer.total_steps, updates,
        "ends before the run" if optimizer.total_steps < updates else "never finishes its decay")


def _use_compilation_cache(directory: str | None, workdir: str) -> None:
  """Turns on JAX's persistent compilation cache, so a resumed run does not compile again.

  `directory` (TrainConfig.compilation_cache_dir): "" leaves the cache off; None
  keeps a cache this process already uses (JAX_COMPILATION_CACHE_DIR, the
  quickstart's, an earlier run's), else uses `<workdir>/compilation_cache`.
  """
  if directory == "":
    return
  if directory is None:
    if jax.config.jax_compilation_cache_dir:
      return
    directory = os.path.join(workdir, "compilation_cache")
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    # The cache binds to its directory at the first compile; rebind.
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.reset_cache()


def _shard_datasets(cfg: TrainConfig, task: str, layout: inputs.ShardLayout, split: str, *,
                    train: bool):
  """shard -> tf.data.Dataset of that logical shard's batches of `task`."""
  lengths = {"inputs": cfg.inputs_length, "targets": cfg.targets_length}

  def make(shard: int):
    return tasks_lib.get_dataset(
        task, lengths, split, batch_size=layout.rows_per_shard, shuffle=train,
        seed=inputs.shard_seed(cfg.seed, shard),
        shard_info=seqio.ShardInfo(index=shard, num_shards=layout.num_shards), pack=cfg.pack,
        num_epochs=None if train else 1, drop_remainder=train)

  return make


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
  _warn_if_schedule_mismatches(optimizer, cfg.num_steps)
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
  _use_compilation_cache(cfg.compilation_cache_dir, workdir)
  ckpt = checkpoints.Checkpointer(
      ckpt_dir, checkpoint, model_config=prog.student_config,
      metadata={"mode": mode, "task": task, "recipe": prog.recipe.name,
                "teacher": model.teacher, "student_shape": model.student_shape,
                "vocabulary": vocab_lib.vocabulary_reference(vocabulary)})
  host_rows = rows_by_process[jax.process_index()]
  owned = [s for s, p in layout.owners(rows_by_process).items() if p == jax.process_index()]
  reader = inputs.GlobalBatchReader(_shard_datasets(cfg, task, layout, "train", train=True),
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
          _shard_datasets(cfg, task, layout, cfg.eval_split, train=False), layout, host_rows,
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


# ----------------------------------------------------------------------------
# Evaluate and export.


@gin.configurable(denylist=["workdir"])
def evaluate(workdir: str, *, checkpoint_dir: str | None = None, task: str | None = None,
             split: str = "validation", inputs_length: int = 128, targets_length: int = 32,
             batch_size: int = 8, num_examples: int | None = None, max_decode_length: int = 32,
             num_beams: int = 1, data_dir: str | None = None,
             mesh: partitioning.MeshConfig | None = None) -> dict:
  """Scores a checkpoint on a seqio task with its own metrics (ROUGE, accuracy, ...).

  Every process of a multi-host job calls it. Each global batch of examples is
  sharded over the hosts and devices like training batches; predictions and
  scores are gathered back, and the primary host computes seqio's metrics.

  Args:
    workdir: where results go (`<workdir>/eval/<task>.json`); also the default
      checkpoint directory (`<workdir>/checkpoints`).
    checkpoint_dir: a Checkpointer directory or a Hugging Face directory.
    task: the seqio task (default: the task the checkpoint was trained on).
    batch_size: the global batch of examples decoded at once.
    mesh: default MeshConfig() (data parallel over all devices).
  """
  partitioning.maybe_initialize_distributed()
  host_memory.keep_freed_memory()
  source = checkpoint_dir or os.path.join(workdir, "checkpoints")
  if not epath.Path(source).exists():
    raise checkpoints.NoCheckpointError(checkpoints.no_checkpoint_message(source))
  recorded = {}
  if program.is_miniend_checkpoint(source):
    recorded = checkpoints.load_metadata(program.checkpoint_directory(source)).get("run", {})
  task = task or recorded.get("task")
  if not task:
    raise ValueError("evaluate: pass --task (the checkpoint does not record one).")
  # The model reads the vocabulary it was trained with (e.g. ByT5's bytes).
  reference = recorded.get("vocabulary")
  own = (vocab_lib.vocabulary_from_reference(reference)
         if reference == vocab_lib.BYT5 or (reference and epath.Path(reference).exists())
         else None)
  task, vocabulary = task_vocabulary(task, default_data_dir(data_dir), own)
  config = program.model_config_of(source).replace(dtype="float32", param_dtype="float32")
  check_vocabulary(config, vocabulary, "model")
  mesh = mesh or partitioning.MeshConfig()
  device_mesh, rules = partitioning.make_mesh(mesh), mesh.logical_axis_rules
  data_parallel = device_mesh.shape["data"] * device_mesh.shape["fsdp"]
  if batch_size % data_parallel:
    raise ValueError(f"evaluate: batch_size={batch_size} must divide evenly over the "
                     f"data x fsdp = {data_parallel} data-parallel devices.")
  params = load_params(source, config, partitioning.logical_to_sharding(
      t5.param_logical_axes(config), device_mesh, rules))
  replicated = NamedSharding(device_mesh, PartitionSpec())
  predict = jax.jit(steps.make_predict_fn(config, max_decode_length=max_decode_length,
                                          num_beams=num_beams), out_shardings=replicated)
  score = jax.jit(steps.make_score_fn(config), out_shardings=replicated)
  converter = seqio.EncDecFeatureConverter(pack=False)
  rows = partitioning.host_batch_rows(device_mesh, batch_size, rules)

  def run_model(fn, dataset):
    """[(index, output)] over an enumerated dataset of model features (the same on
    every host: each feeds its rows of each batch)."""
    outputs = []
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
      batch = _model_batch(features, inputs_length, targets_length, batch_size)
      local = {k: np.concatenate([v[a:b] for a, b in rows]) for k, v in batch.items()}
      global_batch = partitioning.host_local_to_global(local, device_mesh, rules,
                                                       global_batch_size=batch_size)
      with partitioning.mesh_context(device_mesh, rules):
        out = fn(params, global_batch)
      out = np.asarray(out.addressable_data(0))[:len(indices)]  # drop the padding rows
      outputs.extend(zip(indices.tolist(), out.tolist()))
    return outputs

  evaluator = seqio.Evaluator(
      mixture_or_task_name=task, feature_converter=converter, eval_split=split,
      use_cached=False, seed=0, num_examples=num_examples,
      sequence_length={"inputs": inputs_length, "targets": targets_length}, logger_cls=())
  all_metrics, _ = evaluator.evaluate(
      compute_metrics=jax.process_index() == 0,
      predict_fn=lambda ds: run_model(predict, ds),
      score_fn=lambda ds: run_model(score, ds))
  results = {}
  if jax.process_index() == 0:
    results = {name: {k: _to_float(v) for k, v in metrics.items()}
               for name, metrics in all_metrics.result().items()}
    out_dir = epath.Path(workdir, "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{task}.json").write_text(json.dumps(results, indent=2))
  return results


def _model_batch(features: Mapping[str, np.ndarray], inputs_length: int, targets_length: int,
                 batch_size: int):
  """The evaluator's converted features padded to static [batch_size, length] (one compile)."""
  def pad(x, length):
    x = np.asarray(x)[:, :length]
    return np.pad(x, ((0, batch_size - x.shape[0]), (0, length - x.shape[1]))).astype(np.int32)
  return {"encoder_input_tokens": pad(features["encoder_input_tokens"], inputs_length),
          "decoder_input_tokens": pad(features["decoder_input_tokens"], targets_length),
          "decoder_target_tokens": pad(features["decoder_target_tokens"], targets_length)}


def _to_float(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


@gin.configurable(denylist=["workdir", "out_dir"])
def export(workdir: str, out_dir: str, *, checkpoint_dir: str | None = None,
           step: int | None = None, dtype: str | None = None, overwrite: bool = False) -> str:
  """Writes a checkpoint's model as a Hugging Face directory (with its tokenizer).

  `out_dir` must be new or empty unless `overwrite`, in which case its old
  contents are replaced whole (no stale files stay). The export is written
  into a temporary sibling directory and renamed into place, so a failed
  export leaves `out_dir` as it was.

  transformers 5 forces `tie_word_embeddings=True` on every T5 config (it reads
  a stored `false` only as "do not rescale the head"), so loading any T5 v1.1
  model with its separate output head, ours or Google's, logs that it will
  "NOT tie" the two: the head is loaded as stored, as the parity tests check.
  """
  target = epath.Path(out_dir)
  if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
    raise FileExistsError(f"--out_dir {out_dir} exists and is not empty. Pass --overwrite "
                          "to replace its contents, or choose a new directory.")
  source = checkpoint_dir or os.path.join(workdir, "checkpoints")
  config = checkpoints.load_model_config(source, step)
  params = checkpoints.load_params_from_checkpoint(source, step)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  hf.save_hf(config, params, os.fspath(tmp), dtype=dtype)
  vocabulary = checkpoints.load_metadata(source, step).get("run", {}).get("vocabulary")
  if vocabulary == vocab_lib.BYT5 or (vocabulary and epath.Path(vocabulary).exists()):
    vocab_lib.save_hf_tokenizer(vocabulary, os.fspath(tmp))
  _replace_directory(tmp, target)
  return out_dir


def _replace_directory(new: epath.Path, target: epath.Path) -> None:
  """Puts the finished directory `new` at `target`, replacing what is there. A
  local directory is swapped by renames (never half old, half new); object stores
  have no directory rename, so there the files move one by one once all are
  written, config.json last."""
  if "://" not in os.fspath(target):
    if target.exists():
      old = target.parent / f".{target.name}.old-{os.getpid()}"
      target.rename(old)
      new.rename(target)
      old.rmtree() if old.is_dir() else old.unlink()
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      new.rename(target)
    return
  if target.exists():
    target.rmtree() if target.is_dir() else target.unlink()
  target.mkdir(parents=True, exist_ok=True)
  for path in sorted(new.iterdir(), key=lambda p: p.name == hf.CONFIG_NAME):
    path.rename(target / path.name)
  new.rmtree()


@gin.configurable(denylist=["source", "out_dir"])
def convert(source: str, out_dir: str, *, dtype: str | None = None,
            mesh: partitioning.MeshConfig | None = None, chunk_bytes: int = 2 << 20) -> str:
  """Writes a teacher as a miniend (orbax) checkpoint.

  Pods then restore the teacher in parallel, every host reading only its own
  slices with tensorstore: convert once, to a bucket, and pass the result as
  `--teacher`. Every process of a multi-host job calls it; the weights are
  loaded sharded (fully sharded over all devices by default), so no host holds
  the whole model. A hub id is converted on one process (a job of several
  refuses it: each host would download it).

  Args:
    source: a Hugging Face directory (local or gs://; safetensors, Flax msgpack
      or PyTorch .bin), a hub id (`ID@REVISION` allowed) or a T5X checkpoint.
    out_dir: the checkpoint directory to create (local or gs://).
    dtype: store the weights in this dtype (default: as stored).
    chunk_bytes: the stored chunks' size. Whatever mesh converts, a pod's host
      then reads little more than its own shards (one chunk per array, what a
      single process writes by default, made every host read whole arrays).
  Returns:
    out_dir.
  """
  partitioning.maybe_initialize_distributed()
  if checkpoints.latest_step(out_dir) is not None:
    raise FileExistsError(f"{out_dir} already holds a checkpoint; pick a new directory.")
  checkpoint, config = hf.open_checkpoint(source, **({"param_dtype": dtype} if dtype else {}))
  mesh = mesh or partitioning.MeshConfig(data=1, fsdp=-1)
  device_mesh = partitioning.make_mesh(mesh)
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), device_mesh,
                                               mesh.logical_axis_rules)
  _, params = hf.load_hf_sharded(checkpoint, shardings, config=config)
  with checkpoints.Checkpointer(out_dir, checkpoints.CheckpointConfig(async_save=False),
                                model_config=config, metadata={"converted_from": source}) as ckpt:
    ckpt.save(0, {"params": params}, force=True, chunk_bytes=chunk_bytes)
  if jax.process_index() == 0:
    hf.copy_tokenizer_files(checkpoint.directory, out_dir)
  return out_dir
