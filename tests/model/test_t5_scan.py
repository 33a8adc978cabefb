"""Scanned layers (`T5Config.scan_layers`): same logits, taps and gradients as unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.model import t5
from miniend_jax.model.t5 import T5, T5Config, Taps
from tests.model.params_testing import random_params

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

FAMILIES = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
# 4 encoder and 4 decoder layers: taps on a middle and the last layer leave
# scanned runs before, between and (for a hidden tap) after them.
TAPS = Taps(encoder_self=(1, -1), decoder_self=(1, -1), decoder_cross=(1, -1),
            decoder_hidden=(1,), encoder_hidden=(2,))


def _config(family: str, **changes) -> T5Config:
  return T5Config(vocab_size=67, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_decoder_layers=4,
                  num_heads=4, dropout_rate=0.0, **FAMILIES[family]).replace(**changes)


def _tokens(batch=2, input_len=9, target_len=6, vocab=67):
  rng = np.random.default_rng(0)
  enc = rng.integers(1, vocab, size=(batch, input_len)).astype(np.int32)
  enc[1, input_len // 2:] = 0
  dec = rng.integers(1, vocab, size=(batch, target_len)).astype(np.int32)
  dec[:, 0] = 0
  return jnp.asarray(enc), jnp.asarray(dec)


def _loss(params, cfg, enc, dec, taps=TAPS):
  out = T5(cfg).apply({"params": params}, enc, dec, taps=taps)
  attention = [tap.query.sum() * tap.key.mean() + jnp.mean(tap.value ** 2)
               for group in (out.encoder_self, out.decoder_self, out.decoder_cross)
               for tap in group.values()]
  hidden = [jnp.mean(h ** 2) for group in (out.encoder_hidden, out.decoder_hidden)
            for h in group.values()]
  return jnp.mean(out.logits ** 2) + sum(attention) + sum(hidden), out


def _assert_close(a, b):
  """float32 round-off, relative to each leaf's scale (gradients reach ~10 here: an absolute
  tolerance of 2e-6 alone would ask an element near 0 for 1e-7 of the leaf's largest)."""
  def close(x, y):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(y).max())))
  jax.tree.map(close, a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_equals_unrolled(family):
  cfg = _config(family)
  scanned_cfg = cfg.replace(scan_layers=True)
  params = random_params(cfg)
  stacked = t5.stack_layer_params(params, cfg)
  enc, dec = _tokens()
  grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=1)
  (loss, out), grads = grad(params, cfg, enc, dec)
  (s_loss, s_out), s_grads = grad(stacked, scanned_cfg, enc, dec)
  assert sorted(s_out.encoder_self) == [1, 3] and sorted(s_out.decoder_cross) == [1, 3]
  assert sorted(s_out.encoder_hidden) == [2] and sorted(s_out.decoder_hidden) == [1]
  _assert_close(out, s_out)
  _assert_close(loss, s_loss)
  _assert_close(t5.stack_layer_params(grads, cfg), s_grads)
  _assert_close(grads, t5.unstack_layer_params(s_grads, cfg))


def test_remat_applies_per_layer_inside_the_scan():
  cfg = _config("v1.1", scan_layers=True, num_layers=2, num_decoder_layers=2)
  params = random_params(cfg)
  enc, dec = _tokens()
  taps = Taps(decoder_self=(-1,))  # the encoder scans whole, the decoder 1 + 1
  grad = jax.jit(jax.grad(lambda p, c: _loss(p, c, enc, dec, taps)[0]), static_argnums=1)
  dots = lambda policy: grad.lower(params, cfg.replace(remat_policy=policy)).as_text().count(
      "dot_general")
  # "full" recomputes the matmuls of every layer body in the backward pass, "dots" none.
  assert dots("full") > dots("none") == dots("dots")
  _assert_close(grad(params, cfg), grad(params, cfg.replace(remat_policy="full")))


def test_stacked_layout_shapes_axes_and_counts():
  cfg = _config("v1.1")
  scanned = cfg.replace(scan_layers=True)
  shapes = t5.param_shapes(scanned)
  assert "layers_0" not in shapes["encoder"]
  assert shapes["encoder"]["layers"]["mlp"]["wi_0"]["kernel"].shape == (4, 16, 32)
  assert shapes["decoder"]["layers"]["encoder_decoder_attention"]["query"]["kernel"].shape == (
      4, 16, 4, 4)
  axes = t5.param_logical_axes(scanned)
  assert tuple(axes["decoder"]["layers"]["self_attention"]["out"]["kernel"]) == (
      "layers", "heads", "kv", "embed")
  assert tuple(axes["encoder"]["relpos_bias"]["rel_embedding"]) == ("heads", "relpos_buckets")
  assert t5.count_params(scanned) == t5.count_params(cfg)
  assert t5.forward_flops(scanned, 2, 9, 6) == t5.forward_flops(cfg, 2, 9, 6)
  init = t5.init_params(scanned, jax.random.key(1))
  assert jax.tree.structure(init) == jax.tree.structure(shapes)
  # Each layer draws its own initial values.
  kernel = init["encoder"]["layers"]["self_attention"]["query"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


def test_converters_round_trip_and_reject_other_configs():
  cfg = _config("v1.0")
  params = random_params(cfg)
  stacked = t5.stack_layer_params(params, cfg)
  assert isinstance(stacked["encoder"]["layers"]["mlp"]["wi"]["kernel"], np.ndarray)
  assert t5.stack_layer_params(stacked, cfg) is not stacked  # idempotent, still a new tree
  jax.tree.map(np.testing.assert_array_equal, t5.stack_layer_params(stacked, cfg), stacked)
  jax.tree.map(np.testing.assert_array_equal, t5.unstack_layer_params(stacked, cfg), params)
  jax.tree.map(np.testing.assert_array_equal, t5.unstack_layer_params(params, cfg), params)
  with pytest.raises(ValueError, match=r"encoder should have layers_0\.\.layers_4.*layers_4"):
    t5.stack_layer_params(params, cfg.replace(num_layers=5))
  with pytest.raises(ValueError, match="leading axis of \\(4,\\).*3 layers"):
    t5.unstack_layer_params(stacked, cfg.replace(num_layers=3))


def test_scanned_dropout_and_decode_mode():
  cfg = _config("v1.1", scan_layers=True, dropout_rate=0.3)
  params = random_params(cfg)
  enc, dec = _tokens()
  model = T5(cfg)
  run = jax.jit(lambda key: model.apply({"params": params}, enc, dec, enable_dropout=True,
                                        rngs={"dropout": jax.random.key(key)}).logits)
  np.testing.assert_array_equal(run(3), run(3))
  assert np.max(np.abs(run(3) - run(4))) > 1e-3
  encoded = jnp.zeros((2, 9, 16))
  with pytest.raises(ValueError, match="unstack_layer_params"):
    jax.eval_shape(lambda: model.apply({"params": params}, encoded, enc, dec, 6,
                                       method=T5.decode_step, mutable=["cache"]))
  with pytest.raises(ValueError, match="scan_layers must be True or False"):
    cfg.replace(scan_layers="yes")
