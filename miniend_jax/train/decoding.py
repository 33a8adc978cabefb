"""Greedy and beam-search decoding with a key/value cache, jit-compatible.

Both run the encoder once and the decoder one position per step
(`T5.decode_step`), so a step costs O(length) instead of re-running the whole
prefix. Token 0 is the decoder's start token and padding; generation of a row
stops at EOS (id 1 in T5 vocabularies) and everything after it is 0.

seqio's evaluator calls a `predict_fn` on batches; `train/steps.py` wraps these.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from miniend_jax.model.config import T5Config
from miniend_jax.model.params import unstack_layer_params
from miniend_jax.model.t5 import T5

Array = jax.Array

EOS_ID = 1
_NEG_INF = -1e9  # Finite: -inf - -inf would be NaN in score arithmetic.


def _init_cache(model: T5, params: Mapping, encoded: Array, encoder_input_tokens: Array,
                max_decode_length: int):
  """Zeros shaped like the decoder cache for `max_decode_length` positions."""
  batch = encoder_input_tokens.shape[0]
  allocate = functools.partial(model.apply, method=T5.decode_step, mutable=["cache"],
                               max_decode_length=max_decode_length)
  shapes = jax.eval_shape(allocate, {"params": params}, encoded, encoder_input_tokens,
                          jnp.zeros((batch, max_decode_length), jnp.int32))[1]["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step_log_probs(model, params, cache, encoded, encoder_input_tokens, tokens, max_len):
  """Log-probabilities of the next token, float32 [batch, vocab], and the new cache."""
  logits, variables = model.apply({"params": params, "cache": cache}, encoded,
                                  encoder_input_tokens, tokens[:, None], max_len,
                                  method=T5.decode_step, mutable=["cache"])
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), variables["cache"]


def unrolled(config: T5Config, params: Mapping) -> tuple[T5Config, Mapping]:
  """The unrolled layout of a scanned model: the key/value cache is per layer."""
  if not config.scan_layers:
    return config, params
  return config.replace(scan_layers=False), unstack_layer_params(params, config)


def greedy_decode(config: T5Config, params: Mapping, encoder_input_tokens: Array, *,
                  max_decode_length: int, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Greedy decoding.

  Args:
    encoder_input_tokens: int [batch, input_len], 0 = padding.
    max_decode_length: the most tokens generated per row.

  Returns:
    tokens: int32 [batch, max_decode_length], 0 after each row's EOS.
    log_probs: float32 [batch], the sum of the chosen tokens' log-probabilities.
  """
  config, params = unrolled(config, params)
  model = T5(config)
  batch = encoder_input_tokens.shape[0]
  encoded = model.apply({"params": params}, encoder_input_tokens, method=T5.encode)
  cache = _init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)

  def cond(state):
    step, _, _, _, done, _ = state
    return (step < max_decode_length) & ~jnp.all(done)

  def body(state):
    step, cache, previous, tokens, done, total = state
    log_probs, cache = _step_log_probs(model, params, cache, encoded, encoder_input_tokens,
                                       previous, max_decode_length)
    chosen = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    chosen = jnp.where(done, 0, chosen)
    picked = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    total = total + jnp.where(done, 0.0, picked)
    tokens = tokens.at[:, step].set(chosen)
    return step + 1, cache, chosen, tokens, done | (chosen == eos_id), total

  init = (jnp.zeros((), jnp.int32), cache, jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.float32))
  _, _, _, tokens, _, total = jax.lax.while_loop(cond, body, init)
  return tokens, total


