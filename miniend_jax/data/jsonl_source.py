"""JSON-lines files read whole into memory as a seqio source (`JsonlDataSource`),
and the JSONL record parsing it shares with its callers: errors name the file
and line. For local corpora up to a few GB; `sources.FileSource` streams larger ones.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from miniend_jax.data import sources


def parse_jsonl_record(path: str, line_number: int, line: str,
                       fields: Sequence[str]) -> dict:
  """One JSONL line as a dict whose `fields` are strings; errors name the line."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}:{line_number} is not valid JSON ({e}); JSONL needs "
        "one JSON object per line."
    ) from None
  if not isinstance(record, dict) or not all(
      isinstance(record.get(field), str) for field in fields
  ):
    wanted = (f"a string {fields[0]!r} field" if len(fields) == 1
              else "string fields " + ", ".join(map(repr, fields)))
    raise ValueError(f"{path}:{line_number}: expected a JSON object with {wanted}.")
  return record


def read_jsonl_files(
    files: Sequence[str], fields: Sequence[str]
) -> dict[str, list[str]]:
  """The string `fields` of every record of JSONL `files`, as columns."""
  columns = {field: [] for field in fields}
  for path in files:
    with tf.io.gfile.GFile(path, "r") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        record = parse_jsonl_record(path, line_number, line, fields)
        for field in fields:
          columns[field].append(record[field])
  return columns


class JsonlDataSource(seqio.DataSource):
  """Reads string fields of JSON-lines files (one JSON object per line).

  The files of a split are read into memory when the dataset is built, which
  keeps the tf.data pipeline free of Python ops: fully deterministic and its
  iterator checkpointable. Meant for local corpora up to a few GB; convert
  larger ones to TFRecord (`span_corruption_task(file_format="tfrecord")`).
  """

  def __init__(
      self,
      split_to_filepattern: Mapping[str, Union[str, Sequence[str]]],
      fields: Sequence[str] = ("text",),
  ):
    self._split_to_filepattern = dict(split_to_filepattern)
    self._fields = tuple(fields)
    super().__init__(splits=self._split_to_filepattern.keys())

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # by files, or by records when files are fewer than shards

  def list_shards(self, split: str) -> Sequence[str]:
    return seqio.utils.list_files(self._split_to_filepattern[split])

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **unused_kwargs) -> tf.data.Dataset:
    """Examples {field: tf.string []} of `split`, in file then line order.

    Args:
      split: a split of `split_to_filepattern`.
      shuffle: shuffle this shard's file order (seqio shuffles the examples).
      seed: seed of the file order.
      shard_info: which shard: every num_shards-th file of one order shared by
        all shards, or every num_shards-th record when there are fewer files
        (`sources.shard_files`), so shards are disjoint whatever their seeds.
    """
    files = list(self.list_shards(split))
    if not files:
      raise FileNotFoundError(
          f"No file matches {self._split_to_filepattern[split]!r} (split "
          f"{split!r})."
      )
    indices, stride, phase = sources.shard_files(len(files), shard_info)
    files = [files[i] for i in indices]
    if shuffle:
      files = [files[i] for i in np.random.RandomState(seed).permutation(
          len(files))]
    columns = {field: [] for field in self._fields}
    for path in files:  # records strided within each file: independent of the order
      for field, values in read_jsonl_files([path], self._fields).items():
        columns[field] += values[phase::stride]
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.string, shape=[len(v)])
         for k, v in columns.items()}
    )
