"""Presets, students, dtypes, rematerialisation, dropout and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.model import hf, presets, student
from miniend_jax.model.t5 import T5, T5Config, Taps, count_params, init_params, matmul
from tests.model.hf_testing import make_hf_model

TINY = T5Config(vocab_size=67, d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=2,
                num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def _tokens(batch=2, input_len=9, target_len=5, vocab=TINY.vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(1, vocab, size=(batch, input_len)).astype(np.int32)
  enc[1, input_len // 2:] = 0
  dec = rng.integers(1, vocab, size=(batch, target_len)).astype(np.int32)
  dec[:, 0] = 0
  return jnp.asarray(enc), jnp.asarray(dec)


@pytest.mark.parametrize("name,published", [
    # Parameter counts of the Hugging Face checkpoints (model.num_parameters()).
    ("t5-small", 60_506_624), ("t5-base", 222_903_552), ("t5-v1_1-small", 76_961_152),
    ("t5-v1_1-base", 247_577_856), ("t5-large", 737_668_096)])
def test_presets_have_the_published_sizes(name, published):
  assert count_params(presets.get_model_config(name)) == published


def test_unknown_presets_are_named_in_the_error():
  with pytest.raises(KeyError, match="t5-huge.*known presets"):
    presets.get_model_config("t5-huge")
  with pytest.raises(KeyError, match="7L-1H.*known shapes"):
    presets.get_student_shape("7L-1H")


def test_student_config_keeps_teacher_vocabulary_and_family():
  teacher = presets.get_model_config("t5-v1_1-base")
  cfg = student.student_config(teacher, "6L-384H")
  assert (cfg.vocab_size, cfg.feed_forward_proj, cfg.tie_word_embeddings) == (
      teacher.vocab_size, "gated-gelu", False)
  assert (cfg.num_layers, cfg.num_decoder_layers, cfg.d_model, cfg.num_heads, cfg.d_kv) == (
      6, 6, 384, 12, 32)
  assert count_params(cfg) < count_params(teacher) / 4
  with pytest.raises(ValueError, match="vocabulary"):
    student.check_same_vocabulary(teacher, cfg.replace(vocab_size=32000))


def test_student_feed_forward_follows_the_teachers_ratio():
  v1_1, v1_0 = presets.get_model_config("t5-v1_1-base"), presets.get_model_config("t5-base")
  widths = lambda teacher: {name: student.student_config(teacher, name).d_ff
                            for name in ("6L-384H", "6L-768H", "4L-512H")}
  # Gated-GELU v1.1-base (2048 / 768) and ReLU v1.0-base (3072 / 768); 512 * 2048 / 768 =
  # 1365.3 is no whole number: the nearest multiple of 64.
  assert widths(v1_1) == {"6L-384H": 1024, "6L-768H": 2048, "4L-512H": 1344}
  assert widths(v1_0) == {"6L-384H": 1536, "6L-768H": 3072, "4L-512H": 2048}
  # A width given in the shape or as an override wins.
  assert student.student_config(v1_1, "6L-384H", d_ff=1536).d_ff == 1536
  shape = presets.StudentShape(num_layers=2, d_model=384, num_heads=6, d_ff=999)
  assert student.student_config(v1_1, shape).d_ff == 999


def test_the_6L768H_student_copies_t5_v1_1_base_layers():
  """What student_6L768H.gin promises: under T5 v1.1-base the 6L-768H student has the
  teacher's layer shapes, so `student_init = 'teacher_layers'` works (abstractly here:
  no 250M-parameter arrays are made)."""
  teacher = presets.get_model_config("t5-v1_1-base")
  cfg = student.student_config(teacher, "6L-768H")
  teacher_params = jax.eval_shape(lambda: init_params(teacher, jax.random.key(0)))
  copied = jax.eval_shape(lambda tp: student.init_student(
      cfg, jax.random.key(1), teacher_config=teacher, teacher_params=tp), teacher_params)
  assert copied == jax.eval_shape(lambda: init_params(cfg, jax.random.key(1)))
  assert copied["decoder"]["layers_5"] == teacher_params["decoder"]["layers_11"]


def test_evenly_spaced_layers():
  assert student.evenly_spaced_layers(12, 6) == (0, 2, 4, 7, 9, 11)
  assert student.evenly_spaced_layers(3, 3) == (0, 1, 2)
  with pytest.raises(ValueError, match="cannot copy"):
    student.evenly_spaced_layers(2, 3)


def test_student_from_teacher_layers_copies_them():
  teacher_params = init_params(TINY, jax.random.key(1))
  cfg = TINY.replace(num_layers=2, num_decoder_layers=1)
  params = student.init_student(cfg, jax.random.key(2), teacher_config=TINY,
                                teacher_params=teacher_params, encoder_layers=(0, 2))
  jax.tree.map(np.testing.assert_array_equal, params["encoder"]["layers_1"],
               teacher_params["encoder"]["layers_2"])
  jax.tree.map(np.testing.assert_array_equal, params["decoder"]["layers_0"],
               teacher_params["decoder"]["layers_1"])
  jax.tree.map(np.testing.assert_array_equal, params["lm_head"], teacher_params["lm_head"])
  # The result is a complete, usable parameter tree for the student config.
  shapes = jax.tree.map(jnp.shape, init_params(cfg, jax.random.key(0)))
  assert jax.tree.map(jnp.shape, params) == shapes
  T5(cfg).apply({"params": params}, *_tokens())
  with pytest.raises(ValueError, match="d_model"):
    student.init_student(cfg.replace(d_model=32, d_kv=8), jax.random.key(0), teacher_config=TINY,
                         teacher_params=teacher_params)


def test_bf16_compute_with_f32_params_is_close_to_f32():
  params = init_params(TINY, jax.random.key(0))
  enc, dec = _tokens()
  f32 = T5(TINY).apply({"params": params}, enc, dec).logits
  bf16 = T5(TINY.replace(dtype="bfloat16")).apply({"params": params}, enc, dec).logits
  assert bf16.dtype == jnp.float32  # the head returns float32 logits (logits_dtype)
  coarse = T5(TINY.replace(dtype="bfloat16", logits_dtype="bfloat16")).apply(
      {"params": params}, enc, dec).logits
  assert coarse.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  err = np.max(np.abs(np.asarray(bf16, np.float32) - f32)) / np.max(np.abs(f32))
  assert 0 < err < 3e-2


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_matmul_values_and_gradients_match_float64(dtype, rtol):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 4, 6))          # [batch, length, heads, d_kv]
  kernel = rng.standard_normal((4, 6, 7))       # [heads, d_kv, embed]
  cotangent = rng.standard_normal((3, 5, 7))
  out, vjp = jax.vjp(lambda a, b: matmul(a, b, 2),
                     jnp.asarray(x, dtype), jnp.asarray(kernel, dtype))
  grad_x, grad_kernel = vjp(jnp.asarray(cotangent, dtype))
  assert out.dtype == grad_x.dtype == grad_kernel.dtype == jnp.dtype(dtype)
  # float64 references: y = x . W over (heads, d_kv); dx = g . W^T; dW = x^T . g.
  ref_out = np.einsum("blhd,hde->ble", x, kernel)
  ref_x = np.einsum("ble,hde->blhd", cotangent, kernel)
  ref_kernel = np.einsum("blhd,ble->hde", x, cotangent)
  for got, ref in ((out, ref_out), (grad_x, ref_x), (grad_kernel, ref_kernel)):
    err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
    assert err < rtol
  with pytest.raises(ValueError, match="does not end with kernel input"):
    matmul(jnp.ones((2, 3)), jnp.ones((4, 5)), 1)


def _remat_loss(p, cfg, enc, dec):
  out = T5(cfg).apply({"params": p}, enc, dec, taps=Taps(encoder_self=(-1,)))
  return jnp.mean(out.logits ** 2) + jnp.mean(out.encoder_self[2].key ** 2)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_same_values_and_gradients(policy):
  params = init_params(TINY, jax.random.key(0))
  enc, dec = _tokens()
  base = jax.value_and_grad(_remat_loss)(params, TINY, enc, dec)
  remat = jax.value_and_grad(_remat_loss)(params, TINY.replace(remat_policy=policy), enc, dec)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base, remat)


def _dots_in_gradient(cfg):
  params = init_params(cfg, jax.random.key(0))
  lowered = jax.jit(jax.grad(_remat_loss), static_argnums=1).lower(params, cfg, *_tokens())
  return lowered.as_text().count("dot_general")


def test_remat_dots_policy_recomputes_no_matmul():
  # The dense projections go through a custom VJP that remat policies do not see
  # as dots; "dots" must still save every one of them, "full" recompute them.
  none = _dots_in_gradient(TINY)
  assert _dots_in_gradient(TINY.replace(remat_policy="dots")) == none
  assert _dots_in_gradient(TINY.replace(remat_policy="full")) > none


def test_dropout_only_when_enabled():
  params = init_params(TINY, jax.random.key(0))
  enc, dec = _tokens()
  model = T5(TINY.replace(dropout_rate=0.3))
  eval_a = model.apply({"params": params}, enc, dec).logits
  eval_b = model.apply({"params": params}, enc, dec).logits
  train = model.apply({"params": params}, enc, dec, enable_dropout=True,
                      rngs={"dropout": jax.random.key(3)}).logits
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.max(np.abs(train - eval_a)) > 1e-3


def test_taps_on_missing_layers_fail_clearly():
  params = init_params(TINY, jax.random.key(0))
  with pytest.raises(ValueError, match=r"decoder_cross=2 .*decoder has 2 layers.*-2\.\.1"):
    T5(TINY).apply({"params": params}, *_tokens(), taps=Taps(decoder_cross=(2,)))
  with pytest.raises(ValueError, match=r"encoder_self=-4"):
    Taps(encoder_self=(-4,)).normalize(TINY)
  assert Taps(encoder_self=(-1, 2, 0)).normalize(TINY).encoder_self == (0, 2)


def test_padding_content_does_not_change_valid_outputs():
  params = init_params(TINY, jax.random.key(0))
  enc, dec = _tokens()
  out = T5(TINY).apply({"params": params}, enc, dec)
  # Longer padding on the encoder side changes nothing for the decoder.
  enc_longer = jnp.pad(enc, ((0, 0), (0, 7)))
  out2 = T5(TINY).apply({"params": params}, enc_longer, dec)
  np.testing.assert_allclose(out.logits, out2.logits, rtol=1e-5, atol=1e-5)


def test_bad_config_values_are_rejected():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Config(feed_forward_proj="gated-swiglu")
  with pytest.raises(ValueError, match="d_model must be a positive integer"):
    T5Config(d_model=0)


# ---------------------------------------------------------------------------- bad checkpoints


@pytest.fixture()
def checkpoint(tmp_path):
  make_hf_model(family="v1_0", seed=0).save_pretrained(tmp_path)
  return tmp_path


def _edit_config(directory, **changes):
  path = directory / "config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))


def test_non_t5_config_is_rejected(checkpoint):
  _edit_config(checkpoint, model_type="bert")
  with pytest.raises(hf.CheckpointError, match="model_type='bert', not a T5"):
    hf.load_hf(str(checkpoint))


def test_mismatched_shapes_are_named(checkpoint):
  _edit_config(checkpoint, d_ff=64)
  with pytest.raises(hf.CheckpointError, match=r"DenseReluDense.wi.weight has shape \(48, 32\)"):
    hf.load_hf(str(checkpoint))


def test_missing_weights_are_named(checkpoint):
  _edit_config(checkpoint, num_layers=3)
  with pytest.raises(hf.CheckpointError, match=r"missing encoder.block.2.layer.0"):
    hf.load_hf(str(checkpoint))


def test_corrupt_and_missing_files_fail_clearly(checkpoint, tmp_path_factory):
  weights = checkpoint / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(hf.CheckpointError, match="corrupt or truncated"):
    hf.load_hf(str(checkpoint))
  weights.unlink()
  (checkpoint / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.CheckpointError, match=r"Refusing .*pytorch_model.bin.*cannot read it"):
    hf.load_hf(str(checkpoint))
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load_hf(str(empty))
  with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
    hf.load_hf(str(empty / "nope"))


def test_hub_id_without_network_says_what_to_do(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(FileNotFoundError, match="download it elsewhere.*local directory"):
    hf.load_hf("google/t5-v1_1-does-not-exist")


def test_save_hf_rejects_params_of_another_config(tmp_path):
  params = init_params(TINY, jax.random.key(0))
  with pytest.raises(ValueError, match="shape"):
    hf.save_hf(TINY.replace(d_ff=16), params, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")
