"""A teacher larger than what one host should hold loads slice by slice into an fsdp mesh.

A ~500 MB float32 Hugging Face checkpoint in several safetensors shards is
loaded by 2 JAX processes into an fsdp=8 mesh (4 devices each): each process
holds half of it, its peak memory growth while loading stays under 75% of the
checkpoint's size (reading whole files, as every host did before, needs more
than 100%), and every shard equals the file.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from miniend_jax.model import hf, t5
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


def test_teacher_loads_slice_by_slice_into_an_fsdp_mesh(big_checkpoint, tmp_path):
  size = sum(os.path.getsize(os.path.join(big_checkpoint, f))
             for f in os.listdir(big_checkpoint) if f.endswith(".safetensors"))
  assert size > 400e6 and len([f for f in os.listdir(big_checkpoint)
                               if f.endswith(".safetensors")]) > 2
  out, port = str(tmp_path / "load"), mh.free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.teacher_load_worker", "--checkpoint", big_checkpoint,
       "--out", out, "--num_processes", "2", "--process_id", str(i), "--port", str(port)],
      cwd=mh.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  mh.wait(procs)
  results = [json.load(open(f"{out}.{i}")) for i in range(2)]
  for r in results:
    assert r["checked_shards"] > 100
    # Each process's 4 devices hold half of the (fully sharded) model ...
    assert r["held_bytes"] == pytest.approx(size / 2, rel=0.02)
    # ... and loading never needed much more than that.
    assert r["peak_rss_growth_bytes"] < 0.75 * size, (r, size)
