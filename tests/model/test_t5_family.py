"""The T5 family against transformers' own classes: UL2's gated-SiLU (and other
activations), mT5, umT5 (a relative-position table per layer) and ByT5 shapes.

Each tiny random model is built by transformers, saved, read by `hf.load_hf`
and compared: logits, taps against forward hooks, `save_hf` back to a model
`AutoModelForSeq2SeqLM` loads with the same logits, and (umT5) incremental
decoding against the teacher-forced forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from miniend_jax.model import hf, presets
from miniend_jax.model.config import count_params
from miniend_jax.model.t5 import T5, Taps
from miniend_jax.train import decoding
from tests.model.hf_testing import hf_logits, make_model, padded_batch, rel_error

CASES = {
    "ul2-gated-silu": dict(model_type="t5", feed_forward_proj="gated-silu"),
    "t5-gelu-exact": dict(model_type="t5", feed_forward_proj="gelu", tie_word_embeddings=True),
    "t5-gated-relu": dict(model_type="t5", feed_forward_proj="gated-relu"),
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu"),
    "umt5": dict(model_type="umt5", feed_forward_proj="gated-gelu"),
    # ByT5: byte vocabulary (3 specials + 256 bytes, padded to 384), deep encoder.
    "byt5-shaped": dict(model_type="t5", feed_forward_proj="gated-gelu", vocab_size=384,
                        num_layers=3, num_decoder_layers=1),
}


def _ours(config, params, enc, dec_in, **kwargs):
  return T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in), **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_export_match_transformers(name, tmp_path):
  case = dict(CASES[name])
  model = make_model(case.pop("model_type"), seed=len(name), **case)
  model.save_pretrained(tmp_path / "src")
  config, params = hf.load_hf(str(tmp_path / "src"))
  assert config.feed_forward_proj == case["feed_forward_proj"]
  assert config.relative_bias_per_layer == (name == "umt5")
  enc, dec_in, _ = padded_batch(np.random.default_rng(0), config.vocab_size, batch=3,
                                input_len=60, target_len=33)  # crosses the log buckets
  reference = hf_logits(model, enc, dec_in)
  assert rel_error(_ours(config, params, enc, dec_in).logits, reference) < 1e-4

  # Exported (perturbed, so it cannot echo the source), loaded by transformers' Auto class.
  params = jax.tree.map(lambda x: x * 1.1, params)
  hf.save_hf(config, params, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded).__name__ == ("UMT5ForConditionalGeneration" if name == "umt5"
                                     else "T5ForConditionalGeneration")
  assert rel_error(_ours(config, params, enc, dec_in).logits,
                   hf_logits(reloaded, enc, dec_in)) < 1e-4
  assert hf.load_hf(str(tmp_path / "out"))[0] == config


@pytest.mark.parametrize("name", ["umt5", "ul2-gated-silu"])
def test_taps_match_forward_hooks(name, tmp_path):
  case = dict(CASES[name])
  model = make_model(case.pop("model_type"), seed=3, **case)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  enc, dec_in, _ = padded_batch(np.random.default_rng(1), config.vocab_size, 2, 13, 7)
  captured, hooks = {}, []
  for kind, blocks, sub in (("encoder_self", model.encoder.block, lambda b: b.layer[0].SelfAttention),
                            ("decoder_self", model.decoder.block, lambda b: b.layer[0].SelfAttention),
                            ("decoder_cross", model.decoder.block,
                             lambda b: b.layer[1].EncDecAttention)):
    for i, block in enumerate(blocks):
      for p in "qkv":
        hooks.append(getattr(sub(block), p).register_forward_hook(
            lambda m, inputs, out, key=(kind, i, p): captured.__setitem__(key, out.numpy())))
  hf_logits(model, enc, dec_in)
  for h in hooks:
    h.remove()
  out = _ours(config, params, enc, dec_in,
              taps=Taps(encoder_self=(0, 1), decoder_self=(1, 2), decoder_cross=(0, 2)))
  for kind in ("encoder_self", "decoder_self", "decoder_cross"):
    for layer, tap in getattr(out, kind).items():
      for p, value in zip("qkv", (tap.query, tap.key, tap.value)):
        assert rel_error(value, captured[(kind, layer, p)]) < 1e-4, (kind, layer, p)


def test_umt5_incremental_decoding_equals_the_full_forward(tmp_path):
  """Each decoder layer's own table must be read at the cached position."""
  model = make_model("umt5", seed=4)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  enc, _, _ = padded_batch(np.random.default_rng(2), config.vocab_size, 3, 17, 5)
  tokens, total = decoding.greedy_decode(config, params, jnp.asarray(enc), max_decode_length=9,
                                         eos_id=-1)
  dec_in = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), tokens[:, :-1]], axis=1)
  log_probs = jax.nn.log_softmax(_ours(config, params, enc, dec_in).logits, axis=-1)
  np.testing.assert_array_equal(jnp.argmax(log_probs, axis=-1), tokens)
  chosen = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0].sum(-1)
  np.testing.assert_allclose(total, chosen, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,published", [
    # model.num_parameters() of the published Hugging Face checkpoints.
    ("flan-t5-base", 247_577_856), ("flan-t5-large", 783_150_080),
    ("mt5-small", 300_176_768), ("mt5-base", 582_401_280), ("byt5-small", 299_637_760)])
def test_family_presets_have_the_published_sizes(name, published):
  assert count_params(presets.get_model_config(name)) == published


def test_count_params_matches_initialised_umt5_and_ul2_layouts():
  # Shapes alone (count_params) against real parameter trees, per-layer tables included.
  for name in ("umt5-small", "ul2"):
    config = presets.get_model_config(name).replace(
        vocab_size=96, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=2,
        num_decoder_layers=3)
    shapes = jax.eval_shape(lambda: T5(config).init(
        jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32))["params"])
    leaves = jax.tree.leaves(shapes)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == count_params(config), name


def test_unknown_activation_is_named():
  with pytest.raises(ValueError, match="gated-silu"):
    presets.get_model_config("t5-small", feed_forward_proj="gated-swiglu")
