"""The relation KL computed block by block: no `[batch, heads, len_a, len_b]`
array, forward or backward.

`relations.relation_kl` (MiniLMv2 Q-Q / K-K / V-V relations) is a softmax
over `len_a x len_b` scores per relation head. Formed whole, each float32
`[batch, heads, len_a, len_b]` array of a T5-base step at 512 tokens and 64
rows per chip is 805 MB, and autodiff keeps several per relation (both
sides' scores, log-softmaxes, the target, the KL terms): they dominate the
step's memory traffic (issue 26). Here the same value is computed over
`[batch, heads, block, block]` tiles:

* for each block of query rows, a first loop over key blocks keeps each
  row's running max and sum of exponentials (the online softmax) of the
  target's scores and of the student's, giving their log-sum-exps `lse_t`,
  `lse_s`;
* a second loop accumulates the row's KL `sum_k p_t,k ((t_k - lse_t) - (s_k
  - lse_s))`, tile by tile, in float32, and, when a gradient is wanted, that
  gradient too: the loss is a scalar, so its cotangent only scales it. In
  the student's scores it is `(p_s - p_t)` on the row's allowed keys (the
  target is a constant: teacher scores, or with interpolation `a * t + (1 -
  a) * stop_gradient(s)`), sent straight to `student_a` / `student_b` with
  two small matmuls per tile.

`jax.custom_vjp`: the forward keeps the student's two gradients (its own
shapes) and the backward multiplies them by `g / rows`; the teacher gets no
gradient and keeps no residual. Each score tile is formed twice in all (the
fused "loss and gradient" of Liger-Kernel's losses), against three times for
a separate backward pass that recomputes the tiles.

With a causal mask the key tiles right of the diagonal are skipped (half the
work). Masked keys get the same large negative score as in the explicit
version, so both compute the same thing; rows that see no key do not count.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from miniend_jax.distill.common import PRECISION, Array, safe_divide

# Score given to disallowed keys before the softmax. Finite (not -inf) so that
# masked rows and their gradients never produce inf - inf = NaN; exp(-1e9)
# underflows to exactly 0 in float32, so masked keys get no probability.
MASKED_SCORE = -1e9

# Rows and keys per tile. A tile's float32 scores are `batch * heads * 256 *
# 256 * 4` bytes (100 MB for 64 rows x 6 relation heads per chip), a quarter
# of a whole 512 x 512 relation; sequences up to this long are one tile.
# Measured for the base run's 512-token K-K relation on v4-8 (AOT,
# benchmarks/relation_kl_aot.py): 256-tiles access 6.7 GB per chip with 0.34
# GB of temporaries, 128-tiles 8.6 GB (more loop iterations, each reading and
# updating the key gradient) with 0.1 GB; the explicit version 6.6 GB and 1.9
# GB. On CPU 256 was as fast as 128 or faster.
DEFAULT_BLOCK_SIZE = 256


class _Masks(NamedTuple):
  """Per-position masks of rows (`query_*`, `[batch, len_a]`) and keys
  (`key_*`, `[batch, len_b]`); segment ids are zeros when not packed."""

  query_mask: Array
  key_mask: Array
  query_segment_ids: Array
  key_segment_ids: Array


def _slice(x: Array, index, size: int) -> Array:
  """Block `index` of `size` positions along axis 1."""
  return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _tile_allowed(masks: _Masks, i, j, block_q: int, block_k: int,
                  causal: bool) -> Array:
  """bool `[batch, 1, block_q, block_k]`: which keys of tile (i, j) each row sees."""
  qm, km = _slice(masks.query_mask, i, block_q), _slice(masks.key_mask, j, block_k)
  qs = _slice(masks.query_segment_ids, i, block_q)
  ks = _slice(masks.key_segment_ids, j, block_k)
  allowed = qm[:, :, None] & km[:, None, :] & (qs[:, :, None] == ks[:, None, :])
  if causal:
    rows = i * block_q + jnp.arange(block_q)
    keys = j * block_k + jnp.arange(block_k)
    allowed &= (keys[None, :] <= rows[:, None])[None]
  return allowed[:, None]


def _tile_scores(a: Array, b: Array, allowed: Array) -> Array:
  """Masked float32 relation scores `[batch, heads, bq, bk]` of `a` `[batch, bq,
  heads, d]` over `b` `[batch, bk, heads, d]`: `a . b / sqrt(d)`, as
  `relations.relation_scores` computes them."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", a, b,
                      preferred_element_type=jnp.float32, precision=PRECISION)
  scores = scores * (1.0 / float(a.shape[-1]) ** 0.5)
  return jnp.where(allowed, scores, MASKED_SCORE)


