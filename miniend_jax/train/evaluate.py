"""`miniend evaluate`: a checkpoint scored on a seqio task with the task's own metrics.

Every process of a multi-host job runs it: each global batch of examples is
sharded over hosts and devices like a training batch, predictions and scores
are gathered back, and the primary host computes seqio's metrics and writes
them to `<workdir>/eval/<task>.json`.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import gin
import jax
import numpy as np
import seqio
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.data import vocab as vocab_lib
from miniend_jax.model import t5
from miniend_jax.train import (checkpoint_errors, checkpoints, host_memory, partitioning,
                               program, steps)
from miniend_jax.train.setup import (check_vocabulary, default_data_dir, load_params,
                                     task_vocabulary)


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
    raise checkpoint_errors.NoCheckpointError(checkpoint_errors.no_checkpoint_message(source))
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
  predict, score = steps.jitted_decode_fns(config, device_mesh, max_decode_length, num_beams)
  converter = seqio.EncDecFeatureConverter(pack=False, apply_length_check=False)  # as pipeline.get_dataset
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
