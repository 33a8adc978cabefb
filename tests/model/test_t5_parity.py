"""Our Flax T5 against Hugging Face's PyTorch T5 on the same weights."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from miniend_jax.model import hf
from miniend_jax.model.t5 import T5, Taps, T5Config, relative_position_buckets
from tests.model.hf_testing import hf_logits, make_hf_model, padded_batch, rel_error

CASES = [
    dict(family="v1_0", seed=0),
    dict(family="v1_1", seed=1),
    dict(family="v1_0", seed=2, d_model=24, d_kv=6, num_heads=3, d_ff=40, num_layers=3,
         num_decoder_layers=1, num_buckets=16, max_distance=20),
    dict(family="v1_1", seed=3, d_model=16, d_kv=16, num_heads=2, d_ff=24, num_layers=1,
         num_decoder_layers=2, num_buckets=8, max_distance=12),
]


def _our_logits(config, params, enc, dec_in, **kwargs):
  return np.asarray(T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in),
                                     **kwargs).logits)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['family']}-seed{c['seed']}")
def test_logits_match_transformers(case, tmp_path):
  model = make_hf_model(**case)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  assert config.tie_word_embeddings == (case["family"] == "v1_0")
  rng = np.random.default_rng(case["seed"])
  # Long enough that relative distances cross the log-spaced bucket boundaries.
  enc, dec_in, _ = padded_batch(rng, model.config.vocab_size, batch=3, input_len=70, target_len=37)
  reference = hf_logits(model, enc, dec_in)
  ours = _our_logits(config, params, enc, dec_in)
  assert ours.shape == reference.shape
  assert rel_error(ours, reference) < 1e-4


@pytest.mark.parametrize("family", ["v1_0", "v1_1"])
def test_save_hf_loads_in_transformers_with_same_logits(family, tmp_path):
  model = make_hf_model(family=family, seed=5)
  model.save_pretrained(tmp_path / "src")
  config, params = hf.load_hf(str(tmp_path / "src"))
  # Perturb so the export cannot pass by echoing the source files.
  params = jax.tree.map(lambda x: x * 1.1, params)
  hf.save_hf(config, params, str(tmp_path / "out"))
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  enc, dec_in, _ = padded_batch(np.random.default_rng(0), config.vocab_size, 2, 20, 11)
  assert rel_error(_our_logits(config, params, enc, dec_in), hf_logits(reloaded, enc, dec_in)) < 1e-4
  # And our reader round-trips our writer exactly.
  config2, params2 = hf.load_hf(str(tmp_path / "out"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_loads(tmp_path):
  model = make_hf_model(family="v1_1", seed=7)
  model.save_pretrained(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / hf.WEIGHTS_INDEX_NAME)
  _, single = hf.load_hf(str(tmp_path / "single"))
  _, sharded = hf.load_hf(str(tmp_path / "sharded"))
  jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_save_hf_shards_and_copies_tokenizer(tmp_path):
  model = make_hf_model(family="v1_0", seed=8)
  model.save_pretrained(tmp_path / "src")
  (tmp_path / "src" / "spiece.model").write_bytes(b"not-really-a-model")
  config, params = hf.load_hf(str(tmp_path / "src"))
  hf.save_hf(config, params, str(tmp_path / "out"), tokenizer_from=str(tmp_path / "src"),
             max_shard_size="20KB")
  index = json.loads((tmp_path / "out" / hf.WEIGHTS_INDEX_NAME).read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert (tmp_path / "out" / "spiece.model").read_bytes() == b"not-really-a-model"
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  enc, dec_in, _ = padded_batch(np.random.default_rng(1), config.vocab_size, 2, 9, 5)
  assert rel_error(_our_logits(config, params, enc, dec_in), hf_logits(reloaded, enc, dec_in)) < 1e-4


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance",
                         [(True, 32, 128), (False, 32, 128), (True, 16, 20), (False, 8, 12)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
  length = 300
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  reference = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      relative, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
  ours = relative_position_buckets(length, length, bidirectional=bidirectional,
                                   num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(ours, reference.numpy())


@pytest.mark.parametrize("family", ["v1_0", "v1_1"])
def test_taps_match_transformers_projections(family, tmp_path):
  model = make_hf_model(family=family, seed=11, num_layers=3, num_decoder_layers=2)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  enc, dec_in, _ = padded_batch(np.random.default_rng(2), config.vocab_size, 2, 13, 7)

  captured = {}
  hooks = []
  def hook(name):
    return lambda module, inputs, output: captured.__setitem__(name, output.detach().numpy())
  for i, block in enumerate(model.encoder.block):
    for p in "qkv":
      hooks.append(getattr(block.layer[0].SelfAttention, p).register_forward_hook(hook(f"enc{i}{p}")))
  for i, block in enumerate(model.decoder.block):
    for p in "qkv":
      hooks.append(getattr(block.layer[0].SelfAttention, p).register_forward_hook(hook(f"dself{i}{p}")))
      hooks.append(getattr(block.layer[1].EncDecAttention, p).register_forward_hook(hook(f"dcross{i}{p}")))
  hf_logits(model, enc, dec_in)
  for h in hooks:
    h.remove()

  taps = Taps(encoder_self=(0, -1), decoder_self=(-1,), decoder_cross=(0, 1))
  out = T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in), taps=taps)
  assert sorted(out.encoder_self) == [0, 2]
  assert sorted(out.decoder_self) == [1]
  assert sorted(out.decoder_cross) == [0, 1]
  for kind, ours in (("enc", out.encoder_self), ("dself", out.decoder_self),
                     ("dcross", out.decoder_cross)):
    for layer, tap in ours.items():
      for p, value in zip("qkv", (tap.query, tap.key, tap.value)):
        reference = captured[f"{kind}{layer}{p}"]
        assert value.shape == reference.shape
        assert rel_error(value, reference) < 1e-4, (kind, layer, p)


def test_hidden_taps_match_transformers_hidden_states(tmp_path):
  model = make_hf_model(family="v1_1", seed=12, num_layers=3, num_decoder_layers=2)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  enc, dec_in, _ = padded_batch(np.random.default_rng(3), config.vocab_size, 2, 10, 6)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                attention_mask=torch.as_tensor(enc != 0, dtype=torch.long),
                decoder_input_ids=torch.as_tensor(dec_in, dtype=torch.long),
                output_hidden_states=True)
  out = T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in),
                         taps=Taps(encoder_hidden=(0, 1), decoder_hidden=(0,)))
  # HF's hidden_states[i + 1] is block i's output; the last one is after the final norm.
  for i in (0, 1):
    assert rel_error(out.encoder_hidden[i], ref.encoder_hidden_states[i + 1].numpy()) < 1e-4
  assert rel_error(out.decoder_hidden[0], ref.decoder_hidden_states[1].numpy()) < 1e-4
