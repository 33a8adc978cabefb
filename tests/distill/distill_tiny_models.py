"""Tiny T5 teacher/student pairs for recipe tests (shapes chosen to differ)."""

import jax
import jax.numpy as jnp
import numpy as np

from miniend_jax.model.t5 import T5, T5Config, init_params

VOCAB = 29


def config(**kw):
  base = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2,
              num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
              relative_attention_max_distance=16, feed_forward_proj="relu",
              tie_word_embeddings=True, dropout_rate=0.0, dtype="float32",
              param_dtype="float32")
  base.update(kw)
  return T5Config(**base)


# Teacher: wider, more heads and layers than the student; widths 36 vs 16.
TEACHER = config(d_model=20, d_kv=12, num_heads=3, num_layers=3,
                 num_decoder_layers=3, d_ff=32)
STUDENT = config()
# Deep enough for the 3B recipe's teacher layer -4, and 64 wide for its 64
# relation heads.
DEEP = config(num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=16)


def params(cfg, seed):
  return init_params(cfg, jax.random.key(seed))


def batch(seed=0, batch_size=2, in_len=7, tgt_len=5):
  """Span-corruption-like batch with padding in both encoder and decoder."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, VOCAB, size=(batch_size, in_len))
  tgt = rng.integers(2, VOCAB, size=(batch_size, tgt_len))
  enc[1, in_len - 3:] = 0
  tgt[1, tgt_len - 2:] = 0
  dec_in = np.concatenate([np.zeros((batch_size, 1), int), tgt[:, :-1]], axis=1)
  return {
      "encoder_input_tokens": jnp.asarray(enc, jnp.int32),
      "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
      "decoder_target_tokens": jnp.asarray(tgt, jnp.int32),
      "decoder_loss_weights": jnp.asarray(tgt > 0, jnp.float32),
  }


def apply(cfg, p, b, taps):
  return T5(cfg).apply({"params": p}, b["encoder_input_tokens"],
                       b["decoder_input_tokens"],
                       decoder_target_tokens=b["decoder_target_tokens"], taps=taps)
