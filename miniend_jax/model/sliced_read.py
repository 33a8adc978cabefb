"""Reading stored tensors into our parameters: on the host, or straight into shardings.

Every checkpoint format (safetensors, Flax msgpack, PyTorch .bin, T5X) gives
an `Entry` per parameter: the reader that holds it (`tensor_files.TensorFile`
interface: `tensors`, `read(name, box)`, `pieces(name, box, bytes)`), the
stored name and the `layouts.Layout` relating the two. This module is the one
place that turns entries into arrays:

- `read_host`: whole parameters as numpy arrays.
- `read_sharded`: jax.Arrays in the given shardings. Per parameter, each host
  reads the smallest stored box that holds every block its devices need, once
  (not once per device: under fsdp the sharded axis of q/k/v, wi and the
  embeddings is not the stored row axis, so per-device reads fetched nearly
  whole tensors once for each local device), cuts each device's block out of
  it and keeps nothing else. Reads run on a thread pool in pieces, several
  parameters ahead, bounded in bytes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from miniend_jax.model import layouts
from miniend_jax.model.layouts import Box, Layout


@dataclasses.dataclass(frozen=True)
class Entry:
  """Where one of our parameters is stored."""

  reader: Any  # a tensor_files.TensorFile (or anything with its interface)
  name: str
  layout: Layout


@dataclasses.dataclass
class ReadStats:
  """What a load read on this host: bytes fetched from storage, parameters, time."""

  bytes_read: int = 0
  parameters: int = 0
  seconds: float = 0.0


@dataclasses.dataclass
class _Plan:
  """One parameter's read on this host: its box of the stored tensor and the
  blocks (one per distinct device index) cut from it."""

  path: str
  entry: Entry
  shape: tuple[int, ...]
  box: Box
  blocks: dict  # block key -> (index, [devices])
  futures: list = dataclasses.field(default_factory=list)
  buffer: np.ndarray | None = None

  @property
  def nbytes(self) -> int:
    info = self.entry.reader.tensors[self.entry.name]
    return layouts.box_size(self.box) * info.dtype.itemsize


@functools.lru_cache(maxsize=16)
def flat_shapes(config) -> dict[str, tuple[int, ...]]:
  """{"encoder/layers_0/.../kernel": shape} of a T5Config's parameters, unrolled
  (the layout every checkpoint format stores). Cached: tracing the model is slow."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import params  # pylint: disable=import-outside-toplevel
  unrolled = config.replace(scan_layers=False) if config.scan_layers else config
  return {k: tuple(v.shape) for k, v in
          traverse_util.flatten_dict(params.param_shapes(unrolled), sep="/").items()}


def _plan(path: str, entry: Entry, shape, index_map: Mapping) -> _Plan:
  blocks = collections.OrderedDict()
  for device, index in index_map.items():
    index = layouts.normalize(index, shape)
    key = tuple((s.start, s.stop) for s in index)
    blocks.setdefault(key, (index, []))[1].append(device)
  boxes = [entry.layout.box(shape, index) for index, _ in blocks.values()]
  return _Plan(path, entry, tuple(shape), layouts.bounding_box(boxes), blocks)


def planned_bytes(entries: Mapping[str, Entry], shapes: Mapping[str, tuple[int, ...]],
                  shardings: Mapping[str, jax.sharding.Sharding], devices, *,
                  piece_bytes: int = 4 << 20) -> int:
  """Bytes `read_sharded` fetches on a host whose devices are `devices`, read from
  nothing but the checkpoint's headers (to size a pod's reads before renting it)."""
  devices, total = set(devices), 0
  for path, entry in entries.items():
    index_map = {d: i for d, i in shardings[path].devices_indices_map(tuple(shapes[path])).items()
                 if d in devices}
    plan = _plan(path, entry, shapes[path], index_map)
    total += sum(entry.reader.stored_bytes(entry.name, piece)
                 for piece in entry.reader.pieces(entry.name, plan.box, piece_bytes))
  return total


