"""T5X checkpoints written the way t5x's `Checkpointer.save` lays them out (no torch).

A step directory `checkpoint_<step>/` with a zarr array (gzip chunks, written
with tensorstore) per parameter at `target.<path with dots>/`, and the
`checkpoint` msgpack of {"version": 3, "optimizer": {"target": ..., "state":
...}} whose leaves are each array's tensorstore spec with its path relative to
the step directory, or the array itself for small unpartitioned ones. Specs
come in both forms t5x has written: the kvstore path of tensorstore >= 0.1.14,
and the older top-level "path" with a GCS kvstore naming t5x's placeholder
bucket.
"""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts
from flax import serialization, traverse_util


def chunk_shape(shape, target_elements: int) -> list[int]:
  """A chunk shape that divides `shape`, with at most `target_elements` (halving,
  or dividing by the smallest factor, the largest dimension first)."""
  chunks = list(shape)
  while int(np.prod(chunks)) > target_elements:
    axis = int(np.argmax(chunks))
    factor = next((d for d in range(2, chunks[axis] + 1) if chunks[axis] % d == 0), None)
    if factor is None:
      break
    chunks[axis] //= factor
  return chunks


def write_t5x(directory, target: dict[str, np.ndarray], *, step: int = 1000,
              chunk_elements: int = 4096, inline: tuple[str, ...] = (),
              legacy_specs: bool = False) -> str:
  """Writes `target` ({"a/b/kernel": array}) as a T5X step directory; returns it.

  Args:
    chunk_elements: the zarr chunk size (t5x aims at 64 MiB; small here, so the
      test arrays have many chunks).
    inline: names stored in the msgpack itself instead of a zarr array.
    legacy_specs: write the pre-0.1.14 spec form (top-level path, GCS kvstore).
  """
  step_dir = os.path.join(os.fspath(directory), f"checkpoint_{step}")
  os.makedirs(step_dir, exist_ok=True)
  tree = {}
  for name, array in target.items():
    key = tuple(name.split("/"))
    if name in inline:
      tree[key] = array
      continue
    relative = "target." + name.replace("/", ".")
    metadata = {"compressor": {"id": "gzip"}, "shape": list(array.shape),
                "chunks": chunk_shape(array.shape, chunk_elements)}
    dtype = np.dtype(array.dtype).name
    ts.open({"driver": "zarr", "dtype": dtype, "metadata": metadata,
             "kvstore": {"driver": "file", "path": os.path.join(step_dir, relative)}},
            create=True, open=True).result().write(array).result()
    if legacy_specs:
      tree[key] = {"driver": "zarr", "dtype": dtype, "path": relative, "metadata": metadata,
                   "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket"}}
    else:
      tree[key] = ts.Spec({"driver": "zarr", "dtype": dtype, "metadata": metadata,
                           "kvstore": {"driver": "file", "path": relative}}).to_json()
  contents = {"version": 3, "optimizer": {
      "target": traverse_util.unflatten_dict(tree),
      "state": {"step": np.asarray(step, np.int32), "param_states": {}}}}
  with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  return step_dir
