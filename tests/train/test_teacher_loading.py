"""Teachers at scale: loaded slice by slice into an fsdp mesh by several processes, each
host reading its part once; every route to a teacher gives the same first loss.

A ~500 MB float32 Hugging Face checkpoint in several safetensors shards is
loaded by 2 JAX processes into an fsdp=8 mesh (4 devices each): each process
holds half of it, reads each stored range once per host (not once per device),
its peak memory growth stays well under the checkpoint's size (reading whole
files, as every host once did, needs more than 100%), and every shard equals
the file. The same processes load a T5X checkpoint sliced and refuse a hub id.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from miniend_jax.model import hf, t5
from miniend_jax.train import loop, partitioning, program, state as state_lib
from tests.model import checkpoint_testing, t5x_testing
from tests.train import multihost_testing as mh

# 2 + 2 layers at T5-large width: 125.6M parameters, 502 MB in float32.
CONFIG = t5.T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=2,
                     num_heads=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("big_teacher"))
  hf.save_hf(CONFIG, t5.init_params(CONFIG, jax.random.key(0)), directory,
             max_shard_size="150MB")
  return directory


def _t5x_copy(hf_dir: str, out_dir: str, **kwargs) -> str:
  """The single-file safetensors checkpoint `hf_dir` as a T5X checkpoint."""
  state = load_file(os.path.join(hf_dir, "model.safetensors"))
  target = checkpoint_testing.t5x_params(state, tied=checkpoint_testing.tied_head(state))
  return t5x_testing.write_t5x(out_dir, target, **kwargs)


def test_teacher_loads_slice_by_slice_into_an_fsdp_mesh(big_checkpoint, tmp_path):
  size = sum(os.path.getsize(os.path.join(big_checkpoint, f))
             for f in os.listdir(big_checkpoint) if f.endswith(".safetensors"))
  assert size > 400e6 and len([f for f in os.listdir(big_checkpoint)
                               if f.endswith(".safetensors")]) > 2
  small = t5.T5Config(vocab_size=256, d_model=64, d_kv=8, d_ff=96, num_layers=2,
                      num_decoder_layers=3, num_heads=8, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
  hf.save_hf(small, t5.init_params(small, jax.random.key(1)), str(tmp_path / "small"))
  # Chunks small enough to split every axis, as t5x writes them from hosts that shard
  # `embed` (2-D parameter partitioning).
  t5x_dir = _t5x_copy(str(tmp_path / "small"), str(tmp_path / "t5x"), chunk_elements=512)
  out, port = str(tmp_path / "load"), mh.free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.teacher_load_worker", "--checkpoint", big_checkpoint,
       "--out", out, "--num_processes", "2", "--process_id", str(i), "--port", str(port),
       "--t5x", t5x_dir],
      cwd=mh.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  mh.wait(procs)
  results = [json.load(open(f"{out}.{i}")) for i in range(2)]
  small_size = sum(int(np.prod(s.shape)) * 4 for s in jax.tree.leaves(t5.param_shapes(small)))
  for r in results:
    assert r["checked_shards"] > 100 and r["t5x_checked_shards"] > 100
    # Each process's 4 devices hold half of the (fully sharded) model ...
    assert r["held_bytes"] == pytest.approx(size / 2, rel=0.02)
    # ... each host read every stored range once: all of the tensors whose stored rows
    # run across the sharded axis (q/k/v, wi, embeddings: 86% here), half of the rest;
    # reading per device took them once per local device ...
    assert 0.5 * size < r["bytes_read"] < 0.95 * size, (r, size)
    # ... tensorstore reads only the T5X chunks a host's slices touch: half of it ...
    assert r["t5x_bytes_read"] < 0.55 * small_size, (r, small_size)
    # ... and loading held one host box of the largest tensor beside its half.
    assert r["peak_rss_growth_bytes"] < 0.85 * size, (r, size)
    assert "2 processes" in r["hub_id_refusal"] and "miniend convert" in r["hub_id_refusal"]


def test_every_teacher_route_gives_the_same_first_loss(tmp_path):
  """A Hugging Face directory, a T5X copy of the same weights and that copy's `miniend
  convert` (which did not restore into a scanned teacher), each loaded as a scanned
  teacher the way a run loads it: the same first distillation step, bitwise."""
  config = t5.T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                       num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False)
  teachers = {"hf": str(tmp_path / "hf")}
  rng = np.random.default_rng(4)
  hf.save_hf(config, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                  t5.param_shapes(config)), teachers["hf"])
  teachers["t5x"] = _t5x_copy(teachers["hf"], str(tmp_path / "t5x"))
  teachers["converted"] = loop.convert(teachers["t5x"], str(tmp_path / "converted"))
  train = program.TrainConfig(task="unused", batch_size=8, inputs_length=16, targets_length=8,
                              num_steps=1)
  model = program.ModelSetup(teacher=teachers["hf"], student_shape="1L-32H",
                             scan_layers=("teacher",), teacher_dtype="float32")
  prog = program.build_step_program("distill", train, model, state_lib.OptimizerConfig(),
                                    partitioning.MeshConfig(data=2, fsdp=4), "kd_logits")
  batch = {k: rng.integers(1, config.vocab_size, shape).astype(np.int32)
           for k, shape in program.batch_features(train).items()}
  batch["decoder_loss_weights"] = np.ones_like(batch["decoder_loss_weights"])
  batch = partitioning.host_local_to_global(batch, prog.mesh, prog.rules)
  state = state_lib.create_sharded_state(prog.init_fn, prog.tx, prog.mesh, prog.rules,
                                         prog.logical_specs, (jax.random.key(0),))
  losses = {}
  for name, teacher in teachers.items():
    assert program.model_config_of(teacher).replace(dropout_rate=0.1) == config
    teacher_params = loop.load_params(teacher, prog.teacher_config, prog.teacher_shardings)
    assert "layers" in teacher_params["encoder"]  # stacked: the teacher runs scanned
    # A copy of the same initial state each time (the step donates it).
    fresh = jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), state)
    _, metrics = prog.step(fresh, teacher_params, batch, jax.random.key(1))
    losses[name] = float(metrics["loss"])
  assert losses["converted"] == losses["hf"] and losses["t5x"] == losses["hf"], losses
