"""The run loop behind `miniend distill | pretrain | finetune | evaluate | export`.

One function per command. Each builds every config first and checks it
(recipe against the two models, vocabulary against the task, mesh against the
devices, checkpoints present), so a wrong setting fails before anything
compiles. Training then runs the single jitted step of `train/steps.py`,
checkpoints with orbax (state + each host's data-iterator position), resumes
from the latest good checkpoint, saves and exits on SIGTERM (TPU preemption),
and stops with a clear error on a non-finite loss, the last good checkpoint
untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Mapping

import gin
import jax
import numpy as np
import seqio
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.data import local_corpus, tasks as tasks_lib, vocab as vocab_lib
from miniend_jax.distill.recipe import Recipe, get_recipe
from miniend_jax.model import hf, presets, student as student_lib, t5
from miniend_jax.train import checkpoints, partitioning, state as state_lib, steps, writers

MODES = ("distill", "pretrain", "finetune")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What to train on and for how long.

  Attributes:
    task: a registered seqio task or mixture ("pydoc_span_corruption",
      "c4_span_corruption", "glue", "xsum", ...).
    inputs_length / targets_length: feature lengths.
    batch_size: global batch (split evenly over processes).
    num_steps: total training steps.
    seed: data order, span-corruption noise, dropout and initialisation.
    pack: pack several examples per row.
    log_every: steps between metric writes (and NaN checks).
    eval_every: steps between evaluations (0: only at the end).
    eval_batches: validation batches per evaluation (loss and token accuracy).
    eval_split: the split evaluated.
    data_dir: where the embedded pydoc corpus and vocabulary are built
      (default: the work directory's parent, so runs share them).
  """

  task: str = "pydoc_span_corruption"
  inputs_length: int = 128
  targets_length: int = 32
  batch_size: int = 8
  num_steps: int = 100
  seed: int = 0
  pack: bool = True
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  eval_split: str = "validation"
  data_dir: str | None = None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """Which models a run uses.

  Attributes:
    teacher: for distill: a Hugging Face directory or hub id, or a miniend
      checkpoint directory (a pretrain run's `checkpoints/`).
    teacher_dtype: teacher compute and storage dtype (frozen: bf16 halves memory).
    student_shape: for distill: a shape from `presets.STUDENT_SHAPES`, built with
      the teacher's vocabulary and family.
    student_init: "random" or "teacher_layers" (same width only).
    preset: for pretrain: a preset from `presets.MODEL_PRESETS`.
    overrides: T5Config fields to override (e.g. {"num_layers": 2}); for
      pretrain `vocab_size` defaults to the task vocabulary's (padded to 128).
    init_from: for finetune: a miniend checkpoint directory or a Hugging Face
      directory / hub id.
    dtype: the trained model's compute dtype (parameters stay float32).
  """

  teacher: str | None = None
  teacher_dtype: str = "bfloat16"
  student_shape: str = "6L-384H"
  student_init: str = "random"
  preset: str = "t5-v1_1-small"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_from: str | None = None
  dtype: str = "float32"


# ----------------------------------------------------------------------------
# Set-up helpers.


def load_model(source: str, **config_overrides) -> tuple[t5.T5Config, dict]:
  """(config, params) from a miniend checkpoint directory or a Hugging Face one / hub id."""
  path = epath.Path(source)
  if path.is_dir() and not (path / hf.CONFIG_NAME).exists():
    candidates = [source, os.path.join(source, "checkpoints")]
    for directory in candidates:
      if checkpoints.latest_step(directory) is not None:
        config = checkpoints.load_model_config(directory).replace(**config_overrides)
        return config, checkpoints.load_params_from_checkpoint(directory)
    raise checkpoints.NoCheckpointError(checkpoints.no_checkpoint_message(source))
  return hf.load_hf(source, **config_overrides)


