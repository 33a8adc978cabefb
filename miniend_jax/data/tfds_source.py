"""TFDS as a seqio source that never downloads: prepared data only, and a
missing dataset explained (`TfdsDatasetNotPreparedError`: which dataset, which
data directory, the command that prepares it).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds


class TfdsDatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset a task needs is not in the TFDS data directory."""


class OfflineTfdsDataSource(seqio.TfdsDataSource):
  """A `seqio.TfdsDataSource` that never downloads and explains what is missing.

  seqio's source calls `tfds.load(download=True)`, which on an offline
  machine fails deep inside a download attempt. This one only reads prepared
  data (`read_only=True`) and turns a missing dataset into a
  `TfdsDatasetNotPreparedError` naming the dataset, the data directory and
  the command that prepares it.
  """

  def __init__(
      self,
      tfds_name: str,
      splits: Mapping[str, str],
      tfds_data_dir: Optional[str] = None,
  ):
    super().__init__(
        tfds_name=tfds_name,
        tfds_data_dir=tfds_data_dir,
        splits=dict(splits),
        read_only=True,
    )

  def not_prepared_message(self, split: str, cause: Exception) -> str:
    """Says which dataset and data_dir are missing and how to prepare them."""
    name = self.tfds_dataset.name
    data_dir = self.tfds_dataset.data_dir or os.environ.get(
        "TFDS_DATA_DIR", tfds.core.constants.DATA_DIR
    )
    dataset = name.split("/")[0].split(":")[0]
    message = (
        f"TFDS dataset '{name}' (split '{split}') is not prepared in data_dir "
        f"'{data_dir}' ({type(cause).__name__}: {cause}). miniend_jax never "
        "downloads data at run time. Prepare it once on a machine with "
        "internet access:\n"
        f"  python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{data_dir}')"
        ".download_and_prepare()\"\n"
        "then copy that data_dir to this machine and pass its path as "
        "tfds_data_dir= to register_tfds_tasks() (or set TFDS_DATA_DIR)."
    )
    if dataset == "c4":
      message += (
          "\nc4/en is built from Common Crawl with Apache Beam (hundreds of "
          "GB); see https://www.tensorflow.org/datasets/catalog/c4, or point "
          "tfds_data_dir at an existing prepared copy."
      )
    else:
      builder_cls = self.tfds_dataset.builder_cls(split)
      manual = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
      if manual:
        message += (
            f"\n'{dataset}' needs files downloaded by hand first (put them "
            f"in the manual_dir):\n{manual.strip()}"
        )
    return message

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **kwargs) -> tf.data.Dataset:
    """The TFDS examples of `split` (this shard's files when `shard_info`).

    Raises:
      TfdsDatasetNotPreparedError: if the dataset is not in the data_dir.
    """
    try:
      return super().get_dataset(
          split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
          **kwargs,
      )
    except (
        AssertionError,
        FileNotFoundError,
        tfds.core.registered.DatasetNotFoundError,
        tf.errors.NotFoundError,
    ) as e:
      raise TfdsDatasetNotPreparedError(
          self.not_prepared_message(split, e)
      ) from e

  def num_input_examples(self, split: str) -> Optional[int]:
    # Unknown (None) when TFDS has no metadata, e.g. before preparation or
    # under tfds.testing.mock_data; seqio then just skips in-memory caching.
    try:
      return super().num_input_examples(split)
    except Exception:  # pylint: disable=broad-except
      return None

  def list_shards(self, split: str) -> Sequence[str]:
    # Without metadata the file list is unknown; an empty list makes seqio
    # shard at the example level, and get_dataset reports what is missing.
    try:
      return super().list_shards(split)
    except Exception:  # pylint: disable=broad-except
      return []
