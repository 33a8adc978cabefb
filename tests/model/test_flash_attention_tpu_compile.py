"""On TPU, T5's attention keeps no per-example scores in HBM.

A tiny T5's forward and backward (packed rows: padding, segments, causal decoder,
cross-attention), data-parallel over a v4-8 under the project's mesh and rules,
is compiled by libtpu from this CPU host with 512 input and 256 target
positions. With attention_impl "auto" it runs the Pallas kernels (the mesh's
devices are TPUs), and the optimized per-chip program holds no float buffer of
scores [.., q_len, kv_len] larger than the shared position bias [heads, q_len,
kv_len]: nothing per example. (The explicit kernel, compiled the same way, holds
per-example scores such as [4, 2, 512, 512] per chip; that the check finds the
shared [2, 512, 512] shows it reads this program's shapes.)
"""

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import pytest

pytest.importorskip("libtpu", reason="compiling for TPU needs the `plan` extra (libtpu)")

from miniend_jax.model import ops, t5  # noqa: E402
from miniend_jax.train import partitioning, plan  # noqa: E402

INPUT_LEN, TARGET_LEN, BATCH, HEADS = 512, 256, 16, 2
# Sizes that no other array shares with the attention lengths (d_model, d_ff, vocab,
# heads * d_kv = 128).
MODEL = t5.T5Config(vocab_size=384, d_model=192, d_kv=64, d_ff=320, num_layers=1,
                    num_heads=HEADS, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    dropout_rate=0.0, dtype="bfloat16")
LENGTHS = {INPUT_LEN, TARGET_LEN}


def _score_buffers(attention_impl: str = "auto", devices=None) -> tuple[set[tuple[int, ...]], str]:
  """The float shapes [.., q_len, kv_len] (both attention lengths) in the optimized
  per-chip program, and the program's text (on a v4-8 unless `devices` are given)."""
  cfg = MODEL.replace(attention_impl=attention_impl)
  devices = devices or plan.topology_devices("v4-8")
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=len(devices)), devices)
  params = jax.eval_shape(lambda: t5.init_params(cfg, jax.random.key(0)))

  def loss(params, enc, dec, enc_segments, dec_segments):
    out = t5.T5(cfg).apply({"params": params}, enc, dec, dec, encoder_segment_ids=enc_segments,
                           decoder_segment_ids=dec_segments)
    return jnp.mean(out.logits ** 2)

  with partitioning.mesh_context(mesh):
    replicated, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(
        mesh, PartitionSpec("data", None))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          params)
    tokens = lambda n: jax.ShapeDtypeStruct((BATCH, n), jnp.int32, sharding=rows)
    hlo = jax.jit(jax.grad(loss)).lower(params, tokens(INPUT_LEN), tokens(TARGET_LEN),
                                        tokens(INPUT_LEN), tokens(TARGET_LEN)
                                        ).compile().as_text()
  shapes = {tuple(int(d) for d in dims.split(","))
            for dims in re.findall(r"\b(?:f32|bf16|f16)\[([0-9,]+)\]", hlo)}
  return {s for s in shapes if len(s) >= 3 and set(s[-2:]) <= LENGTHS}, hlo


def test_no_per_example_scores_on_tpu():
  buffers, hlo = _score_buffers()
  assert "tpu_custom_call" in hlo  # the Pallas (Mosaic) kernels
  # Only the shared position biases and their gradients: [1 or none, heads, q, kv].
  assert (HEADS, INPUT_LEN, INPUT_LEN) in buffers, buffers
  assert all(math.prod(s[:-2]) <= HEADS for s in buffers), buffers


def test_tpu_v3_compiles_without_the_pallas_kernels():
  """TPU v2 / v3 (Colab's and TRC's v3-8) cannot compile the kernels' bf16 matmuls
  in Mosaic: there "auto" runs attention explicitly and the relations in XLA
  tiles, which compile. (Naming the relation kernel there fails to compile,
  which shows the check reaches Mosaic.)"""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from miniend_jax.distill import relations  # pylint: disable=import-outside-toplevel
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v3:2x2", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=len(devices)), devices)
  batch, length = 16, 512

  def relation_step(implementation):
    def loss(teacher, student, mask):
      return relations.relation_kl(teacher, teacher, student, student, num_relation_heads=2,
                                   query_mask=mask, key_mask=mask, batch_axes="data",
                                   implementation=implementation)
    tokens = NamedSharding(mesh, PartitionSpec("data", None, None))
    args = (jax.ShapeDtypeStruct((batch, length, 256), jnp.bfloat16, sharding=tokens),
            jax.ShapeDtypeStruct((batch, length, 128), jnp.bfloat16, sharding=tokens),
            jax.ShapeDtypeStruct((batch, length), jnp.bool_,
                                 sharding=NamedSharding(mesh, PartitionSpec("data", None))))
    return jax.jit(jax.value_and_grad(loss, argnums=1)).lower(*args)

  with partitioning.mesh_context(mesh):
    assert ops.attention_implementation(MODEL) == "explicit"
    assert "tpu_custom_call" not in relation_step("auto").compile().as_text()
    with pytest.raises(Exception, match="Mosaic.*(E2001|matmul)"):
      relation_step("kernel").compile()