def _tile(operands, masks: _Masks, alpha, i, j, block_q, block_k, causal,
          interpolate):
  """(target scores, student scores, allowed) of tile (i, j).

  The target's scores are the teacher's, or with interpolation `a * t + (1 -
  a) * s` (`common.interpolated_log_target`'s mixture, before the softmax;
  the student's part is a constant of the backward pass, which never
  differentiates through this).
  """
  ta, tb, sa, sb = operands
  allowed = _tile_allowed(masks, i, j, block_q, block_k, causal)
  t = _tile_scores(_slice(ta, i, block_q), _slice(tb, j, block_k), allowed)
  s = _tile_scores(_slice(sa, i, block_q), _slice(sb, j, block_k), allowed)
  if interpolate:
    t = alpha * t + (1.0 - alpha) * s
  return t, s, allowed


def _key_blocks(i, num_k: int, causal: bool):
  """Upper bound of the key-tile loop for row tile i: with a causal mask (and
  square tiles) the tiles right of the diagonal are all masked."""
  return i + 1 if causal else num_k


def _online_lse(carry, scores):
  """One step of a running log-sum-exp over the last axis (max, sum of exp)."""
  running_max, running_sum = carry
  new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
  running_sum = (running_sum * jnp.exp(running_max - new_max)
                 + jnp.sum(jnp.exp(scores - new_max[..., None]), axis=-1))
  return new_max, running_sum


def _row_statistics(tile, upper, batch, heads, block_q):
  """First pass over row tile i's key tiles: the target's and the student's
  row log-sum-exps `[batch, heads, bq]` and the rows that see a key
  `[batch, bq]`, by a running (online) max and sum of exponentials."""

  def body(j, carry):
    target, student, seen = carry
    t, s, allowed = tile(j)
    return (_online_lse(target, t), _online_lse(student, s),
            seen | jnp.any(allowed[:, 0], axis=-1))

  start = (jnp.full((batch, heads, block_q), -jnp.inf, jnp.float32),
           jnp.zeros((batch, heads, block_q), jnp.float32))
  (t_max, t_sum), (s_max, s_sum), seen = jax.lax.fori_loop(
      0, upper, body, (start, start, jnp.zeros((batch, block_q), bool)))
  return t_max + jnp.log(t_sum), s_max + jnp.log(s_sum), seen


