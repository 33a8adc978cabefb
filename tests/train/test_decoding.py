"""Greedy and beam search against Hugging Face generate and exhaustive search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from miniend_jax.model import hf
from miniend_jax.model.t5 import T5, T5Config, init_params
from miniend_jax.train import decoding
from tests.model.hf_testing import make_hf_model


def _inputs(vocab, batch=3, length=9, seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
  enc[1, 5:] = 0
  return enc


@pytest.mark.parametrize("family", ["v1_0", "v1_1"])
def test_greedy_equals_transformers_generate(family, tmp_path):
  model = make_hf_model(family=family, seed=4, vocab_size=50)
  model.save_pretrained(tmp_path)
  config, params = hf.load_hf(str(tmp_path))
  enc = _inputs(config.vocab_size)
  max_len = 12
  with torch.no_grad():
    reference = model.generate(input_ids=torch.as_tensor(enc, dtype=torch.long),
                               attention_mask=torch.as_tensor(enc != 0, dtype=torch.long),
                               max_new_tokens=max_len, num_beams=1, do_sample=False,
                               min_length=0, decoder_start_token_id=0, pad_token_id=0,
                               eos_token_id=1, use_cache=False).numpy()[:, 1:]  # drop the start token
  reference = np.pad(reference, ((0, 0), (0, max_len - reference.shape[1])))
  tokens, _ = jax.jit(lambda p, e: decoding.greedy_decode(config, p, e, max_decode_length=max_len)
                      )(params, jnp.asarray(enc))
  np.testing.assert_array_equal(np.asarray(tokens), reference)


def _sequence_log_probs(config, params, enc, seqs):
  """Sum of log p(seq | enc row) of each row's sequences by one teacher-forced forward pass.

  enc: int [rows, input_len]; seqs: per row, a list of token lists (each ending in EOS),
  float64 [rows, len(seqs[row])]. A sequence is padded after its end: the decoder is
  causal, so its positions never see the padding, and only its own positions are summed.
  """
  width = max(len(seq) for row in seqs for seq in row)
  tokens = np.array([[seq + [0] * (width - len(seq)) for seq in row] for row in seqs], np.int32)
  rows, count = tokens.shape[:2]
  dec_in = np.pad(tokens[..., :-1], ((0, 0), (0, 0), (1, 0))).reshape(rows * count, width)
  forward = jax.jit(lambda p, e, d: jax.nn.log_softmax(
      T5(config).apply({"params": p}, e, d).logits.astype(jnp.float32), axis=-1))
  log_p = np.asarray(forward(params, jnp.asarray(np.repeat(enc, count, axis=0)),
                             jnp.asarray(dec_in)), np.float64).reshape(rows, count, width, -1)
  chosen = np.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0]
  lengths = np.array([[len(seq) for seq in row] for row in seqs])
  return np.where(np.arange(width) < lengths[..., None], chosen, 0.0).sum(-1)


def test_beam_search_finds_the_exhaustive_optimum():
  # Vocabulary of 5 (0 pad, 1 EOS) and 3 steps: every hypothesis can be enumerated.
  config = T5Config(vocab_size=5, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                    dropout_rate=0.0)
  params = init_params(config, jax.random.key(7))
  params = jax.tree.map(lambda x: x * 3.0, params)  # sharper distributions
  enc = _inputs(5, batch=2, length=6, seed=1)
  max_len, alpha = 3, 0.6
  # Without EOS a hypothesis only counts when nothing finishes; rank finished ones.
  candidates = [list(body) + [1] for length in range(1, max_len + 1)
                for body in itertools.product([0, 2, 3, 4], repeat=length - 1)]
  log_probs = _sequence_log_probs(config, params, enc, [candidates] * len(enc))
  best = []
  for row_log_probs in log_probs:
    scored = [(log_p / ((5 + len(seq)) / 6) ** alpha, seq + [0] * (max_len - len(seq)))
              for log_p, seq in zip(row_log_probs, candidates)]
    best.append(max(scored))
  # 4 non-EOS tokens (pad included: nothing forbids it) and 3 steps: 16 live beams
  # are never pruned.
  tokens, scores = jax.jit(lambda p, e: decoding.beam_search(
      config, p, e, max_decode_length=max_len, num_beams=16, alpha=alpha))(params, jnp.asarray(enc))
  for row, (score, seq) in enumerate(best):
    np.testing.assert_array_equal(np.asarray(tokens[row, 0]), seq)
    np.testing.assert_allclose(float(scores[row, 0]), score, rtol=1e-5)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 1e-6)  # best first


def test_beam_search_is_at_least_as_good_as_greedy():
  config = T5Config(vocab_size=11, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
  params = jax.tree.map(lambda x: x * 2.5, init_params(config, jax.random.key(3)))
  enc = jnp.asarray(_inputs(11, batch=4, length=7, seed=2))
  max_len = 6
  # One program for the three searches (op-by-op, their set-up compiles dozens).
  greedy, greedy_log_p, one_beam, one_beam_scores, beams, beam_scores = jax.jit(lambda p, e: (
      *decoding.greedy_decode(config, p, e, max_decode_length=max_len),
      *decoding.beam_search(config, p, e, max_decode_length=max_len, num_beams=1, alpha=0.0),
      *decoding.beam_search(config, p, e, max_decode_length=max_len, num_beams=4, alpha=0.0)))(
          params, enc)
  finished = np.any(np.asarray(greedy) == 1, axis=1)
  assert finished.any()
  for row in np.flatnonzero(finished):
    # One beam is greedy search; more beams never score worse.
    np.testing.assert_array_equal(np.asarray(one_beam[row, 0]), np.asarray(greedy[row]))
    np.testing.assert_allclose(float(one_beam_scores[row, 0]), float(greedy_log_p[row]), rtol=1e-5)
    assert float(beam_scores[row, 0]) >= float(greedy_log_p[row]) - 1e-5
