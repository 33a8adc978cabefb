"""The Pallas flash attention (interpreted on CPU) equals the explicit path.

Values and gradients with respect to query, key, value and the relative-position
table (through `RelativePositionBias`, so the table's gradient is the kernel's
batch-summed bias gradient gathered back to buckets), in float32, on tiny shapes
with padding, packed segments, causal decoder self-attention and
cross-attention (q_len != kv_len, no position bias). Blocks of 8 rows make the
kernels run several blocks per row and column. One jit per case: the
interpreter is slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.model import ops
from miniend_jax.model.config import T5Config
from miniend_jax.model.flash_attention import flash_attention
from miniend_jax.model.layers import RelativePositionBias

pytestmark = pytest.mark.lean

HEADS, D_KV, BATCH = 4, 64, 3  # two groups of two heads per kernel step
CASES = {
    # name: (q_len, kv_len, position bias (bidirectional?) or None, causal, packed)
    "encoder_padded": (16, 16, True, False, False),
    "encoder_packed": (16, 16, True, False, True),
    "decoder_causal_packed": (16, 16, False, True, True),
    "cross_padded_packed": (8, 24, None, False, True),
}


def _inputs(q_len, kv_len):
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  # Queries scaled as T5's init scales them (no score scaling): scores of order 1.
  q = normal(BATCH, q_len, HEADS, D_KV) * D_KV ** -0.5
  k, v = normal(BATCH, kv_len, HEADS, D_KV), normal(BATCH, kv_len, HEADS, D_KV)
  key_mask = np.ones((BATCH, kv_len), bool)
  key_mask[1, kv_len // 2 + 3:] = False  # a padded example
  key_mask[2, 5] = False                 # a masked key inside a row
  # Two segments per row, split at a point that is not a block boundary.
  q_seg = (np.arange(q_len) >= q_len // 2 - 3).astype(np.int32)[None].repeat(BATCH, 0)
  k_seg = (np.arange(kv_len) >= kv_len // 2 - 3).astype(np.int32)[None].repeat(BATCH, 0)
  return q, k, v, jnp.asarray(key_mask), jnp.asarray(q_seg), jnp.asarray(k_seg), normal(
      BATCH, q_len, HEADS, D_KV)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_explicit(case):
  q_len, kv_len, bidirectional, causal, packed = CASES[case]
  q, k, v, key_mask, q_seg, k_seg, weights = _inputs(q_len, kv_len)
  if not packed:
    q_seg = k_seg = None
  cfg = T5Config(num_heads=HEADS, relative_attention_num_buckets=8,
                 relative_attention_max_distance=12)
  relpos = RelativePositionBias(cfg, bidirectional=bool(bidirectional))
  table = jax.random.normal(jax.random.key(1), (HEADS, 8), jnp.float32)

  def loss(q, k, v, table, fused):
    position = None
    if bidirectional is not None:
      position = relpos.apply({"params": {"rel_embedding": table}}, q_len, kv_len)
    masks = ops.AttentionMasks(key_mask, q_seg, k_seg, position, q_len, causal)
    if fused:
      out = flash_attention(q, k, v, position, key_mask, q_seg, k_seg, causal=causal,
                            interpret=True, block=8)
    else:
      out = ops.attend(q, k, v, masks.additive(), "explicit", jnp.float32)
    return jnp.sum(out * weights), out

  def both(*args):
    return [jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(*args, fused)
            for fused in (False, True)]

  ((ref, ref_out), ref_grads), ((got, got_out), got_grads) = jax.jit(both)(q, k, v, table)
  np.testing.assert_allclose(got_out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for name, g, r in zip(("query", "key", "value", "table"), got_grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
  if bidirectional is not None:  # the table's gradient is real, so the check could fail
    assert np.abs(ref_grads[3]).max() > 1e-2
  # The masks matter: without them the context of the padded example differs.
  position = None if bidirectional is None else relpos.apply(
      {"params": {"rel_embedding": table}}, q_len, kv_len)
  unmasked = flash_attention(q, k, v, position, jnp.ones_like(key_mask), causal=causal,
                             interpret=True, block=8)
  assert not np.allclose(unmasked[1], got_out[1], atol=1e-3)
