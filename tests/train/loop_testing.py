"""Tiny run settings shared by the loop and command-line tests."""

import os

from miniend_jax.data import local_corpus
from miniend_jax.train import checkpoints, loop, partitioning, state as state_lib

TINY_TRAIN = dict(inputs_length=32, targets_length=8, batch_size=8, log_every=2, eval_batches=2)


def shared_data_dir(tmp_path_factory) -> str:
  """The pydoc corpus and vocabulary, built once per test session."""
  root = str(tmp_path_factory.getbasetemp() / "pydoc_data")
  local_corpus.setup_pydoc_tasks(root)
  return root


def run(mode, workdir, data_dir, *, num_steps, save_every=2, mesh=None, recipe="miniend_d",
        train_settings=None, **model_kwargs):
  """loop.train with tiny settings; `train_settings`: more TrainConfig fields."""
  model_kwargs.setdefault("preset", "t5-v1_1-tiny")
  return loop.train(
      mode, workdir,
      train_config=loop.TrainConfig(num_steps=num_steps, data_dir=data_dir, **TINY_TRAIN,
                                    **(train_settings or {})),
      model=loop.ModelSetup(**model_kwargs),
      optimizer=state_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
      checkpoint=checkpoints.CheckpointConfig(save_interval_steps=save_every, async_save=False),
      mesh=mesh or partitioning.MeshConfig(data=-1), recipe=recipe, progress=False)


def final_params(workdir):
  return checkpoints.load_params_from_checkpoint(os.path.join(workdir, "checkpoints"))