def _submit(plan: _Plan, pool, piece_bytes: int) -> None:
  reader, name = plan.entry.reader, plan.entry.name
  info = reader.tensors[name]
  plan.buffer = np.empty([s.stop - s.start for s in plan.box], info.dtype)

  def read_piece(piece: Box) -> int:
    reader.read(name, piece, out=plan.buffer[layouts.within(piece, plan.box)])
    return reader.stored_bytes(name, piece)

  plan.futures = [pool.submit(read_piece, p) for p in reader.pieces(name, plan.box, piece_bytes)]


def _run(plans: list[_Plan], place: Callable[[_Plan], None], *, workers: int,
         piece_bytes: int, ahead_bytes: int, stats: ReadStats) -> None:
  """Reads `plans` on a pool, running ahead of the one being placed by at most
  `ahead_bytes` of buffers, and calls `place` on each in order."""
  began = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="weights-read") as pool:
    submitted = 0
    for i, plan in enumerate(plans):
      ahead = sum(p.nbytes for p in plans[i + 1:submitted])
      while submitted < len(plans) and (submitted <= i
                                        or ahead + plans[submitted].nbytes <= ahead_bytes):
        if submitted > i:
          ahead += plans[submitted].nbytes
        _submit(plans[submitted], pool, piece_bytes)
        submitted += 1
      for future in plan.futures:
        stats.bytes_read += future.result()
      stats.parameters += 1
      place(plan)
      plan.buffer, plan.futures = None, []
  stats.seconds += time.perf_counter() - began


def _block(plan: _Plan, index, dtype) -> np.ndarray:
  box = plan.entry.layout.box(plan.shape, index)
  data = plan.buffer[layouts.within(box, plan.box)]
  return np.asarray(plan.entry.layout.block(data, plan.shape, index), dtype=dtype)


def read_host(entries: Mapping[str, Entry], shapes: Mapping[str, tuple[int, ...]], dtype, *,
              workers: int = 4, piece_bytes: int = 4 << 20, ahead_bytes: int = 64 << 20,
              stats: ReadStats | None = None) -> dict[str, np.ndarray]:
  """{path: whole parameter} as numpy arrays of `dtype`."""
  out = {}

  def place(plan: _Plan):
    (index, _), = plan.blocks.values()
    out[plan.path] = _block(plan, index, dtype)

  plans = [_plan(path, entry, shapes[path], {None: ()}) for path, entry in entries.items()]
  _run(plans, place, workers=workers, piece_bytes=piece_bytes, ahead_bytes=ahead_bytes,
       stats=stats or ReadStats())
  return out


def read_sharded(entries: Mapping[str, Entry], shapes: Mapping[str, tuple[int, ...]],
                 shardings: Mapping[str, jax.sharding.Sharding], dtype, *, workers: int = 4,
                 piece_bytes: int = 4 << 20, ahead_bytes: int = 64 << 20,
                 stats: ReadStats | None = None) -> dict[str, jax.Array]:
  """{path: jax.Array in shardings[path]}, each host reading its devices' part once.

  Args:
    entries: where each parameter is stored.
    shapes: each parameter's global shape.
    shardings: each parameter's sharding.
    dtype: the arrays' dtype (the cast happens on the host, block by block).
    workers, piece_bytes: parallel range reads of at most `piece_bytes` each.
    ahead_bytes: how far beyond the parameter being placed reads may run.
    stats: receives the bytes this host fetched (`ReadStats`).
  """
  out = {}
  stats = stats if stats is not None else ReadStats()

  def place(plan: _Plan):
    sharding = shardings[plan.path]
    placed = {}
    for index, devices in plan.blocks.values():  # one host copy of a block at a time
      block = _block(plan, index, dtype)
      placed.update({d: jax.device_put(block, d) for d in devices})
      del block
    arrays = [placed[d] for d in sharding.addressable_devices_indices_map(plan.shape)]
    out[plan.path] = jax.make_array_from_single_device_arrays(plan.shape, sharding, arrays)

  plans = [_plan(path, entry, shapes[path],
                 shardings[path].addressable_devices_indices_map(tuple(shapes[path])))
           for path, entry in entries.items()]
  _run(plans, place, workers=workers, piece_bytes=piece_bytes, ahead_bytes=ahead_bytes,
       stats=stats)
  logging.info("Read %d parameters (%.1f MB fetched by this host) in %.1f s.",
               stats.parameters, stats.bytes_read / 1e6, stats.seconds)
  return out
