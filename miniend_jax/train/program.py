"""The program a run jits, built once for the run loop and for `miniend plan`.

`build_step_program` turns a run's settings into everything its training step
needs: the two model configs, the resolved recipe, the optimizer, the mesh,
the state's and the teacher's shardings, abstract (shape + sharding) inputs,
and the jitted step itself (`steps.make_distill_step`: the same function,
shardings and donation in both uses). The run loop then fills the abstract
inputs with real arrays; the planner lowers and compiles the step for a TPU
topology it does not have. Nothing here loads weights or data, so this module
imports neither seqio nor TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from miniend_jax.distill.named import get_recipe
from miniend_jax.distill.recipe import Recipe
from miniend_jax.model import hf, presets, student as student_lib, t5
from miniend_jax.model.config import ATTENTION_IMPLS
from miniend_jax.train import partitioning, state as state_lib, steps

MODES = ("distill", "pretrain", "finetune")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What to train on and for how long.

  Attributes:
    task: a registered seqio task or mixture ("pydoc_span_corruption",
      "c4_span_corruption", "glue", "xsum", ...).
    inputs_length / targets_length: feature lengths.
    batch_size: the global batch (rows per step over all hosts).
    num_steps: total training steps.
    seed: data order, span-corruption noise, dropout and initialisation.
    pack: pack several examples per row.
    log_every: steps between metric writes (and NaN checks).
    eval_every: steps between evaluations (0: only at the end).
    eval_batches: the most global validation batches per evaluation (loss and
      token accuracy); fewer when the split runs out first.
    eval_split: the split evaluated.
    data_dir: where the embedded pydoc corpus and its vocabulary are built
      and cached (default $MINIEND_DATA_DIR, else ~/.cache/miniend_jax; built
      once, shared by every run).
    data_shards: logical shards the data is read as (a divisor of batch_size).
      The sequence of global batches depends on it and never on the number of
      hosts, and each host reads only the shards its rows come from. None: one
      shard per host holding distinct rows when the run starts (1 on a single
      host, where every extra shard is an extra input pipeline to build),
      recorded in the checkpoint, so a resumed run keeps it on any number of
      hosts. Set it explicitly (at least the largest number of hosts the run
      may use) for the same batches from a fresh start on any number of hosts.
    profile_steps: steps to trace with `jax.profiler` (TensorBoard's profile
      plugin reads `<workdir>/logs/profile`); consecutive steps form one trace.
    compilation_cache_dir: JAX's persistent compilation cache (local or gs://;
      default `<workdir>/compilation_cache`, "" turns it off), so a resumed or
      preempted run does not compile again.
    vocabulary: None reads the task as registered. Otherwise the task is
      re-tokenised (`tasks.retokenized`) with: "teacher", the teacher
      checkpoint's own (its spiece.model, or ByT5's bytes), as mT5, umT5 and
      ByT5 teachers need; "byt5"; a Hugging Face checkpoint directory; or a
      SentencePiece `.model` file. Span corruption follows the vocabulary
      (ByT5: 20-byte mean spans; size targets_length with
      `tasks.span_corruption_feature_lengths(inputs, mean_noise_span_length=20)`).
    train_files / validation_files: glob patterns of corpus files (local,
      gs://, hf://...; .json/.jsonl/.txt, each optionally .gz, .parquet,
      .tfrecord): the run reads span corruption over them (task
      `tasks.FILES_TASK`) instead of `task`, streamed with exact positions
      (`data/sources.py`). Without validation_files the evaluation reads the
      train files.
    text_field: the text field of JSON records / parquet columns / tf.Examples
      (None: "text").
    skip_bad_records: skip (and count, metric `data/skipped_records`) records
      that are not JSON, lack the text field, or follow a truncated gzip,
      instead of stopping with exit status 3. A stopped run may resume with it
      turned on.
    hf_data_dir: a directory (local, gs://, or hf://datasets) holding the
      Hub's parquet copies of nyu-mll/glue, abisee/cnn_dailymail and
      EdinburghNLP/xsum: the glue_*, glue, cnn_dailymail and xsum tasks read
      them instead of TFDS (`data/hub_parquet.py`).
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
  data_shards: int | None = None
  profile_steps: tuple[int, ...] = ()
  compilation_cache_dir: str | None = None
  vocabulary: str | None = None
  train_files: str | None = None
  validation_files: str | None = None
  text_field: str | None = None
  skip_bad_records: bool = False
  hf_data_dir: str | None = None

  def __post_init__(self):
    for name in ("inputs_length", "targets_length", "batch_size", "num_steps", "log_every"):
      _check_int(self, name, minimum=1)
    for name in ("eval_every", "eval_batches", "seed"):
      _check_int(self, name, minimum=0)
    if self.data_shards is not None:
      _check_int(self, "data_shards", minimum=1)
    for name in ("task", "eval_split"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be a name.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """Which models a run uses.

  Attributes:
    teacher: for distill: a Hugging Face directory (local or gs://) or hub id,
      or a miniend checkpoint directory (a pretrain run's, or `miniend convert`).
    teacher_dtype: teacher compute and storage dtype (frozen: bf16 halves memory).
    student_shape: for distill: a shape from `presets.STUDENT_SHAPES`, built with
      the teacher's vocabulary and family.
    student_init: "random" or "teacher_layers" (same width only; copies the
      teacher's weights as loaded, in `teacher_dtype`).
    preset: for pretrain: a preset from `presets.MODEL_PRESETS`.
    overrides: T5Config fields to override (e.g. {"num_layers": 2}); for
      pretrain `vocab_size` defaults to the task vocabulary's (padded to 128).
    init_from: for finetune: a miniend checkpoint directory or a Hugging Face
      directory / hub id.
    dtype: the trained model's compute dtype (parameters stay float32).
    scan_layers: which models run their untapped layers under a scan (one
      compiled layer per stack: much faster compiles for deep models):
      ("teacher",), ("student",), both, or () for none. The frozen teacher
      gains most (no optimizer state; the 11B plan on v4-64 compiles in 214 s
      instead of 274 s and needs less HBM); a scanned student's checkpoints
      store stacked layers (export and decoding unstack them).
    attention_impl: the attention kernel of every model of the run
      (`T5Config.attention_impl`): "auto" (cuDNN flash attention on GPUs for
      bf16 / fp16 models, explicit elsewhere), "explicit", "xla" or "cudnn".
      The same math, so a resumed run may change it.
  """

  teacher: str | None = None
  teacher_dtype: str = "bfloat16"
  student_shape: str = "6L-384H"
  student_init: str = "random"
  preset: str = "t5-v1_1-small"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  init_from: str | None = None
  dtype: str = "float32"
  scan_layers: tuple[str, ...] = ()
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelSetup.attention_impl={self.attention_impl!r}: one of "
                       f"{ATTENTION_IMPLS}.")
    for name in ("teacher_dtype", "dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelSetup.{name}={getattr(self, name)!r}: 'float32', 'bfloat16' "
                         "or 'float16'.")
    if not isinstance(self.overrides, Mapping):
      raise ValueError(f"ModelSetup.overrides={self.overrides!r} must be a dict of T5Config "
                       "fields, e.g. {'dropout_rate': 0.0}.")
    self.scans("teacher")  # validates scan_layers

  def scans(self, which: str) -> dict:
    """{"scan_layers": True} when `which` ("teacher" / "student") scans, else {}."""
    unknown = set(self.scan_layers) - {"teacher", "student"}
    if unknown or isinstance(self.scan_layers, str):
      raise ValueError(f"ModelSetup.scan_layers={self.scan_layers!r}: a tuple of 'teacher' "
                       "and/or 'student', e.g. ('teacher',).")
    return {"scan_layers": True} if which in self.scan_layers else {}


def _check_int(config, name: str, *, minimum: int) -> None:
  value = getattr(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{type(config).__name__}.{name}={value!r} must be an integer >= {minimum}.")


def recipe_from(value: str | Recipe) -> Recipe:
  return get_recipe(value) if isinstance(value, str) else value


# ----------------------------------------------------------------------------
# Model configs without weights.


def is_miniend_checkpoint(source: str) -> bool:
  """Whether `source` is a miniend checkpoint directory (or a workdir holding one)."""
  from miniend_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(source)
  if not path.is_dir() or (path / hf.CONFIG_NAME).exists():
    return False
  return any(checkpoints.latest_step(d) is not None
             for d in (source, os.path.join(source, "checkpoints")))


def checkpoint_directory(source: str) -> str:
  """The Checkpointer directory of a miniend checkpoint or workdir."""
  from miniend_jax.train import (  # pylint: disable=import-outside-toplevel
      checkpoint_errors, checkpoints)
  for directory in (source, os.path.join(source, "checkpoints")):
    if checkpoints.latest_step(directory) is not None:
      return directory
  raise checkpoint_errors.NoCheckpointError(checkpoint_errors.no_checkpoint_message(source))


def model_config_of(source: str) -> t5.T5Config:
  """A model's config, read without its weights.

  `source`: a miniend checkpoint directory, a Hugging Face directory (local or
  gs://), a T5X checkpoint (Google's published ones by their path alone), a
  preset name ("t5-v1_1-xl"), or a hub id whose name is a preset
  ("google/t5-v1_1-xl", "google/t5-v1_1-xxl@refs/pr/2"); other hub ids are
  read from the hub's config.json.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hub, t5x, tensor_files  # pylint: disable=import-outside-toplevel
  preset = source if source in presets.MODEL_PRESETS else t5x.published_preset(source)
  if preset:  # no bucket or hub access needed
    return presets.MODEL_PRESETS[preset]
  path = epath.Path(os.path.expanduser(source))
  if path.is_dir() and not (path / hf.CONFIG_NAME).exists():
    if t5x.step_directory(path) is not None:
      return hf.read_hf_config(source)
    # Not a Hugging Face directory: a miniend checkpoint, or nothing usable.
    from miniend_jax.train import (  # pylint: disable=import-outside-toplevel
        checkpoint_errors, checkpoints)
    if not is_miniend_checkpoint(source):
      raise checkpoint_errors.NoCheckpointError(
          f"no checkpoint in {source}: "
          + tensor_files.describe(source, [p.name for p in path.iterdir()])
          + ", or a miniend checkpoint (a run's work directory, `miniend convert`'s output).")
    return checkpoints.load_model_config(checkpoint_directory(source))
  if not path.exists() and hub.parse(source) and hub.name(source) in presets.MODEL_PRESETS:
    return presets.MODEL_PRESETS[hub.name(source)]
  return hf.read_hf_config(source)


def _refuse_hub_ids_on_many_processes(*sources: str | None) -> None:
  """Hub ids make every host download the checkpoint: refused on several processes."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hub  # pylint: disable=import-outside-toplevel
  for source in sources:
    if source and hub.parse(source) and not epath.Path(os.path.expanduser(source)).exists():
      hub.refuse_on_many_processes(source)


def model_configs(mode: str, model: ModelSetup, *, vocab_size: int | None = None
                  ) -> tuple[t5.T5Config, t5.T5Config | None]:
  """(trained model's config, teacher's config or None) of a run, without weights.

  Args:
    vocab_size: pretrain: the task vocabulary's padded size (default: the
      preset's, unless `model.overrides` sets it).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; one of {MODES}.")
  # The trained model's settings; explicit `overrides` win.
  own = {**model.scans("student"), "attention_impl": model.attention_impl,
         **dict(model.overrides)}
  teacher_config = None
  _refuse_hub_ids_on_many_processes(model.teacher if mode == "distill" else None,
                                    model.init_from if mode == "finetune" else None)
  if mode == "distill":
    if not model.teacher:
      raise ValueError("distill needs a teacher: bind ModelSetup.teacher (a Hugging Face "
                       "directory or a miniend checkpoint directory), e.g. --teacher DIR.")
    teacher_config = model_config_of(model.teacher).replace(
        dtype=model.teacher_dtype, dropout_rate=0.0, param_dtype=model.teacher_dtype,
        scan_layers=bool(model.scans("teacher")), attention_impl=model.attention_impl)
    config = student_lib.student_config(teacher_config, model.student_shape, dtype=model.dtype,
                                        param_dtype="float32",
                                        **{"scan_layers": False, **own})
  elif mode == "pretrain":
    if vocab_size is not None:
      own.setdefault("vocab_size", vocab_size)
    config = presets.get_model_config(model.preset, dtype=model.dtype, **own)
  else:
    if not model.init_from:
      raise ValueError("finetune needs initial weights: --init_from DIR (a distilled "
                       "student's workdir or checkpoints, or a Hugging Face directory).")
    config = model_config_of(model.init_from).replace(dtype=model.dtype, param_dtype="float32",
                                                      **own)
  if model.student_init not in ("random", "teacher_layers"):
    raise ValueError(f"ModelSetup.student_init={model.student_init!r}: 'random' or "
                     "'teacher_layers'.")
  return config, teacher_config


# ----------------------------------------------------------------------------
# The step program.


def batch_features(train: TrainConfig) -> dict[str, tuple[int, int]]:
  """The [batch, length] shape of every feature a training batch carries."""
  b, lin, lt = train.batch_size, train.inputs_length, train.targets_length
  features = {"encoder_input_tokens": (b, lin), "decoder_input_tokens": (b, lt),
              "decoder_target_tokens": (b, lt), "decoder_loss_weights": (b, lt)}
  if train.pack:
    features.update(encoder_segment_ids=(b, lin), encoder_positions=(b, lin),
                    decoder_segment_ids=(b, lt), decoder_positions=(b, lt))
  return features


@dataclasses.dataclass
class StepProgram:
  """Everything one run's training step is made of (see the module docstring)."""

  mode: str
  train: TrainConfig
  optimizer: state_lib.OptimizerConfig  # total_steps resolved
  mesh: jax.sharding.Mesh
  rules: partitioning.LogicalRules
  student_config: t5.T5Config
  teacher_config: t5.T5Config | None  # None when the recipe needs no teacher
  recipe: Recipe  # resolved
  tx: Any
  schedule: Callable
  init_fn: Callable  # init_fn(rng) or init_fn(rng, params) -> {"model", "distill"} params
  init_from_params: bool  # whether init_fn takes loaded model params
  logical_specs: Any  # logical PartitionSpecs of the state's params
  abstract_state: state_lib.TrainState
  abstract_teacher: Any
  teacher_shardings: Any
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  abstract_rng: jax.ShapeDtypeStruct
  step: Callable  # step(state, teacher_params, batch, rng) -> (state, metrics)
  create_state: Callable  # create_state(*init_fn's args) -> the TrainState in its shardings
  analytic_flops: float
  tokens_per_step: int

  @property
  def state_shardings(self):
    return state_lib.state_shardings(self.abstract_state)

  def lower(self) -> jax.stages.Lowered:
    """The step lowered on the abstract inputs (what `miniend plan` compiles)."""
    return self.step.lower(self.abstract_state, self.abstract_teacher, self.abstract_batch,
                           self.abstract_rng)


def build_step_program(mode: str, train: TrainConfig, model: ModelSetup,
                       optimizer: state_lib.OptimizerConfig, mesh: partitioning.MeshConfig,
                       recipe: str | Recipe, *, devices=None,
                       student_config: t5.T5Config | None = None,
                       teacher_config: t5.T5Config | None = None,
                       vocab_size: int | None = None) -> StepProgram:
  """Builds (and checks) the step a run jits. Loads no weights, compiles nothing.

  Args:
    mode: "distill", "pretrain" or "finetune".
    train, model, optimizer, mesh: the run's settings.
    recipe: a recipe or its name (pretrain and finetune use "scratch").
    devices: the mesh's devices (default all; abstract TPU devices to plan).
    student_config, teacher_config: the configs when the caller already read
      them (the run loop); default `model_configs(mode, model)`.
    vocab_size: see `model_configs`.
  Raises:
    ValueError: settings that cannot run (mesh vs devices, batch vs mesh,
      recipe vs models, optimizer), before anything compiles.
  """
  if student_config is None:
    student_config, teacher_config = model_configs(mode, model, vocab_size=vocab_size)
  recipe = recipe_from(recipe) if mode == "distill" else get_recipe("scratch")
  recipe = recipe.resolve(teacher_config, student_config)  # raises on impossible recipes
  if not recipe.needs_teacher:
    teacher_config = None
  device_mesh = partitioning.make_mesh(mesh, devices)
  rules = mesh.logical_axis_rules
  data_parallel = device_mesh.shape["data"] * device_mesh.shape["fsdp"]
  if train.batch_size % data_parallel:
    raise ValueError(f"TrainConfig.batch_size={train.batch_size} must divide evenly over the "
                     f"data x fsdp = {data_parallel} data-parallel devices.")
  # The schedule counts optimizer updates; num_steps counts micro-batches.
  optimizer = optimizer.replace(total_steps=optimizer.total_steps
                                or max(train.num_steps // optimizer.grad_accum_steps, 1))
  init_from_params = mode == "finetune" or (mode == "distill"
                                            and model.student_init == "teacher_layers")
  parts = _step_parts(student_config, teacher_config, recipe, optimizer, device_mesh,
                      tuple(rules), tuple(batch_features(train).items()), init_from_params)
  flops = steps.step_flops(student_config, teacher_config, train.batch_size,
                           train.inputs_length, train.targets_length)
  return StepProgram(
      mode=mode, train=train, optimizer=optimizer, mesh=device_mesh, rules=rules,
      student_config=student_config, teacher_config=teacher_config, recipe=recipe,
      init_from_params=init_from_params, analytic_flops=flops,
      tokens_per_step=train.batch_size * (train.inputs_length + train.targets_length),
      **parts)


def _cached(maxsize: int):
  """`functools.lru_cache` that falls back to an uncached call for unhashable arguments
  (a recipe holding a list, say): the cache saves work, it never decides what runs."""
  def decorate(fn):
    cached = functools.lru_cache(maxsize=maxsize)(fn)

    @functools.wraps(fn)
    def call(*args):
      try:
        hash(args)
      except TypeError:
        return fn(*args)
      return cached(*args)

    call.cache_clear = cached.cache_clear
    call.cache_info = cached.cache_info
    return call
  return decorate


# One process often runs many runs of one shape: the quickstart's 16 distillations
# (8 recipes, each again for the second seed) and 36 finetunings of identical students, a
# sweep, a notebook. Equal settings give the very same jitted step, state initialiser,
# optimizer (a static field of the TrainState, so it must be the same object) and
# abstract inputs, so jax's cache skips the model's tracing and lowering, ~3-4 s a run
# on a 2-core CPU. Entries hold compiled programs; a few dozen small ones are cheap.
@_cached(maxsize=32)
def _step_parts(student_config: t5.T5Config, teacher_config: t5.T5Config | None,
                recipe: Recipe, optimizer: state_lib.OptimizerConfig,
                device_mesh: jax.sharding.Mesh, rules: tuple,
                features: tuple[tuple[str, tuple[int, int]], ...],
                init_from_params: bool) -> dict[str, Any]:
  """The StepProgram fields that depend only on the hashable arguments."""
  accum = optimizer.grad_accum_steps
  schedule = state_lib.make_schedule(optimizer)
  tx = state_lib.make_optimizer(optimizer)

  extra_init = lambda rng: recipe.init_extra_params(rng, teacher_config, student_config)
  extra_specs = jax.tree.map(lambda _: PartitionSpec(),
                             jax.eval_shape(extra_init, jax.random.key(0)))
  logical_specs = {"model": t5.param_logical_axes(student_config), "distill": extra_specs}
  rng_shape = jax.eval_shape(lambda: jax.random.key(0))
  from_params = lambda rng, params: {"model": params, "distill": extra_init(rng)}
  if init_from_params:
    init_fn = from_params
    init_args = (rng_shape, t5.param_shapes(student_config))
  else:
    init_fn = lambda rng: {"model": t5.init_params(student_config, rng),
                           "distill": extra_init(rng)}
    init_args = (rng_shape,)
  abstract_state = state_lib.abstract_train_state(init_fn, tx, device_mesh, rules, logical_specs,
                                                  init_args)

  abstract_teacher = teacher_shardings = None
  if teacher_config is not None:
    teacher_shardings = partitioning.logical_to_sharding(
        t5.param_logical_axes(teacher_config), device_mesh, rules)
    abstract_teacher = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(teacher_config.param_dtype),
                                           sharding=sh),
        t5.param_shapes(teacher_config), teacher_shardings)

  batch_sharding = partitioning.batch_sharding(device_mesh, rules)
  abstract_batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
                    for name, shape in features}
  replicated = NamedSharding(device_mesh, PartitionSpec())
  abstract_rng = jax.ShapeDtypeStruct(rng_shape.shape, rng_shape.dtype, sharding=replicated)

  step = steps.make_distill_step(
      student_config, recipe, mesh=device_mesh,
      state_sharding=state_lib.state_shardings(abstract_state), teacher_config=teacher_config,
      teacher_sharding=teacher_shardings, rules=rules,
      learning_rate_fn=lambda step: schedule(step // accum), grad_accum_steps=accum)
  return dict(tx=tx, schedule=schedule, init_fn=init_fn, logical_specs=logical_specs,
              abstract_state=abstract_state, abstract_teacher=abstract_teacher,
              teacher_shardings=teacher_shardings, abstract_batch=abstract_batch,
              abstract_rng=abstract_rng, step=step,
              create_state=_state_creator(student_config, from_params, tx, abstract_state,
                                          device_mesh, rules, init_from_params))


def _state_creator(student_config, from_params, tx, abstract_state, device_mesh, rules,
                   init_from_params: bool) -> Callable:
  """`create_state(rng[, params])`. A random student is drawn by its own program
  (`_jitted_model_init`), which every recipe of one student shape shares: on a CPU,
  compiling a model's random initialisation takes seconds (threefry for every
  parameter), a recipe's own parameters and the optimizer state a fraction of that."""
  create_from_params = state_lib.sharded_state_creator(from_params, tx, abstract_state, rules)
  if init_from_params:
    return create_from_params
  init_model = _jitted_model_init(student_config, device_mesh, rules)
  return lambda rng: create_from_params(rng, init_model(rng))


@functools.lru_cache(maxsize=8)
def _jitted_model_init(config: t5.T5Config, device_mesh: jax.sharding.Mesh,
                       rules: tuple) -> Callable:
  """`t5.init_params(config, rng)` jitted into the parameters' shardings."""
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), device_mesh,
                                               rules)
  jitted = jax.jit(functools.partial(t5.init_params, config), out_shardings=shardings)

  def init(rng):
    with partitioning.mesh_context(device_mesh, rules):
      return jitted(rng)

  return init
