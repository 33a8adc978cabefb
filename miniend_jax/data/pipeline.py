"""The input pipeline: a registered task or mixture as this host's batches, and
their savable position.

`get_dataset(...)` turns a seqio task or mixture (registered by `tasks`,
`local_corpus` or `hub_parquet`) into batches of the model features that
`seqio.EncDecFeatureConverter` defines (encoder_input_tokens,
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, when
packed, *_segment_ids / *_positions), each int32 [batch, length]. Every host
reads its own shard (`host_shard_info`); `DatasetIterator` saves and restores
its position.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np
import seqio
import tensorflow as tf

from miniend_jax.data import sources


def host_shard_info() -> seqio.ShardInfo:
  """This process's shard: index = jax.process_index(), of process_count()."""
  import jax  # pylint: disable=g-import-not-at-top

  return seqio.ShardInfo(
      index=jax.process_index(), num_shards=jax.process_count()
  )


def get_dataset(
    mixture_or_task_name: Union[str, seqio.Task, seqio.Mixture],
    task_feature_lengths: Mapping[str, int],
    split: str = "train",
    *,
    batch_size: Optional[int] = None,
    shuffle: bool = True,
    seed: Optional[int] = 0,
    shard_info: Optional[seqio.ShardInfo] = None,
    pack: bool = True,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
  """Batches of encoder-decoder model features for this host.

  Args:
    mixture_or_task_name: a registered task / mixture (or the object).
    task_feature_lengths: {"inputs": L_in, "targets": L_t}.
    split: dataset split.
    batch_size: per-host batch size (global batch / process count); None
      returns unbatched examples.
    shuffle: shuffle files and examples.
    seed: seed of shuffling and of random preprocessing (span corruption);
      the same seed gives the same data. None: nondeterministic.
    shard_info: which shard to read; default `host_shard_info()`, so every
      process reads a disjoint part of the data.
    pack: pack several examples per row (adds segment ids and positions).
    num_epochs: passes over the data; None repeats forever (training).
    drop_remainder: drop a last partial batch (keeps shapes static).

  Returns:
    tf.data.Dataset of dicts: encoder_input_tokens [B, L_in],
    decoder_input_tokens / decoder_target_tokens / decoder_loss_weights
    [B, L_t], and with `pack` encoder_segment_ids / encoder_positions
    [B, L_in], decoder_segment_ids / decoder_positions [B, L_t]; all int32.
  """
  if shard_info is None:
    shard_info = host_shard_info()
  # Without seqio's length assertions: the converter already trims and pads every feature
  # to its length (the element shapes below are static), and each assertion is another
  # tf.function to trace, ~0.6 s of every pipeline's construction on a 2-core CPU.
  converter = seqio.EncDecFeatureConverter(pack=pack, apply_length_check=False)
  dataset = seqio.get_dataset(
      mixture_or_task_name,
      task_feature_lengths=task_feature_lengths,
      feature_converter=converter,
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_info=shard_info,
      seed=seed,
      verbose=False,
  )
  if batch_size is not None:
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  return dataset.prefetch(tf.data.AUTOTUNE)


class DatasetIterator:
  """Numpy batches of a tf.data.Dataset with a savable position.

  The position is tf.data's own iterator state (including shuffle and
  prefetch buffers and random-op states), written with
  `tf.train.Checkpoint`; restoring it into an iterator over the same pipeline
  continues with exactly the next batch, neither repeating nor skipping.
  Several iterators can share a directory under different names.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch as numpy arrays (int32 [batch, length] features)."""
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      message = sources.bad_record_message(e)
      if message is None:
        raise
      raise sources.BadRecordError(message) from None
    return tf.nest.map_structure(lambda t: t.numpy(), batch)

  @staticmethod
  def state_prefix(directory: str, name: Optional[str] = None) -> str:
    """Checkpoint prefix of a saved position called `name` under `directory`
    (default: this process's, "input_iterator.process<index>")."""
    if name is None:
      import jax  # pylint: disable=g-import-not-at-top

      name = f"input_iterator.process{jax.process_index()}"
    return os.path.join(directory, name)

  def save(self, directory: str, name: Optional[str] = None) -> str:
    """Writes the current position to `directory`; returns the prefix."""
    tf.io.gfile.makedirs(directory)
    return self._checkpoint.write(self.state_prefix(directory, name))

  def restore(self, directory: str, name: Optional[str] = None):
    """Moves this iterator to the position saved in `directory` as `name`."""
    prefix = self.state_prefix(directory, name)
    if not tf.io.gfile.exists(prefix + ".index"):
      raise FileNotFoundError(
          f"No saved input position at {prefix} (expected {prefix}.index). "
          "Was it saved with DatasetIterator.save under this name?"
      )
    self._checkpoint.read(prefix).assert_consumed()
    return self