def brevity_penalty(length: Array, alpha: float) -> Array:
  """GNMT / T5 length normalisation ((5 + length) / 6) ** alpha."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(config: T5Config, params: Mapping, encoder_input_tokens: Array, *,
                max_decode_length: int, num_beams: int = 4, alpha: float = 0.6,
                eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Beam search with GNMT length normalisation (T5's decoding: 4 beams, alpha 0.6).

  Finished hypotheses (ending in EOS) are scored sum(log p) / brevity_penalty(len).
  A row stops early once no live beam can beat its worst kept finished hypothesis.
  Rows that finish nothing by max_decode_length return their live beams.

  Args:
    encoder_input_tokens: int [batch, input_len].
    max_decode_length: the most tokens per hypothesis.
    num_beams: beams kept per row.
    alpha: length-normalisation exponent (0 = plain log-probability).

  Returns:
    tokens: int32 [batch, num_beams, max_decode_length], best first, 0 after EOS.
    scores: float32 [batch, num_beams], normalised scores, descending.
  """
  config, params = unrolled(config, params)
  model = T5(config)
  batch, k, max_len = encoder_input_tokens.shape[0], num_beams, max_decode_length
  flat_inputs = jnp.repeat(encoder_input_tokens, k, axis=0)  # [batch * k, input_len]
  encoded = model.apply({"params": params}, flat_inputs, method=T5.encode)
  cache = _init_cache(model, params, encoded, flat_inputs, max_len)

  def gather_beams(x, beam_index):
    """Selects beams per row: x [batch, k_in, ...], beam_index [batch, k_out]."""
    return jnp.take_along_axis(
        x, beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2)), axis=1)

  def gather_cache(cache, beam_index):
    """Same for cache leaves [batch * k, ...]; the scalar cache positions are shared."""
    def gather(x):
      if x.ndim == 0:
        return x
      x = gather_beams(x.reshape((batch, k) + x.shape[1:]), beam_index)
      return x.reshape((batch * k,) + x.shape[2:])
    return jax.tree.map(gather, cache)

  def cond(state):
    step, _, alive_log_p, _, finished_scores, _ = state
    # Log-probabilities only fall, and the penalty is largest at max_len.
    best_alive = alive_log_p[:, 0] / brevity_penalty(jnp.asarray(max_len), alpha)
    worst_finished = jnp.min(finished_scores, axis=1)
    can_improve = jnp.any(best_alive > worst_finished)
    return (step < max_len) & can_improve

  def body(state):
    step, cache, alive_log_p, alive_seqs, finished_scores, finished_seqs = state
    previous = jnp.where(step == 0, 0, alive_seqs[:, :, jnp.maximum(step - 1, 0)])
    log_probs, cache = _step_log_probs(model, params, cache, encoded, flat_inputs,
                                       previous.reshape(-1), max_len)
    vocab = log_probs.shape[-1]
    candidates = (alive_log_p[:, :, None] + log_probs.reshape(batch, k, vocab)).reshape(batch, -1)
    # 2k candidates always include k that do not end in EOS.
    top_log_p, top_index = jax.lax.top_k(candidates, 2 * k)
    top_beam, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_seqs = gather_beams(alive_seqs, top_beam).at[:, :, step].set(top_token)
    ends = top_token == eos_id

    # Live beams: the best k candidates that did not end.
    alive_candidates = jnp.where(ends, _NEG_INF, top_log_p)
    new_alive_log_p, alive_pick = jax.lax.top_k(alive_candidates, k)
    new_alive_seqs = jnp.take_along_axis(top_seqs, alive_pick[:, :, None], axis=1)
    cache = gather_cache(cache, jnp.take_along_axis(top_beam, alive_pick, axis=1))

    # Finished: merge the kept ones with candidates that ended now.
    new_scores = jnp.where(ends, top_log_p / brevity_penalty(step + 1, alpha), _NEG_INF)
    merged_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    merged_seqs = jnp.concatenate([finished_seqs, top_seqs], axis=1)
    finished_scores, keep = jax.lax.top_k(merged_scores, k)
    finished_seqs = jnp.take_along_axis(merged_seqs, keep[:, :, None], axis=1)
    return step + 1, cache, new_alive_log_p, new_alive_seqs, finished_scores, finished_seqs

  # Beam 0 starts live; the others start dead so step 0 does not pick k copies.
  alive_log_p = jnp.tile(jnp.asarray([0.0] + [_NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  init = (jnp.zeros((), jnp.int32), cache, alive_log_p,
          jnp.zeros((batch, k, max_len), jnp.int32),
          jnp.full((batch, k), _NEG_INF, jnp.float32),
          jnp.zeros((batch, k, max_len), jnp.int32))
  _, _, alive_log_p, alive_seqs, finished_scores, finished_seqs = jax.lax.while_loop(
      cond, body, init)

  none_finished = jnp.all(finished_scores <= _NEG_INF / 2, axis=1)
  alive_scores = alive_log_p / brevity_penalty(jnp.asarray(max_len), alpha)
  tokens = jnp.where(none_finished[:, None, None], alive_seqs, finished_seqs)
  scores = jnp.where(none_finished[:, None], alive_scores, finished_scores)
  return tokens, scores
