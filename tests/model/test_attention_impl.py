"""Attention through `jax.nn.dot_product_attention` and the Pallas kernel equals the explicit path.

On a GPU "auto" runs cuDNN's fused kernel; here the same call runs with
implementation="xla", so the plumbing (one additive bias holding relative
positions, padding, causality and packing; scale 1; taps still q/k/v) is
checked against the explicit einsums, values and gradients. On a TPU "auto"
runs the Pallas flash attention; here "pallas" runs it interpreted, with the
bias's parts passed apart (`AttentionMasks`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.model import hf, t5
from miniend_jax.model.t5 import T5, T5Config, Taps
from miniend_jax.train import program

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

TAPS = Taps(encoder_self=(-1,), decoder_self=(-1,), decoder_cross=(-1,))


def _config(**changes) -> T5Config:
  return T5Config(vocab_size=67, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                  num_heads=2, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False).replace(**changes)


def _batch(batch=3, input_len=10, target_len=7, vocab=67):
  """Padded rows and, for packing, two segments per row."""
  rng = np.random.default_rng(0)
  enc = rng.integers(1, vocab, size=(batch, input_len)).astype(np.int32)
  enc[1, input_len // 2:] = 0
  targets = rng.integers(1, vocab, size=(batch, target_len)).astype(np.int32)
  targets[2, target_len - 2:] = 0
  dec = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  enc_segments = np.where(np.arange(input_len) < input_len // 2, 1, 2)[None].repeat(batch, 0)
  dec_segments = np.where(np.arange(target_len) < target_len // 2, 1, 2)[None].repeat(batch, 0)
  return tuple(map(jnp.asarray, (enc, dec, targets, enc_segments.astype(np.int32),
                                 dec_segments.astype(np.int32))))


def _loss(params, cfg, batch, packed):
  enc, dec, targets, enc_seg, dec_seg = batch
  segments = dict(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg) if packed else {}
  out = T5(cfg).apply({"params": params}, enc, dec, targets, taps=TAPS, **segments)
  relations = [jnp.mean(jnp.einsum("bqd,bkd->bqk", tap.query, tap.key) ** 2)
               + jnp.mean(tap.value ** 2)
               for group in (out.encoder_self, out.decoder_self, out.decoder_cross)
               for tap in group.values()]
  return jnp.mean(jax.nn.log_softmax(out.logits) ** 2) + sum(relations), out.logits


@pytest.mark.parametrize("impl,packed", [("xla", False), ("xla", True), ("pallas", True)],
                         ids=["xla-padded", "xla-packed", "pallas-packed"])
def test_fused_attention_equals_explicit(impl, packed):
  cfg = _config(attention_impl="explicit")
  params = t5.init_params(cfg, jax.random.key(0))
  batch = _batch()
  grad = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=(1, 3))
  (loss, logits), grads = grad(params, cfg, batch, packed)
  (f_loss, f_logits), f_grads = grad(params, cfg.replace(attention_impl=impl), batch, packed)
  np.testing.assert_allclose(f_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f_loss, loss, rtol=1e-5)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  for path, g in jax.tree_util.tree_leaves_with_path(f_grads):
    # The Pallas kernel follows the explicit arithmetic step by step: 1e-5.
    np.testing.assert_allclose(g, flat[path], rtol=1e-5 if impl == "pallas" else 1e-4,
                               atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The masks matter: without them the outputs would differ (so the test can fail).
  unmasked = jax.jit(lambda p: T5(cfg).apply({"params": p}, batch[0], batch[1]).logits)(params)
  assert not np.allclose(unmasked[2], logits[2], atol=1e-3)


def test_bfloat16_fused_path_close_to_explicit():
  cfg = _config(dtype="bfloat16", attention_impl="explicit")
  params = t5.init_params(cfg, jax.random.key(1))
  batch = _batch()
  forward = jax.jit(lambda p, c: _loss(p, c, batch, False)[1], static_argnums=1)
  explicit = np.asarray(forward(params, cfg), np.float32)
  fused = np.asarray(forward(params, cfg.replace(attention_impl="xla")), np.float32)
  # bf16 activations: both paths round differently, never by more than bf16 noise.
  np.testing.assert_allclose(fused, explicit, atol=0.05 * np.abs(explicit).max())


def test_choice_of_kernel():
  choose = t5.attention_implementation
  assert jax.default_backend() == "cpu"
  assert choose(_config(dtype="bfloat16")) == "explicit"  # auto: cuDNN on GPUs only
  assert choose(_config(attention_impl="xla")) == "xla"
  assert choose(_config(attention_impl="pallas")) == "pallas"  # interpreted off TPU
  assert choose(_config(attention_impl="pallas"), decode=True) == "explicit"
  assert choose(_config(attention_impl="cudnn"), decode=True) == "explicit"
  assert choose(_config(dtype="bfloat16"), dropout=True) == "explicit"
  for fused in ("xla", "pallas"):
    with pytest.raises(ValueError, match="cannot apply attention dropout"):
      choose(_config(attention_impl=fused), dropout=True)
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    _config(attention_impl="flash")


def test_a_run_sets_the_kernel_of_every_model(tmp_path):
  teacher_cfg = _config(num_layers=1, num_decoder_layers=1)
  hf.save_hf(teacher_cfg, t5.init_params(teacher_cfg, jax.random.key(0)), str(tmp_path))
  setup = program.ModelSetup(teacher=str(tmp_path), student_shape="1L-32H",
                             attention_impl="xla")
  student, teacher = program.model_configs("distill", setup)
  assert student.attention_impl == teacher.attention_impl == "xla"
  student, _ = program.model_configs("pretrain", program.ModelSetup(preset="t5-v1_1-tiny"))
  assert student.attention_impl == "auto"
  with pytest.raises(ValueError, match="ModelSetup.attention_impl"):
    program.ModelSetup(attention_impl="fast")
