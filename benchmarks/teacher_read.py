"""Bytes each host reads to load a teacher, against the checkpoint's size.

  python benchmarks/teacher_read.py plan [--model t5-v1_1-xxl] [--hosts 8] [--chips 4]
  python benchmarks/teacher_read.py measure [--workdir DIR] [--old_source DIR]

`plan` sizes the reads of a pod job from the checkpoint's headers alone: a
sparse safetensors file with the real header of `--model` (float32, as Google
publishes it) and a T5X `checkpoint` file of tensorstore specs, loaded into a
mesh fully sharded over hosts x chips fake CPU devices (one process; host h
holds chips [h*chips, (h+1)*chips)). For each host it reports what the loader
fetches (`sliced_read.planned_bytes`: each stored range once per host), what
the per-device reads it replaced fetched (the same plan, one device at a time),
what a T5X copy costs (the chunks its boxes touch; chunks as t5x writes them
from hosts that split the model axis --t5x_model_parallel ways, an assumption:
the published checkpoints' chunk shapes could not be read here) and what a
`miniend convert` copy costs (orbax chunks of --convert_chunk_bytes).

`measure` writes a 502 MB teacher (T5-large width, 2+2 layers, float32) as
safetensors, T5X (gzip zarr, t5x's layout) and a `miniend convert` copy, loads
each with 2 processes x 4 fake devices (fsdp 8) and reports every process's
bytes read from files while loading (/proc/self/io rchar). With --old_source
DIR (an earlier commit's package: `git archive COMMIT miniend_jax | tar -x -C
DIR`), the safetensors load is measured with that code too.

Prints one JSON line per result; numbers are bytes and ratios to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# t5x's layout is written by the tests' writer (the package only reads T5X).
from tests.model import t5x_testing  # noqa: E402  pylint: disable=wrong-import-position


def _safetensors_header_only(config, directory: str) -> int:
  """A safetensors checkpoint of `config` whose data is a hole (a sparse file)."""
  from miniend_jax.model import hf, sliced_read  # pylint: disable=import-outside-toplevel
  shapes = sliced_read.flat_shapes(config)
  header, offset = {}, 0
  for ours, theirs, layout in hf.name_map(config):
    shape = layout.stored_shape(shapes[ours])
    size = int(np.prod(shape)) * 4
    header[theirs] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header).encode()
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "model.safetensors"), "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text)
    f.truncate(8 + len(text) + offset)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(config), f)
  return offset


# The axis of each T5X kernel that t5x's partitioning rules give to its "model" mesh
# axis (vocab, mlp, joined heads); the other one is "embed".
_T5X_MODEL_AXIS = {"token_embedder/embedding": 0, "query/kernel": 1, "key/kernel": 1,
                   "value/kernel": 1, "out/kernel": 0, "wi/kernel": 1, "wi_0/kernel": 1,
                   "wi_1/kernel": 1, "wo/kernel": 0, "logits_dense/kernel": 1,
                   "rel_embedding": 0}


def _t5x_specs_only(config, directory: str, model_parallel: int) -> None:
  """A T5X `checkpoint` file of `config`'s tensorstore specs, without the arrays. Chunks
  follow t5x's rule (at most 64 MiB, largest dimension divided first) on the part each
  writing host held when the model axis split it `model_parallel` ways."""
  from flax import serialization, traverse_util  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import sliced_read, t5x  # pylint: disable=import-outside-toplevel
  shapes = sliced_read.flat_shapes(config)
  tree = {}
  for ours, theirs, layout in t5x.name_map(config, scanned=False):
    shape = list(layout.stored_shape(shapes[ours]))
    write = list(shape)
    axis = next((a for k, a in _T5X_MODEL_AXIS.items() if theirs.endswith(k)), None)
    if axis is not None and write[axis] % model_parallel == 0:
      write[axis] //= model_parallel
    tree[tuple(theirs.split("/"))] = {
        "driver": "zarr", "dtype": "float32",
        "kvstore": {"driver": "file", "path": "target." + theirs.replace("/", ".")},
        "metadata": {"shape": shape, "chunks": t5x_testing.chunk_shape(write, 16 << 20)}}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(
        {"version": 3, "optimizer": {"target": traverse_util.unflatten_dict(tree)}}))


def _orbax_host_bytes(shapes, shardings, devices, chunk_bytes: int) -> int:
  """Bytes of the chunks of a `miniend convert` copy (float32, our layout, chunks
  chosen as orbax does for one writing process: the largest dimension divided
  first down to `chunk_bytes`) that the bounding box of `devices`' shards touches."""
  from miniend_jax.model import layouts  # pylint: disable=import-outside-toplevel
  total = 0
  for path, shape in shapes.items():
    boxes = [layouts.normalize(index, shape)
             for d, index in shardings[path].devices_indices_map(shape).items() if d in devices]
    box = layouts.bounding_box(boxes)
    chunks = t5x_testing.chunk_shape(shape, chunk_bytes // 4)
    extent = [min(-(-b.stop // c) * c, n) - (b.start // c) * c
              for b, c, n in zip(box, chunks, shape)]
    total += int(np.prod(extent)) * 4
  return total


def plan(args) -> None:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.hosts * args.chips}"
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf, presets, sliced_read, t5, t5x  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import partitioning  # pylint: disable=import-outside-toplevel

  config = presets.get_model_config(args.model, param_dtype="float32")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=-1))
  shardings = traverse_util.flatten_dict(
      partitioning.logical_to_sharding(t5.param_logical_axes(config), mesh), sep="/")
  shapes = sliced_read.flat_shapes(config)
  with tempfile.TemporaryDirectory() as tmp:
    size = _safetensors_header_only(config, os.path.join(tmp, "hf"))
    _t5x_specs_only(config, os.path.join(tmp, "t5x"), args.t5x_model_parallel)
    routes = {"safetensors": hf.HFCheckpoint(os.path.join(tmp, "hf")).entries(config),
              "t5x": t5x.T5XCheckpoint(os.path.join(tmp, "t5x")).entries(config)}
    devices = list(mesh.devices.flat)
    for host in range(args.hosts):
      own = devices[host * args.chips:(host + 1) * args.chips]
      row = {"model": args.model, "hosts": args.hosts, "chips_per_host": args.chips,
             "host": host, "checkpoint_bytes": size,
             "t5x_written_model_parallel": args.t5x_model_parallel,
             "convert_chunk_bytes": args.convert_chunk_bytes}
      for name, entries in routes.items():
        row[f"{name}_per_host"] = sliced_read.planned_bytes(entries, shapes, shardings, own)
      row["safetensors_per_device_reads"] = sum(
          sliced_read.planned_bytes(routes["safetensors"], shapes, shardings, [d]) for d in own)
      row["orbax_per_host"] = _orbax_host_bytes(shapes, shardings, own, args.convert_chunk_bytes)
      for key in ("safetensors_per_host", "safetensors_per_device_reads", "t5x_per_host",
                  "orbax_per_host"):
        row[key + "_ratio"] = round(row[key] / size, 3)
      print(json.dumps(row), flush=True)
      if not args.all_hosts:
        break


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def worker(args) -> None:
  """One process of `measure`: loads args.path (args.format) into fsdp=8, prints rchar."""
  os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(args.process_id))
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf, t5  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import checkpoints, partitioning  # pylint: disable=import-outside-toplevel
  partitioning.maybe_initialize_distributed()
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=-1))
  config = (checkpoints.load_model_config(args.path) if args.format == "orbax"
            else hf.read_hf_config(args.path))
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), mesh)
  jax.block_until_ready(jax.numpy.zeros(4))
  before = _rchar()
  if args.format == "orbax":
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          t5.param_shapes(config), shardings)
    params = checkpoints.load_params_from_checkpoint(args.path, target_params=target)
  else:
    params = hf.load_hf_sharded(args.path, shardings, config=config)[1]
  jax.block_until_ready(params)
  print(json.dumps({"rchar": _rchar() - before}), flush=True)


