"""One process of the teacher-loading test: load a Hugging Face checkpoint into an fsdp mesh.

  python -m tests.train.teacher_load_worker --checkpoint DIR --out OUT.json
      [--num_processes N --process_id I --port P] [--impl sharded|host] [--t5x DIR]

Measures this process's peak RSS growth and the bytes it read while loading
(VmHWM after, reset just before, minus VmRSS before), then checks every shard
it holds against the file, read independently. With --t5x, also loads that T5X
checkpoint sliced and checks its shards the same way. On several processes it
also records what a hub id gets (a refusal).
"""

import argparse
import json
import os

from tests.xla_testing import xla_flags


def _status(field: str) -> int:
  """A /proc/self/status memory field in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--impl", choices=("sharded", "host"), default="sharded")
  parser.add_argument("--t5x")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = xla_flags(8 // args.num_processes)
  if args.num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}",
                      JAX_NUM_PROCESSES=str(args.num_processes),
                      JAX_PROCESS_ID=str(args.process_id))

  import jax  # pylint: disable=import-outside-toplevel

  from miniend_jax.model import hf, sliced_read, t5  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import partitioning  # pylint: disable=import-outside-toplevel

  partitioning.maybe_initialize_distributed()
  mesh_config = partitioning.MeshConfig(data=1, fsdp=-1)
  mesh = partitioning.make_mesh(mesh_config)
  config = hf.read_hf_config(args.checkpoint, param_dtype="float32")
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), mesh)
  jax.block_until_ready(jax.numpy.zeros(8))  # the backend is up before measuring

  rss_before = _status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  stats = sliced_read.ReadStats()
  if args.impl == "sharded":
    _, params = hf.load_hf_sharded(args.checkpoint, shardings, config=config, stats=stats)
  else:  # what every host did before: read the whole file, then place it
    _, host = hf.load_hf(args.checkpoint)
    params = jax.device_put(host, shardings)
    del host
  jax.block_until_ready(params)
  peak_growth = _status("VmHWM") - rss_before

  result = {"peak_rss_growth_bytes": peak_growth, "rss_before_bytes": rss_before,
            "bytes_read": stats.bytes_read, "checked_shards": _check(params, args.checkpoint),
            "held_bytes": sum(s.data.nbytes for a in jax.tree.leaves(params)
                              for s in a.addressable_shards)}
  del params
  if args.t5x:
    t5x_config = hf.read_hf_config(args.t5x)
    t5x_stats = sliced_read.ReadStats()
    t5x_params = hf.load_hf_sharded(args.t5x, partitioning.logical_to_sharding(
        t5.param_logical_axes(t5x_config), mesh), stats=t5x_stats)[1]
    result.update(t5x_checked_shards=_check(t5x_params, args.t5x),
                  t5x_bytes_read=t5x_stats.bytes_read)
  if args.num_processes > 1:
    try:
      hf.load_hf("google/t5-v1_1-base")
    except ValueError as e:
      result["hub_id_refusal"] = str(e)
  with open(f"{args.out}.{args.process_id}", "w") as f:
    json.dump(result, f)


def _check(params, checkpoint) -> int:
  """Compares every shard this process holds with the checkpoint read the plain way."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf  # pylint: disable=import-outside-toplevel
  _, reference = hf.load_hf(checkpoint)
  checked = 0
  for path, array in jax.tree_util.tree_leaves_with_path(params):
    expected = reference
    for key in path:
      expected = expected[key.key]
    assert array.shape == expected.shape and array.dtype == expected.dtype, path
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
      checked += 1
  return checked


if __name__ == "__main__":
  main()