def _passes(operands, masks, alpha, *, causal, interpolate, block_q, block_k,
            with_gradients):
  """The KL summed over rows that see a key, their count (times heads), and
  with gradients the student's a and b gradients of that sum (float32).

  For each row tile: a first pass over its key tiles gets the row
  log-sum-exps (`_row_statistics`); a second accumulates each row's KL
  `sum_k p_t,k ((t_k - lse_t) - (s_k - lse_s))` and, since the loss is a
  scalar whose cotangent only scales this, its gradient: d KL_row / d s_k =
  p_s,k - p_t,k on the row's allowed keys, through `s = a . b / sqrt(d)` to
  `d a_q = sum_k ds_qk b_k / sqrt(d)` (per row tile) and `d b_k = sum_q
  ds_qk a_q / sqrt(d)` (accumulated over row tiles). Every score tile is
  formed twice, forward and backward together.
  """
  ta, _, sa, sb = operands
  batch, _, heads, _ = ta.shape
  num_q, num_k = ta.shape[1] // block_q, operands[1].shape[1] // block_k
  scale = 1.0 / float(sa.shape[-1]) ** 0.5

  def row_block(i, carry):
    total, count, d_sa, d_sb = carry
    tile = functools.partial(_tile, operands, masks, alpha, i, block_q=block_q,
                             block_k=block_k, causal=causal,
                             interpolate=interpolate)
    upper = _key_blocks(i, num_k, causal)
    lse_t, lse_s, seen = _row_statistics(tile, upper, batch, heads, block_q)
    row_weight = seen[:, None, :, None].astype(jnp.float32)
    a_i = _slice(sa, i, block_q)

    def key_block(j, carry):
      kl_rows, d_a, d_sb = carry
      t, s, allowed = tile(j)
      log_target = t - lse_t[..., None]
      log_student = s - lse_s[..., None]
      p_target = jnp.exp(log_target)
      # `where`, not a product with a 0 probability: a masked entry's log
      # ratio is never read.
      kl_rows = kl_rows + jnp.sum(
          jnp.where(allowed, p_target * (log_target - log_student), 0.0), axis=-1)
      if not with_gradients:
        return kl_rows, d_a, d_sb
      d_scores = jnp.where(allowed, jnp.exp(log_student) - p_target, 0.0)
      d_scores = d_scores * row_weight * scale
      d_a = d_a + jnp.einsum("bhqk,bkhd->bqhd", d_scores, _slice(sb, j, block_k),
                             preferred_element_type=jnp.float32,
                             precision=PRECISION)
      d_b = jnp.einsum("bhqk,bqhd->bkhd", d_scores, a_i,
                       preferred_element_type=jnp.float32, precision=PRECISION)
      d_sb = jax.lax.dynamic_update_slice_in_dim(
          d_sb, _slice(d_sb, j, block_k) + d_b, j * block_k, axis=1)
      return kl_rows, d_a, d_sb

    d_a = jnp.zeros(a_i.shape, jnp.float32) if with_gradients else None
    kl_rows, d_a, d_sb = jax.lax.fori_loop(
        0, upper, key_block,
        (jnp.zeros((batch, heads, block_q), jnp.float32), d_a, d_sb))
    total = total + jnp.sum(jnp.where(seen[:, None, :], kl_rows, 0.0))
    count = count + jnp.sum(seen).astype(jnp.float32) * heads
    if with_gradients:
      d_sa = jax.lax.dynamic_update_slice_in_dim(d_sa, d_a, i * block_q, axis=1)
    return total, count, d_sa, d_sb

  grads = ((jnp.zeros(sa.shape, jnp.float32), jnp.zeros(sb.shape, jnp.float32))
           if with_gradients else (None, None))
  return jax.lax.fori_loop(0, num_q, row_block,
                           (jnp.float32(0.0), jnp.float32(0.0), *grads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _blockwise_mean_kl(operands, masks, alpha, causal, interpolate, block_q,
                       block_k):
  total, count, _, _ = _passes(
      operands, masks, alpha, causal=causal, interpolate=interpolate,
      block_q=block_q, block_k=block_k, with_gradients=False)
  return safe_divide(total, count)


def _blockwise_mean_kl_fwd(operands, masks, alpha, causal, interpolate,
                           block_q, block_k):
  total, count, d_sa, d_sb = _passes(
      operands, masks, alpha, causal=causal, interpolate=interpolate,
      block_q=block_q, block_k=block_k, with_gradients=True)
  # Kept in the inputs' dtype (the cotangents' dtype), as autodiff would.
  d_sa, d_sb = d_sa.astype(operands[2].dtype), d_sb.astype(operands[3].dtype)
  return safe_divide(total, count), (d_sa, d_sb, count)


def _blockwise_mean_kl_bwd(causal, interpolate, block_q, block_k, residuals,
                           g):
  """The mean's gradient: the forward's gradients of the KL sum, times g / rows."""
  del causal, interpolate, block_q, block_k
  d_sa, d_sb, count = residuals
  scale = safe_divide(g, count).astype(d_sa.dtype)
  # The teacher is a fixed target and masks, segments and the interpolation
  # coefficient are not trained: no cotangents.
  return ((None, None, d_sa * scale, d_sb * scale.astype(d_sb.dtype)), None,
          None)


_blockwise_mean_kl.defvjp(_blockwise_mean_kl_fwd, _blockwise_mean_kl_bwd)


def interpolation_coefficient(interpolation) -> Array:
  """float32 scalar `a` of `common.interpolated_log_target` (clipped to [0,
  1], a constant of the gradient); 1 when there is no interpolation."""
  if interpolation is None:
    return jnp.float32(1.0)
  return jax.lax.stop_gradient(
      jnp.clip(jnp.asarray(interpolation, jnp.float32), 0.0, 1.0))


def _split_heads(x: Array, heads: int, length: int) -> Array:
  """`[batch, len, width]` -> `[batch, length, heads, width / heads]`, padded
  with zeros to `length` positions (masked below)."""
  batch, len_x, width = x.shape
  x = jnp.reshape(x, (batch, len_x, heads, width // heads))
  return jnp.pad(x, ((0, 0), (0, length - len_x), (0, 0), (0, 0)))


def _pad_positions(x: Array, length: int) -> Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def blockwise_relation_kl(teacher_a, teacher_b, student_a, student_b, *,
                          num_relation_heads: int, query_mask, key_mask,
                          causal: bool, query_segment_ids, key_segment_ids,
                          interpolation, block_size: int = DEFAULT_BLOCK_SIZE
                          ) -> Array:
  """`relations.relation_kl`'s value (and gradients), tile by tile.

  Arguments as `relations.relation_kl` (already checked there; the teacher
  already under `stop_gradient`), plus `block_size`: rows and keys per tile
  (shorter sequences are one tile). Lengths that are not a multiple of the
  tile are padded with masked positions.

  Memory: float32 `[batch, heads, block, block]` tiles and `[batch, heads,
  len_a]` row statistics; the largest arrays are the inputs and their
  float32 gradients.
  """
  if block_size <= 0:
    raise ValueError(f"block_size must be positive; got {block_size}.")
  len_a, len_b = teacher_a.shape[1], teacher_b.shape[1]
  if causal:  # square tiles, so the diagonal is a tile boundary
    block_q = block_k = min(block_size, len_a)
  else:
    block_q, block_k = min(block_size, len_a), min(block_size, len_b)
  padded_a = block_q * math.ceil(len_a / block_q)
  padded_b = block_k * math.ceil(len_b / block_k)
  heads = num_relation_heads
  operands = (_split_heads(teacher_a, heads, padded_a),
              _split_heads(teacher_b, heads, padded_b),
              _split_heads(student_a, heads, padded_a),
              _split_heads(student_b, heads, padded_b))
  if query_segment_ids is None:
    query_segment_ids = jnp.zeros(jnp.shape(query_mask), jnp.int32)
    key_segment_ids = jnp.zeros(jnp.shape(key_mask), jnp.int32)
  masks = _Masks(
      _pad_positions(jnp.asarray(query_mask).astype(bool), padded_a),
      _pad_positions(jnp.asarray(key_mask).astype(bool), padded_b),
      _pad_positions(jnp.asarray(query_segment_ids), padded_a),
      _pad_positions(jnp.asarray(key_segment_ids), padded_b))
  interpolate = interpolation is not None
  return _blockwise_mean_kl(operands, masks,
                            interpolation_coefficient(interpolation), causal,
                            interpolate,
                            block_q, block_k)
