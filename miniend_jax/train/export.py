"""`miniend export` and `miniend convert`: a model out of, or into, a miniend checkpoint.

`export` writes a checkpoint's model as a Hugging Face directory (with its
tokenizer), replacing the target whole or not at all; `convert` writes a
Hugging Face or T5X teacher as a miniend (orbax) checkpoint that a pod's hosts
then restore in parallel, each reading only its own slices.
"""

from __future__ import annotations

import os

import gin
import jax
from etils import epath  # local paths and gs:// alike (multi-host runs need gs://)

from miniend_jax.data import vocab as vocab_lib
from miniend_jax.model import hf, t5
from miniend_jax.train import checkpoints, partitioning


@gin.configurable(denylist=["workdir", "out_dir"])
def export(workdir: str, out_dir: str, *, checkpoint_dir: str | None = None,
           step: int | None = None, dtype: str | None = None, overwrite: bool = False) -> str:
  """Writes a checkpoint's model as a Hugging Face directory (with its tokenizer).

  `out_dir` must be new or empty unless `overwrite`, in which case its old
  contents are replaced whole (no stale files stay). The export is written
  into a temporary sibling directory and renamed into place, so a failed
  export leaves `out_dir` as it was.

  transformers 5 forces `tie_word_embeddings=True` on every T5 config (it reads
  a stored `false` only as "do not rescale the head"), so loading any T5 v1.1
  model with its separate output head, ours or Google's, logs that it will
  "NOT tie" the two: the head is loaded as stored, as the parity tests check.
  """
  target = epath.Path(out_dir)
  if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
    raise FileExistsError(f"--out_dir {out_dir} exists and is not empty. Pass --overwrite "
                          "to replace its contents, or choose a new directory.")
  source = checkpoint_dir or os.path.join(workdir, "checkpoints")
  config = checkpoints.load_model_config(source, step)
  params = checkpoints.load_params_from_checkpoint(source, step)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
  if tmp.exists():
    tmp.rmtree()
  hf.save_hf(config, params, os.fspath(tmp), dtype=dtype)
  vocabulary = checkpoints.load_metadata(source, step).get("run", {}).get("vocabulary")
  if vocabulary == vocab_lib.BYT5 or (vocabulary and epath.Path(vocabulary).exists()):
    vocab_lib.save_hf_tokenizer(vocabulary, os.fspath(tmp))
  _replace_directory(tmp, target)
  return out_dir


def _replace_directory(new: epath.Path, target: epath.Path) -> None:
  """Puts the finished directory `new` at `target`, replacing what is there. A
  local directory is swapped by renames (never half old, half new); object stores
  have no directory rename, so there the files move one by one once all are
  written, config.json last."""
  if "://" not in os.fspath(target):
    if target.exists():
      old = target.parent / f".{target.name}.old-{os.getpid()}"
      target.rename(old)
      new.rename(target)
      old.rmtree() if old.is_dir() else old.unlink()
    else:
      target.parent.mkdir(parents=True, exist_ok=True)
      new.rename(target)
    return
  if target.exists():
    target.rmtree() if target.is_dir() else target.unlink()
  target.mkdir(parents=True, exist_ok=True)
  for path in sorted(new.iterdir(), key=lambda p: p.name == hf.CONFIG_NAME):
    path.rename(target / path.name)
  new.rmtree()


@gin.configurable(denylist=["source", "out_dir"])
def convert(source: str, out_dir: str, *, dtype: str | None = None,
            mesh: partitioning.MeshConfig | None = None, chunk_bytes: int = 2 << 20) -> str:
  """Writes a teacher as a miniend (orbax) checkpoint.

  Pods then restore the teacher in parallel, every host reading only its own
  slices with tensorstore: convert once, to a bucket, and pass the result as
  `--teacher`. Every process of a multi-host job calls it; the weights are
  loaded sharded (fully sharded over all devices by default), so no host holds
  the whole model. A hub id is converted on one process (a job of several
  refuses it: each host would download it).

  Args:
    source: a Hugging Face directory (local or gs://; safetensors, Flax msgpack
      or PyTorch .bin), a hub id (`ID@REVISION` allowed) or a T5X checkpoint.
    out_dir: the checkpoint directory to create (local or gs://).
    dtype: store the weights in this dtype (default: as stored).
    chunk_bytes: the stored chunks' size. Whatever mesh converts, a pod's host
      then reads little more than its own shards (one chunk per array, what a
      single process writes by default, made every host read whole arrays).
  Returns:
    out_dir.
  """
  partitioning.maybe_initialize_distributed()
  if checkpoints.latest_step(out_dir) is not None:
    raise FileExistsError(f"{out_dir} already holds a checkpoint; pick a new directory.")
  checkpoint, config = hf.open_checkpoint(source, **({"param_dtype": dtype} if dtype else {}))
  mesh = mesh or partitioning.MeshConfig(data=1, fsdp=-1)
  device_mesh = partitioning.make_mesh(mesh)
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(config), device_mesh,
                                               mesh.logical_axis_rules)
  _, params = hf.load_hf_sharded(checkpoint, shardings, config=config)
  with checkpoints.Checkpointer(out_dir, checkpoints.CheckpointConfig(async_save=False),
                                model_config=config, metadata={"converted_from": source}) as ckpt:
    ckpt.save(0, {"params": params}, force=True, chunk_bytes=chunk_bytes)
  if jax.process_index() == 0:
    hf.copy_tokenizer_files(checkpoint.directory, out_dir)
  return out_dir
