"""Global batches assembled from a fixed number of logical data shards.

A run reads its data as `num_shards` logical shards: shard s is the seqio
dataset with `ShardInfo(s, num_shards)` and a seed of its own, batched to
`global_batch_size / num_shards` rows. Global batch t is the concatenation of
every shard's t-th batch, in shard order. Nothing here depends on how many
hosts there are, so a run on 1, 2 or N hosts sees the same sequence of global
batches, and a checkpoint written on N hosts resumes exactly on M.

Which shards a host reads follows from the mesh: a host needs the rows its
devices hold (`partitioning.host_batch_rows`, by data-parallel coordinate), so
hosts of one model replica read the same shards and build the same rows. Each
shard's position is saved by one host (the lowest-numbered one that reads it)
into the checkpoint step being written, under a name that carries the shard
index, so any host layout can restore it.

This module wires data to meshes; it knows tf.data only through the
`DatasetIterator` of `data/pipeline.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Sequence

import numpy as np
from etils import epath

from miniend_jax.data import pipeline

LAYOUT_FILE = "layout.json"


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """How a global batch is cut into logical shards' rows."""

  global_batch_size: int
  num_shards: int

  def __post_init__(self):
    if self.num_shards < 1 or self.global_batch_size % self.num_shards:
      raise ValueError(
          f"TrainConfig.data_shards={self.num_shards} must be a positive divisor of the "
          f"global batch size {self.global_batch_size} (each logical shard gives "
          "batch_size / data_shards rows of every batch).")

  @property
  def rows_per_shard(self) -> int:
    return self.global_batch_size // self.num_shards

  def shards_for(self, row_ranges: Sequence[tuple[int, int]]) -> list[int]:
    """The shards whose rows intersect [start, stop) ranges of the global batch."""
    rows = self.rows_per_shard
    return sorted({s for start, stop in row_ranges for s in range(start // rows,
                                                                   (stop - 1) // rows + 1)})

  def owners(self, rows_by_process: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, int]:
    """Shard -> the process that saves its position (the lowest that reads it)."""
    owners: dict[int, int] = {}
    for process in sorted(rows_by_process):
      for shard in self.shards_for(rows_by_process[process]):
        owners.setdefault(shard, process)
    return owners

  def to_json(self) -> dict:
    return {"global_batch_size": self.global_batch_size, "num_shards": self.num_shards}


def shard_seed(seed: int, shard: int) -> int:
  """The seed of one logical shard: distinct shards draw distinct noise and order."""
  return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0] & 0x7FFFFFFF)


def shard_name(shard: int, num_shards: int) -> str:
  return f"shard{shard:05d}-of-{num_shards:05d}"


class GlobalBatchReader:
  """This host's rows of every global batch, read from the logical shards they live in.

    reader = GlobalBatchReader(make_dataset, ShardLayout(256, 16), host_rows, owned_shards)
    local = next(reader)      # numpy [rows this host holds, ...], in global row order
    reader.save(directory)    # the positions of the shards this host owns
    reader.restore(directory) # the positions of the shards this host reads

  With `pad_exhausted` (evaluation over one epoch), a shard that has run out
  gives all-zero rows (zero loss weight), and a partial last batch is padded:
  the reader never stops by itself, so every host can keep stepping until the
  hosts agree that all shards are done (a global batch of padding only).
  """

  def __init__(self, make_dataset: Callable[[int], "tf.data.Dataset"], layout: ShardLayout,
               host_rows: Sequence[tuple[int, int]], owned_shards: Sequence[int] = (), *,
               pad_exhausted: bool = False):
    """
    Args:
      make_dataset: shard index -> a tf.data.Dataset of that shard's batches of
        `layout.rows_per_shard` rows (partial last batches allowed with
        `pad_exhausted`).
      layout: the shard layout.
      host_rows: [start, stop) rows of the global batch this host holds.
      owned_shards: shards whose position this host saves.
      pad_exhausted: pad partial and missing batches with zeros instead of
        stopping.
    """
    self.layout = layout
    self.host_rows = list(host_rows)
    self.shards = layout.shards_for(self.host_rows)
    unknown = set(owned_shards) - set(self.shards)
    if unknown:
      raise ValueError(f"This host owns shards {sorted(unknown)} it does not read.")
    self.owned_shards = sorted(owned_shards)
    self._pad = pad_exhausted
    self._datasets = {s: make_dataset(s) for s in self.shards}
    self._iterators: dict[int, pipeline.DatasetIterator] = {}
    self._exhausted: set[int] = set()
    self.reset()

  def reset(self) -> None:
    """Starts every shard from its beginning (a new evaluation pass)."""
    self._iterators = {s: pipeline.DatasetIterator(d) for s, d in self._datasets.items()}
    self._exhausted = set()

  @property
  def exhausted(self) -> bool:
    """Whether every shard this host reads has run out (only with `pad_exhausted`)."""
    return len(self._exhausted) == len(self.shards)

  def _zeros(self, shard: int, rows: int) -> dict[str, np.ndarray]:
    spec = self._datasets[shard].element_spec
    return {k: np.zeros((rows,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype)
            for k, v in spec.items()}

  def _next_shard_batch(self, shard: int) -> dict[str, np.ndarray]:
    rows = self.layout.rows_per_shard
    if shard not in self._exhausted:
      try:
        batch = next(self._iterators[shard])
      except StopIteration:
        if not self._pad:
          raise
        self._exhausted.add(shard)
      else:
        short = rows - len(next(iter(batch.values())))
        if short and not self._pad:
          raise ValueError(f"Logical shard {shard} gave a batch of {rows - short} rows, "
                           f"expected {rows}.")
        if short:
          batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
                   for k, v in batch.items()}
        return batch
    return self._zeros(shard, rows)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next global batch's rows held by this host, concatenated in row order."""
    batches = {s: self._next_shard_batch(s) for s in self.shards}
    rows = self.layout.rows_per_shard
    pieces = []
    for start, stop in self.host_rows:
      for shard in self.layout.shards_for([(start, stop)]):
        lo, hi = max(start, shard * rows), min(stop, (shard + 1) * rows)
        pieces.append({k: v[lo - shard * rows:hi - shard * rows]
                       for k, v in batches[shard].items()})
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

  # -- Positions, inside a checkpoint step.

  def save(self, directory: str) -> None:
    """Writes the positions of the shards this host owns (and, on the host owning
    shard 0, the layout) into `directory`."""
    for shard in self.owned_shards:
      self._iterators[shard].save(directory, shard_name(shard, self.layout.num_shards))
    if 0 in self.owned_shards:
      epath.Path(directory, LAYOUT_FILE).write_text(json.dumps(self.layout.to_json()))

  def restore(self, directory: str) -> None:
    """Moves every shard this host reads to its saved position."""
    check_layout(directory, self.layout)
    for shard in self.shards:
      self._iterators[shard].restore(directory, shard_name(shard, self.layout.num_shards))


def saved_layout(directory: str) -> dict | None:
  """The layout a checkpoint's data positions were saved with (None if absent)."""
  path = epath.Path(directory, LAYOUT_FILE)
  return json.loads(path.read_text()) if path.exists() else None


def check_layout(directory: str, layout: ShardLayout) -> None:
  """Raises ValueError when a checkpoint's data positions cannot continue `layout`."""
  saved = saved_layout(directory)
  if saved is not None and saved != layout.to_json():
    raise ValueError(
        f"The checkpoint's data positions ({os.fspath(directory)}) were saved with "
        f"{saved['num_shards']} logical data shards and a global batch of "
        f"{saved['global_batch_size']}; this run has {layout.num_shards} and "
        f"{layout.global_batch_size}. Resume with TrainConfig.data_shards="
        f"{saved['num_shards']} and TrainConfig.batch_size={saved['global_batch_size']} "
        "(any number of hosts works), or start a new --workdir.")