def task_vocabulary(task_name: str, data_dir: str) -> seqio.Vocabulary:
  """The task's target vocabulary; builds and registers the pydoc tasks on demand."""
  if task_name.startswith("pydoc_"):
    local_corpus.setup_pydoc_tasks(data_dir)
  try:
    provider = seqio.get_mixture_or_task(task_name)
  except ValueError as e:
    raise ValueError(
        f"Unknown task or mixture {task_name!r}. Registered: "
        f"{sorted(seqio.TaskRegistry.names())[:40]} (and mixtures "
        f"{sorted(seqio.MixtureRegistry.names())}).") from e
  return provider.output_features["targets"].vocabulary


def check_vocabulary(config: t5.T5Config, vocabulary: seqio.Vocabulary, who: str) -> None:
  if vocabulary.vocab_size > config.vocab_size:
    raise ValueError(
        f"The {who} has vocab_size={config.vocab_size}, but the task's vocabulary has "
        f"{vocabulary.vocab_size} ids (with sentinels). Use a model trained with this "
        "vocabulary, or a task tokenised with the model's own spiece.model.")


def _recipe_from(value: str | Recipe) -> Recipe:
  return get_recipe(value) if isinstance(value, str) else value


@dataclasses.dataclass
class _Run:
  """Everything one training run set up (used by `train` and its tests)."""

  mode: str
  workdir: str
  train: TrainConfig
  config: t5.T5Config
  recipe: Recipe
  teacher_config: t5.T5Config | None
  teacher_params: Any
  vocabulary: seqio.Vocabulary
  init_params: Any


def prepare(mode: str, workdir: str, train: TrainConfig, model: ModelSetup,
            recipe: str | Recipe) -> _Run:
  """Builds and checks every config of a run; loads teacher / initial weights. Compiles nothing."""
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; one of {MODES}.")
  data_dir = train.data_dir or os.path.dirname(os.path.abspath(workdir))
  vocabulary = task_vocabulary(train.task, data_dir)
  teacher_config = teacher_params = init_params = None
  if mode == "distill":
    if not model.teacher:
      raise ValueError("distill needs a teacher: bind ModelSetup.teacher (a Hugging Face "
                       "directory or a miniend checkpoint directory), e.g. --teacher DIR.")
    teacher_config, teacher_params = load_model(model.teacher)
    teacher_config = teacher_config.replace(dtype=model.teacher_dtype, dropout_rate=0.0,
                                            param_dtype=model.teacher_dtype)
    check_vocabulary(teacher_config, vocabulary, "teacher")
    config = student_lib.student_config(teacher_config, model.student_shape, dtype=model.dtype,
                                        param_dtype="float32", **dict(model.overrides))
    recipe = _recipe_from(recipe)
    if model.student_init == "teacher_layers":
      init_params = student_lib.init_student(config, jax.random.key(train.seed),
                                             teacher_config=teacher_config,
                                             teacher_params=teacher_params)
    elif model.student_init != "random":
      raise ValueError(f"ModelSetup.student_init={model.student_init!r}: 'random' or "
                       "'teacher_layers'.")
  elif mode == "pretrain":
    overrides = {"vocab_size": vocab_lib.padded_vocab_size(vocabulary), **dict(model.overrides)}
    config = presets.get_model_config(model.preset, dtype=model.dtype, **overrides)
    recipe = get_recipe("scratch")
  else:
    if not model.init_from:
      raise ValueError("finetune needs initial weights: --init_from DIR (a distilled "
                       "student's workdir or checkpoints, or a Hugging Face directory).")
    config, init_params = load_model(model.init_from)
    config = config.replace(dtype=model.dtype, **dict(model.overrides))
    recipe = get_recipe("scratch")
  check_vocabulary(config, vocabulary, "student" if mode == "distill" else "model")
  recipe = recipe.resolve(teacher_config, config)  # raises on impossible recipes
  return _Run(mode, workdir, train, config, recipe, teacher_config, teacher_params, vocabulary,
              init_params)


def _dataset_iterator(train: TrainConfig, split: str, *, shuffle: bool, num_epochs=None,
                      seed=None):
  batch = train.batch_size // jax.process_count()
  dataset = tasks_lib.get_dataset(
      train.task, {"inputs": train.inputs_length, "targets": train.targets_length}, split,
      batch_size=batch, shuffle=shuffle, seed=train.seed if seed is None else seed,
      pack=train.pack, num_epochs=num_epochs)
  return tasks_lib.DatasetIterator(dataset)