def _load_with_two_processes(fmt: str, path: str, python_path: str) -> list[int]:
  port = 20000 + os.getpid() % 20000
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "worker", "--format", fmt, "--path", path,
       "--process_id", str(i), "--port", str(port)],
      env=dict(os.environ, PYTHONPATH=python_path, TF_CPP_MIN_LOG_LEVEL="3"),
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  return [json.loads(out.strip().splitlines()[-1])["rchar"] for out in outs]


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def measure(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import hf, t5  # pylint: disable=import-outside-toplevel
  from tests.model import checkpoint_testing  # pylint: disable=import-outside-toplevel

  config = t5.T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=2,
                       num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  workdir = args.workdir or tempfile.mkdtemp(prefix="teacher_read_")
  paths = {"safetensors": os.path.join(workdir, "hf"), "t5x": os.path.join(workdir, "t5x"),
           "orbax": os.path.join(workdir, "orbax")}
  if not os.path.exists(paths["safetensors"]):
    hf.save_hf(config, t5.init_params(config, jax.random.key(0)), paths["safetensors"],
               max_shard_size="20GB")
  if not os.path.exists(paths["t5x"]):
    state = load_file(os.path.join(paths["safetensors"], "model.safetensors"))
    t5x_testing.write_t5x(paths["t5x"], checkpoint_testing.t5x_params(state, tied=False),
                          chunk_elements=1 << 20)
  if not os.path.exists(paths["orbax"]):
    subprocess.run([sys.executable, "-m", "miniend_jax", "convert", "--teacher",
                    paths["safetensors"], "--out_dir", paths["orbax"]], check=True,
                   env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL)
  runs = [(name, name, path, ROOT) for name, path in paths.items()]
  if args.old_source:
    runs.append(("safetensors_old_code", "safetensors", paths["safetensors"], args.old_source))
  for name, fmt, path, python_path in runs:
    size = _directory_bytes(path)
    read = _load_with_two_processes(fmt, path, python_path)
    print(json.dumps({"route": name, "checkpoint_bytes": size, "bytes_read_per_process": read,
                      "ratio_per_process": [round(r / size, 3) for r in read]}), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("plan")
  p.add_argument("--model", default="t5-v1_1-xxl")
  p.add_argument("--hosts", type=int, default=8)
  p.add_argument("--chips", type=int, default=4)
  p.add_argument("--all_hosts", action="store_true", help="a line per host (default: host 0)")
  p.add_argument("--convert_chunk_bytes", type=int, default=2 << 20,
                 help="the chunk size of the `miniend convert` copy (convert's default)")
  p.add_argument("--t5x_model_parallel", type=int, default=8,
                 help="how many ways t5x split the model axis when it wrote the T5X copy")
  p = sub.add_parser("measure")
  p.add_argument("--workdir")
  p.add_argument("--old_source")
  p = sub.add_parser("worker")
  p.add_argument("--format", required=True)
  p.add_argument("--path", required=True)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--port", type=int, required=True)
  args = parser.parse_args()
  {"plan": plan, "measure": measure, "worker": worker}[args.command](args)


if __name__ == "__main__":
  main()
