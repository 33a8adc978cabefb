"""Run set-up: what prepares a run before its loop, `evaluate` or `export` reads data or weights.

The vocabularies a run names (the task's own, the teacher's, ByT5's, a
SentencePiece file) and the task re-tokenised with them; the check that a
model's embedding holds the vocabulary; model and parameter loading from a
miniend, Hugging Face or T5X checkpoint (sharded: each host reads its slices);
where the embedded corpus is cached; JAX's persistent compilation cache; the
per-shard training and evaluation datasets; the warning about a learning-rate
schedule of another length than the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import seqio
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.data import local_corpus, tasks as tasks_lib, vocab as vocab_lib
from miniend_jax.model import hf, t5
from miniend_jax.train import checkpoints, inputs, program, state as state_lib
from miniend_jax.train.program import TrainConfig


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
    return tasks_lib.get_dataset(
        task, lengths, split, batch_size=layout.rows_per_shard, shuffle=train,
        seed=inputs.shard_seed(cfg.seed, shard),
        shard_info=seqio.ShardInfo(index=shard, num_shards=layout.num_shards), pack=cfg.pack,
        num_epochs=None if train else 1, drop_remainder=train)

  return make
