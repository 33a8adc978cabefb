"""Run set-up: what prepares a run before its loop, `evaluate` or `export` reads data or weights.

`prepare_run` checks a training run's settings (everything that can be wrong,
before anything loads or compiles) and builds the frozen `PreparedRun` that
`loop.train`'s stages run on. The pieces it and the other commands use: the
vocabularies a run names (the task's own, the teacher's, ByT5's, a
SentencePiece file) and the task re-tokenised with them; the check that a
model's embedding holds the vocabulary; model and parameter loading from a
miniend, Hugging Face or T5X checkpoint (sharded: each host reads its slices);
where the embedded corpus is cached; JAX's persistent compilation cache; the
per-shard training and evaluation datasets; the warning about a learning-rate
schedule of another length than the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import seqio
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.data import local_corpus, pipeline, tasks as tasks_lib, vocab as vocab_lib
from miniend_jax.distill.recipe import Recipe
from miniend_jax.model import hf, t5
from miniend_jax.train import (checkpoint_items, checkpoints, inputs, partitioning, program,
                               run_record, state as state_lib, watchdog as watchdog_lib)
from miniend_jax.train.program import ModelSetup, TrainConfig


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


def warn_if_schedule_mismatches(optimizer: state_lib.OptimizerConfig, num_steps: int) -> None:
  """One line when an explicit OptimizerConfig.total_steps is not the run's length."""
  updates = max(num_steps // optimizer.grad_accum_steps, 1)
  if optimizer.total_steps is not None and optimizer.total_steps != updates:
    logging.warning(
        "OptimizerConfig.total_steps=%d but the run makes %d optimizer updates: the "
        "learning-rate schedule %s. Leave total_steps unset to follow --num_steps.",
        optimizer.total_steps, updates,
        "ends before the run" if optimizer.total_steps < updates else "never finishes its decay")


def use_compilation_cache(directory: str | None, workdir: str) -> None:
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


def shard_datasets(cfg: TrainConfig, task: str, layout: inputs.ShardLayout, split: str, *,
                    train: bool):
  """shard -> tf.data.Dataset of that logical shard's batches of `task`."""
  lengths = {"inputs": cfg.inputs_length, "targets": cfg.targets_length}

  def make(shard: int):
    return pipeline.get_dataset(
        task, lengths, split, batch_size=layout.rows_per_shard, shuffle=train,
        seed=inputs.shard_seed(cfg.seed, shard),
        shard_info=seqio.ShardInfo(index=shard, num_shards=layout.num_shards), pack=cfg.pack,
        num_epochs=None if train else 1, drop_remainder=train)

  return make


# ----------------------------------------------------------------------------
# Preparing a run: everything that can be wrong, before anything loads or compiles.


@dataclasses.dataclass(frozen=True)
class RunClaim:
  """The work directory's claim to a run's settings (`run_record.claim`)."""

  workdir: str
  mode: str
  settings: dict
  allow_changes: bool

  def __call__(self, write: bool) -> dict:
    """Refuses a directory made with other settings (unless allow_changes); with
    `write`, records these. -> the settings changed since the directory's record."""
    return run_record.claim(self.workdir, self.settings, allow_changes=self.allow_changes,
                            what=f"`miniend {self.mode}` with these settings", write=write)


@dataclasses.dataclass(frozen=True)
class PreparedRun:
  """A run checked and set up, before any weights load: its settings, its step
  program, its data layout and reader, and its checkpointer."""

  mode: str
  workdir: str
  train: TrainConfig
  model: ModelSetup
  checkpoint: checkpoints.CheckpointConfig
  watchdog: watchdog_lib.WatchdogConfig
  program: program.StepProgram
  teacher_config: t5.T5Config | None  # also when the recipe needs no teacher (program's None)
  task: str
  layout: inputs.ShardLayout
  host_rows: Any  # this host's rows of every global batch
  latest_step: int | None  # the checkpoint a resumed run starts from; None: a fresh start
  checkpointer: checkpoints.Checkpointer
  reader: inputs.GlobalBatchReader
  claim: RunClaim

  @property
  def log_dir(self) -> str:
    return os.path.join(self.workdir, "logs")


def prepare_run(mode: str, workdir: str, *, train_config, model, optimizer, checkpoint, mesh,
                recipe, allow_changes, watchdog) -> PreparedRun:
  """Checks the run's settings and builds what it reads and writes with; loads no
  weights and compiles nothing, and touches the work directory only to claim it
  when another run did not make it. Arguments as `train`'s."""
  cfg = train_config or TrainConfig()
  model = model or ModelSetup()
  optimizer = optimizer or state_lib.OptimizerConfig()
  checkpoint = checkpoint or checkpoints.CheckpointConfig()
  mesh = mesh or partitioning.MeshConfig()
  watchdog = watchdog or watchdog_lib.WatchdogConfig()
  began = time.perf_counter()
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise ValueError(f"--workdir {workdir} is a file, not a directory. Pass a directory "
                     "(it is created if missing).")
  task, vocabulary, prog, teacher_config = _check_models(mode, cfg, model, optimizer, mesh,
                                                         recipe)
  warn_if_schedule_mismatches(optimizer, cfg.num_steps)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = checkpoints.latest_step(ckpt_dir)  # reads only: nothing is created yet
  rows_by_process = partitioning.rows_by_process(prog.mesh, cfg.batch_size, prog.rules)
  layout = _shard_layout(cfg, ckpt_dir, latest, rows_by_process)
  # The record holds the data shards in use, so leaving data_shards unset on a
  # resumed run (it then keeps the checkpoint's) is no change.
  settings = run_record.describe_run(
      mode, train=dataclasses.replace(cfg, data_shards=layout.num_shards), model=model,
      optimizer=optimizer, checkpoint=checkpoint, mesh=mesh, recipe=prog.recipe,
      vocabulary=run_record.vocabulary_id(vocabulary))
  claim = RunClaim(workdir, mode, settings, allow_changes)
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
               jax.process_count(), jax.local_device_count(), dict(prog.mesh.shape),
               layout.num_shards, reader.shards)
  return PreparedRun(mode=mode, workdir=workdir, train=cfg, model=model, checkpoint=checkpoint,
                     watchdog=watchdog, program=prog, teacher_config=teacher_config, task=task,
                     layout=layout, host_rows=host_rows, latest_step=latest, checkpointer=ckpt,
                     reader=reader, claim=claim)


def _check_models(mode: str, cfg: TrainConfig, model: ModelSetup,
                  optimizer: state_lib.OptimizerConfig, mesh: partitioning.MeshConfig,
                  recipe: str | Recipe):
  """(task, vocabulary, step program, teacher config or None): the vocabulary against the
  task and both models, then the recipe, mesh and batch (`program.build_step_program`)."""
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
  return task, vocabulary, prog, teacher_config


def _shard_layout(cfg: TrainConfig, ckpt_dir: str, latest: int | None,
                  rows_by_process) -> inputs.ShardLayout:
  """The logical data shards: TrainConfig.data_shards, else the resumed checkpoint's, else
  one per host holding distinct rows; checked against the checkpoint's data position."""
  position = os.path.join(ckpt_dir, str(latest), checkpoint_items.DATA_ITERATOR)
  saved = inputs.saved_layout(position) if latest is not None else None
  num_shards = cfg.data_shards or (saved or {}).get("num_shards") or len(
      {tuple(rows) for rows in rows_by_process.values()})
  layout = inputs.ShardLayout(cfg.batch_size, num_shards)
  if saved is not None:
    inputs.check_layout(position, layout)
  return layout