class _PreemptionFlag:
  """Set by SIGTERM (what TPU VMs send before preemption); checked between steps."""

  def __init__(self):
    self.triggered = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self.triggered = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------
# Training.


@gin.configurable(denylist=["mode", "workdir"])
def train(mode: str, workdir: str, *, train_config: TrainConfig | None = None,
          model: ModelSetup | None = None,
          optimizer: state_lib.OptimizerConfig | None = None,
          checkpoint: checkpoints.CheckpointConfig | None = None,
          mesh: partitioning.MeshConfig | None = None,
          recipe: str | Recipe = "miniend_d", progress: bool = True) -> dict:
  """Runs (or resumes) a distill / pretrain / finetune job in `workdir`.

  The config objects default to their gin-configured instances (built here,
  at call time, so `TrainConfig.num_steps = ...` bindings apply).

  Returns:
    A summary: final step, last train metrics, last eval metrics, and whether
    the run was preempted.
  """
  train_config = train_config or TrainConfig()
  model = model or ModelSetup()
  optimizer = optimizer or state_lib.OptimizerConfig()
  checkpoint = checkpoint or checkpoints.CheckpointConfig()
  mesh = mesh or partitioning.MeshConfig()
  partitioning.maybe_initialize_distributed()
  run = prepare(mode, workdir, train_config, model, recipe)
  cfg = run.train
  if cfg.batch_size % jax.process_count():
    raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  device_mesh = partitioning.make_mesh(mesh)
  rules = mesh.logical_axis_rules
  if cfg.batch_size % (device_mesh.shape["data"] * device_mesh.shape["fsdp"]):
    raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} must divide evenly over the "
                     f"data x fsdp = {device_mesh.shape['data'] * device_mesh.shape['fsdp']} "
                     "data-parallel devices.")
  # The schedule counts optimizer updates; num_steps counts micro-batches.
  accum = optimizer.grad_accum_steps
  optimizer = optimizer.replace(total_steps=optimizer.total_steps or max(cfg.num_steps // accum, 1))
  schedule = state_lib.make_schedule(optimizer)
  tx = state_lib.make_optimizer(optimizer)
  extra_init = lambda rng: run.recipe.init_extra_params(rng, run.teacher_config, run.config)
  extra_specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(),
                             jax.eval_shape(extra_init, jax.random.key(0)))
  logical_specs = {"model": t5.param_logical_axes(run.config), "distill": extra_specs}

  if run.init_params is None:
    init_fn = lambda rng: {"model": t5.init_params(run.config, rng), "distill": extra_init(rng)}
  else:
    # Loaded weights enter as an argument (not baked into the program as constants).
    loaded = run.init_params
    init_fn = lambda rng, params: {"model": params, "distill": extra_init(rng)}
  init_args = ((jax.random.key(cfg.seed),) if run.init_params is None
               else (jax.random.key(cfg.seed), loaded))
  abstract = state_lib.abstract_train_state(init_fn, tx, device_mesh, rules, logical_specs,
                                            init_args)
  shardings = state_lib.state_shardings(abstract)

  teacher_params = teacher_sharding = None
  if run.recipe.needs_teacher:
    teacher_sharding = partitioning.logical_to_sharding(
        t5.param_logical_axes(run.teacher_config), device_mesh, rules)
    teacher_params = jax.device_put(
        jax.tree.map(lambda x: np.asarray(x).astype(run.teacher_config.param_dtype),
                     run.teacher_params), teacher_sharding)

  ckpt = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), checkpoint, model_config=run.config,
      metadata={"mode": mode, "task": cfg.task, "recipe": run.recipe.name,
                "teacher": model.teacher, "student_shape": model.student_shape,
                "vocabulary": getattr(run.vocabulary, "sentencepiece_model_file", None)})
  iterator = _dataset_iterator(cfg, "train", shuffle=True)
  input_state_root = os.path.join(workdir, "input_state")
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore_latest_good(target_state=abstract)
    iterator.restore(data_state["directory"])
    logging.info("Resumed from step %d of %s.", int(state.step), ckpt.directory)
  else:
    state = state_lib.create_sharded_state(init_fn, tx, device_mesh, rules, logical_specs,
                                           init_args)
  start_step = int(state.step)

  step_fn = steps.make_distill_step(run.config, run.recipe, mesh=device_mesh,
                                    state_sharding=shardings,
                                    teacher_config=run.teacher_config if run.recipe.needs_teacher else None,
                                    teacher_sharding=teacher_sharding, rules=rules,
                                    learning_rate_fn=lambda step: schedule(step // accum))
  eval_step = jax.jit(steps.make_eval_step(run.config))
  writer = writers.create_writer(os.path.join(workdir, "logs"))
  tokens_per_step = cfg.batch_size * (cfg.inputs_length + cfg.targets_length)
  flops = steps.step_flops(run.config, run.teacher_config if run.recipe.needs_teacher else None,
                           cfg.batch_size, cfg.inputs_length, cfg.targets_length)
  peak = steps.device_peak_flops(jax.devices()[0].device_kind)
  rng = jax.random.key(cfg.seed + 1)

  def save(step_number: int, metrics=None) -> None:
    directory = os.path.join(input_state_root, str(step_number))
    iterator.save(directory)
    ckpt.save(step_number, state, data_state={"directory": directory}, metrics=metrics,
              force=True)
    _prune_input_states(input_state_root, ckpt)

  def evaluate_now(step_number: int) -> dict:
    eval_iter = _dataset_iterator(cfg, cfg.eval_split, shuffle=False, num_epochs=1)
    sums = None
    for _, batch in zip(range(cfg.eval_batches), eval_iter):
      # Each host holds its own slice of the eval batch, as in training.
      batch = partitioning.host_local_to_global(batch, device_mesh, rules)
      with partitioning.mesh_context(device_mesh, rules):
        out = eval_step(state.params["model"], batch)
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    if sums is None:
      return {}
    sums = jax.device_get(sums)
    metrics = {"eval/loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
               "eval/token_accuracy": float(sums["correct_sum"] / max(sums["weight_sum"], 1.0))}
    writer.write_scalars(step_number, metrics)
    return metrics

  pending, last_train, last_eval = [], {}, {}
  preempted = False
  bar = _progress(progress, start_step, cfg.num_steps)
  interval_start, interval_steps = time.perf_counter(), 0
  with _PreemptionFlag() as preemption:
    for step_number in range(start_step, cfg.num_steps):
      if preemption.triggered:
        preempted = True
        break
      batch = partitioning.host_local_to_global(next(iterator), device_mesh, rules)
      state, metrics = step_fn(state, teacher_params, batch, rng)
      pending.append(metrics)
      interval_steps += 1
      done = step_number + 1
      # The last step is saved after the loop, with the final evaluation's metrics.
      save_due = done % checkpoint.save_interval_steps == 0 and done < cfg.num_steps
      if save_due and done % cfg.log_every:
        _check_finite(jax.device_get(pending), done)  # never checkpoint past a bad step
      if done % cfg.log_every == 0 or done == cfg.num_steps:
        last_train = _summarise(pending, done, writer)
        pending = []
        elapsed = time.perf_counter() - interval_start
        rates = {"perf/steps_per_s": interval_steps / elapsed,
                 "perf/tokens_per_s": interval_steps * tokens_per_step / elapsed}
        if peak:
          rates["perf/mfu"] = flops * interval_steps / elapsed / (peak * jax.device_count())
        writer.write_scalars(done, rates)
        last_train.update(rates)
        interval_start, interval_steps = time.perf_counter(), 0
        if bar is not None:
          bar.set_postfix(loss=f"{last_train['loss']:.4f}",
                          tok_s=f"{rates['perf/tokens_per_s']:.0f}")
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.num_steps:
        last_eval = evaluate_now(done)
      if save_due:
        save(done, metrics=last_eval or None)
  if bar is not None:
    bar.close()
  final_step = int(state.step)
  _check_finite(jax.device_get(pending), final_step)  # steps since the last check, if any
  if not preempted and final_step == cfg.num_steps:
    last_eval = evaluate_now(final_step) or last_eval
  save(final_step, metrics=last_eval or None)
  ckpt.wait_until_finished()
  ckpt.close()
  writer.flush()
  if preempted:
    logging.warning("Preempted at step %d: checkpoint saved in %s; run the same command again "
                    "to resume.", final_step, ckpt.directory)
  summary = {"mode": mode, "step": final_step, "preempted": preempted, "train": last_train,
             "eval": last_eval, "workdir": workdir}
  if jax.process_index() == 0:
    epath.Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


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


def _prune_input_states(root: str, ckpt: checkpoints.Checkpointer) -> None:
  """Deletes saved iterator positions whose checkpoint step is gone (never a kept one)."""
  root = epath.Path(root)
  if jax.process_index() != 0 or not root.is_dir():
    return
  keep = {str(s) for s in ckpt.all_steps()}
  for child in root.iterdir():
    if child.name.isdigit() and child.name not in keep and int(child.name) < max(
        map(int, keep or {"0"})):
      child.rmtree(missing_ok=True)


# ----------------------------------------------------------------------------
# Evaluate and export.


@gin.configurable(denylist=["workdir"])
def evaluate(workdir: str, *, checkpoint_dir: str | None = None, task: str | None = None,
             split: str = "validation", inputs_length: int = 128, targets_length: int = 32,
             batch_size: int = 8, num_examples: int | None = None, max_decode_length: int = 32,
             num_beams: int = 1, data_dir: str | None = None) -> dict:
  """Scores a checkpoint on a seqio task with its own metrics (ROUGE, accuracy, ...).

  Args:
    workdir: where results go (`<workdir>/eval/<task>.json`); also the default
      checkpoint directory (`<workdir>/checkpoints`).
    checkpoint_dir: a Checkpointer directory or a Hugging Face directory.
    task: the seqio task (default: the task the checkpoint was trained on).
  """
  source = checkpoint_dir or os.path.join(workdir, "checkpoints")
  if task is None:
    task = checkpoints.load_metadata(source).get("run", {}).get("task")
    if not task:
      raise ValueError("evaluate: pass --task (the checkpoint does not record one).")
  data_dir = data_dir or os.path.dirname(os.path.abspath(workdir))
  vocabulary = task_vocabulary(task, data_dir)
  config, params = load_model(source, dtype="float32")
  check_vocabulary(config, vocabulary, "model")
  params = jax.device_put(params)
  predict = jax.jit(steps.make_predict_fn(config, max_decode_length=max_decode_length,
                                          num_beams=num_beams))
  score = jax.jit(steps.make_score_fn(config))
  converter = seqio.EncDecFeatureConverter(pack=False)

  def run_model(fn, dataset):
    """[(index, output)] over an enumerated dataset of model features."""
    outputs = []
    for indices, features in dataset.batch(batch_size).as_numpy_iterator():
      batch = _model_batch(features, inputs_length, targets_length, batch_size)
      out = np.asarray(fn(params, batch))[:len(indices)]  # drop the padding rows
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
  results = {name: {k: _to_float(v) for k, v in metrics.items()}
             for name, metrics in all_metrics.result().items()}
  if jax.process_index() == 0:
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
           step: int | None = None, dtype: str | None = None) -> str:
  """Writes a checkpoint's model as a Hugging Face directory (with its tokenizer)."""
  source = checkpoint_dir or os.path.join(workdir, "checkpoints")
  config = checkpoints.load_model_config(source, step)
  params = checkpoints.load_params_from_checkpoint(source, step)
  hf.save_hf(config, params, out_dir, dtype=dtype)
  spm = checkpoints.load_metadata(source, step).get("run", {}).get("vocabulary")
  if spm and os.path.exists(spm):
    vocab_lib.save_hf_tokenizer(spm, out_dir)
  return out_dir
