"""Relation (MiniLMv2) and attention (MiniLMv1) distillation: KL between
row softmaxes over keys, averaged over the query rows that see a key.

Conventions (float32, stop-gradient teachers, masks, interpolation) are
`distill.common`'s.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from miniend_jax.distill.common import (
    PRECISION, Array, ArrayLike, check_rank, f32, interpolated_log_target,
    safe_divide)
from miniend_jax.distill import relation_kernel
from miniend_jax.distill.relation_blocks import (
    DEFAULT_BLOCK_SIZE, MASKED_SCORE as _MASKED_SCORE, blockwise_relation_kl)
from miniend_jax.model.flash_attention import pallas_tpu_target
from miniend_jax.model.ops import mesh_shards

# `relation_kl(implementation="auto")` tiles a relation (`relation_blocks`,
# or on TPU the kernel) when it has at least this many scores per row and
# head, len_a * len_b: there the explicit version's float32 [batch, heads,
# len_a, len_b] arrays are what a step's memory holds and moves. Below it one
# tile would be the whole relation anyway, and on TPU the kernel moved more
# bytes than the explicit version at 114 x 114 (its keys padded to 128 lanes;
# benchmarks/relation_kl_aot.py --length 114 --causal: 0.47 against 0.46 GB).
BLOCKWISE_MIN_SCORES = 256 * 256

IMPLEMENTATIONS = ("auto", "explicit", "blockwise", "kernel", "kernel_interpret")


def _kl_terms(log_target: Array, student_logp: Array, allowed: Array) -> Array:
  """Elementwise p_target * (log p_target - log p_student) where `allowed`.

  Disallowed entries are exactly 0 (via `where`, not by multiplying a 0
  probability by a possibly infinite log ratio).
  """
  kl = jnp.exp(log_target) * (log_target - student_logp)
  return jnp.where(allowed, kl, 0.0)


def relation_scores(a: ArrayLike, b: ArrayLike, num_relation_heads: int,
                    allowed: ArrayLike) -> Array:
  """Multi-head relation scores of `a` over `b` (MiniLMv2), before the softmax.

  The width of `a` and `b` is split into `num_relation_heads` heads of width
  `d = width / num_relation_heads`; for each head the relation is
  `softmax_k(a_q . b_k / sqrt(d))` over the allowed keys, and this returns
  what that softmax reads: `a_q . b_k / sqrt(d)`, with disallowed keys set to
  a large negative score.

  Args:
    a: `[batch, len_a, width]` projections (queries of the relation).
    b: `[batch, len_b, width]` projections (keys of the relation).
    num_relation_heads: number of relation heads; must divide `width`.
    allowed: bool `[batch, len_a, len_b]`, which keys each row may see.

  Returns:
    float32 `[batch, num_relation_heads, len_a, len_b]` scores; disallowed
    keys get a score whose softmax probability is exactly 0.
  """
  batch, len_a, width = jnp.shape(a)
  len_b = jnp.shape(b)[1]
  if width % num_relation_heads:
    raise ValueError(
        f"num_relation_heads={num_relation_heads} does not divide the "
        f"projection width {width}; choose a divisor of {width}.")
  head_width = width // num_relation_heads
  a = jnp.reshape(a, (batch, len_a, num_relation_heads, head_width))
  b = jnp.reshape(b, (batch, len_b, num_relation_heads, head_width))
  # Products of bf16 numbers are exact in float32, so for bf16 inputs the
  # only rounding is the float32 accumulation requested here.
  scores = jnp.einsum("bqhd,bkhd->bhqk", a, b,
                      preferred_element_type=jnp.float32,
                      precision=PRECISION)
  scores = scores * (1.0 / float(head_width) ** 0.5)
  return jnp.where(jnp.asarray(allowed)[:, None], scores, _MASKED_SCORE)


def _auto_implementation(batch: int, len_a: int, len_b: int, batch_axes) -> str:
  """relation_kl's choice for implementation="auto" (see there)."""
  if len_a * len_b < BLOCKWISE_MIN_SCORES:
    return "explicit"
  # Under a mesh the kernel runs per batch shard: it must know the batch's axes.
  per_shard = jax.sharding.get_abstract_mesh().empty or (
      batch_axes is not None and batch % mesh_shards(batch_axes) == 0)
  if pallas_tpu_target() and relation_kernel.fits(len_b) and per_shard:
    return "kernel"
  return "blockwise"


def _check_causal(causal: bool, len_q: int, len_k: int) -> None:
  if causal and len_q != len_k:
    raise ValueError(
        "causal=True needs queries and keys over the same positions; got "
        f"len_q={len_q}, len_k={len_k}.")


def _check_segments(query_segment_ids, key_segment_ids) -> None:
  if (query_segment_ids is None) != (key_segment_ids is None):
    raise ValueError("Pass both query_segment_ids and key_segment_ids, or "
                     "neither.")


def _allowed_keys(query_mask, key_mask, causal, query_segment_ids,
                  key_segment_ids) -> Array:
  """bool `[batch, len_q, len_k]`: which key each query row may attend to."""
  query_mask = jnp.asarray(query_mask).astype(bool)
  key_mask = jnp.asarray(key_mask).astype(bool)
  allowed = query_mask[:, :, None] & key_mask[:, None, :]
  if causal:
    len_q, len_k = query_mask.shape[1], key_mask.shape[1]
    _check_causal(causal, len_q, len_k)
    allowed &= jnp.tril(jnp.ones((len_q, len_k), dtype=bool))[None]
  _check_segments(query_segment_ids, key_segment_ids)
  if query_segment_ids is not None:
    allowed &= (jnp.asarray(query_segment_ids)[:, :, None]
                == jnp.asarray(key_segment_ids)[:, None, :])
  return allowed


def _mean_over_valid_rows(kl_rows: Array, allowed: Array) -> Array:
  """Mean of `[batch, heads, len_q]` row KLs over rows with a visible key."""
  # A row counts when its query is valid and it can see at least one key (a
  # valid query always sees itself in self-attention; in cross-attention an
  # example with no valid encoder token has no distribution to match).
  row_valid = jnp.any(allowed, axis=-1)  # [batch, len_q]
  total = jnp.sum(jnp.where(row_valid[:, None, :], kl_rows, 0.0))
  num_rows = jnp.sum(row_valid).astype(jnp.float32) * kl_rows.shape[1]
  return safe_divide(total, num_rows)


def relation_kl(
    teacher_a: ArrayLike,
    teacher_b: ArrayLike,
    student_a: ArrayLike,
    student_b: ArrayLike,
    *,
    num_relation_heads: int,
    query_mask: ArrayLike,
    key_mask: ArrayLike,
    causal: bool = False,
    query_segment_ids: Optional[ArrayLike] = None,
    key_segment_ids: Optional[ArrayLike] = None,
    interpolation: Optional[ArrayLike] = None,
    implementation: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    batch_axes=None,
    head_axes=None,
) -> Array:
  """MiniLMv2 multi-head relation distillation, KL(teacher || student).

  For each side, `a` and `b` are split into `num_relation_heads` heads over
  their own width, and the relation is `softmax_k(a_q . b_k / sqrt(d))` with
  `d` that side's head width. Teacher and student widths (hence their model
  head counts and head sizes) may differ; only the relation head count is
  shared. Q-Q, K-K and V-V relations pass the same tensor as `a` and `b`; a
  Q-K relation (the attention pattern without position bias) passes queries
  and keys, possibly of different lengths (cross-attention).

  Args:
    teacher_a: `[batch, len_a, teacher_width]`.
    teacher_b: `[batch, len_b, teacher_width]`.
    student_a: `[batch, len_a, student_width]`.
    student_b: `[batch, len_b, student_width]`.
    num_relation_heads: relation heads; must divide both widths.
    query_mask: `[batch, len_a]`, 1/True for valid rows of `a`.
    key_mask: `[batch, len_b]`, 1/True for valid keys of `b`.
    causal: restrict row i to keys j <= i, for relations over decoder
      positions (decoder self-attention; cross-attention's Q-Q); needs
      len_a == len_b.
    query_segment_ids: optional int `[batch, len_a]` for packed examples; a
      row only sees keys of its own segment.
    key_segment_ids: optional int `[batch, len_b]`, with `query_segment_ids`.
    interpolation: optional scalar a in [0, 1] (see `distill.common`).
    implementation: "explicit" forms the relations whole: a few float32
      `[batch, num_relation_heads, len_a, len_b]` arrays (both sides' scores,
      the student's log-relation, the target and the KL terms), as in
      MiniLMv2. "blockwise" (`relation_blocks`) computes the same value and
      gradients over `[batch, heads, block_size, block_size]` tiles with its
      own backward pass, never forming a `len_a x len_b` array. "kernel"
      (`relation_kernel`): one Pallas TPU kernel forms each row block's
      relation in VMEM with its gradient (TPU only; "kernel_interpret" runs
      it in Pallas' interpreter, on any backend). A Mosaic kernel cannot be
      partitioned by XLA: under a mesh it runs per batch shard in
      `shard_map` (see `batch_axes`). "auto": explicit when `len_a * len_b <
      BLOCKWISE_MIN_SCORES`; above it the kernel when the computation is for
      TPU v4 or newer (`pallas_tpu_target`), its keys fit in VMEM and it knows the
      batch's sharding (`batch_axes` under a mesh, splitting the batch evenly;
      or a single device), else blockwise.
    block_size: rows and keys per tile of the blockwise implementation.
    batch_axes: under a mesh, the mesh axes that split the batch (a name, a
      tuple of names, or None), for the kernel to run on each shard's
      examples; the training step passes them.
    head_axes: the mesh axes that split the projections' width (the model's
      heads), for the kernel to compute each device's own relation heads
      when they divide evenly.

  Returns:
    float32 scalar: KL summed over keys, averaged over valid query rows of the
    whole batch and over relation heads.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}; got "
                     f"{implementation!r}.")
  for name, x in (("teacher_a", teacher_a), ("teacher_b", teacher_b),
                  ("student_a", student_a), ("student_b", student_b)):
    check_rank(name, x, 3, "[batch, length, width]")
  (batch, len_a, t_width) = jnp.shape(teacher_a)
  len_b = jnp.shape(teacher_b)[1]
  s_width = jnp.shape(student_a)[2]
  expected = {
      "teacher_b": (batch, len_b, t_width),
      "student_a": (batch, len_a, s_width),
      "student_b": (batch, len_b, s_width),
  }
  for name, x in (("teacher_b", teacher_b), ("student_a", student_a),
                  ("student_b", student_b)):
    if tuple(jnp.shape(x)) != expected[name]:
      raise ValueError(
          f"{name} has shape {jnp.shape(x)}, expected {expected[name]} "
          f"(teacher_a {jnp.shape(teacher_a)}: a and b of one side share "
          "batch and width; teacher and student share batch and lengths).")
  if tuple(jnp.shape(query_mask)) != (batch, len_a):
    raise ValueError(f"query_mask has shape {jnp.shape(query_mask)}, "
                     f"expected {(batch, len_a)}.")
  if tuple(jnp.shape(key_mask)) != (batch, len_b):
    raise ValueError(f"key_mask has shape {jnp.shape(key_mask)}, "
                     f"expected {(batch, len_b)}.")
  for side, width in (("teacher", t_width), ("student", s_width)):
    if width % num_relation_heads:
      raise ValueError(
          f"num_relation_heads={num_relation_heads} does not divide the "
          f"{side} width {width}; pick a common divisor of the teacher "
          f"({t_width}) and student ({s_width}) widths.")

  teacher_a = jax.lax.stop_gradient(teacher_a)
  teacher_b = jax.lax.stop_gradient(teacher_b)
  if implementation == "auto":
    implementation = _auto_implementation(batch, len_a, len_b, batch_axes)
  if implementation != "explicit":
    _check_segments(query_segment_ids, key_segment_ids)
    _check_causal(causal, len_a, len_b)
    kw = dict(num_relation_heads=num_relation_heads, query_mask=query_mask,
              key_mask=key_mask, causal=causal,
              query_segment_ids=query_segment_ids,
              key_segment_ids=key_segment_ids, interpolation=interpolation)
    if implementation == "blockwise":
      return blockwise_relation_kl(teacher_a, teacher_b, student_a, student_b,
                                   block_size=block_size, **kw)
    return relation_kernel.kernel_relation_kl(
        teacher_a, teacher_b, student_a, student_b,
        batch_axes=batch_axes, head_axes=head_axes,
        interpret=implementation == "kernel_interpret", **kw)
  allowed = _allowed_keys(query_mask, key_mask, causal, query_segment_ids,
                          key_segment_ids)
  teacher_scores = relation_scores(teacher_a, teacher_b, num_relation_heads,
                                   allowed)
  student_scores = relation_scores(student_a, student_b, num_relation_heads,
                                   allowed)
  student_logp = jax.nn.log_softmax(student_scores, axis=-1)
  log_target = interpolated_log_target(teacher_scores, student_scores,
                                        interpolation)
  kl = _kl_terms(log_target, student_logp, allowed[:, None])
  return _mean_over_valid_rows(jnp.sum(kl, axis=-1), allowed)


def attention_kl(
    teacher_probs: ArrayLike,
    student_probs: ArrayLike,
    *,
    query_mask: ArrayLike,
    key_mask: ArrayLike,
    causal: bool = False,
    interpolation: Optional[ArrayLike] = None,
) -> Array:
  """KL(teacher || student) between attention distributions (MiniLMv1).

  Unlike `relation_kl` this compares the model's own attention
  probabilities, so teacher and student must have the same number of heads.

  Args:
    teacher_probs: `[batch, heads, len_q, len_k]`, rows sum to 1 over keys.
    student_probs: `[batch, heads, len_q, len_k]`.
    query_mask: `[batch, len_q]`, 1/True for valid query rows.
    key_mask: `[batch, len_k]`, 1/True for valid keys; other keys are ignored
      whatever probability they hold.
    causal: also ignore keys j > i (decoder self-attention).
    interpolation: optional scalar a in [0, 1] (see `distill.common`); the
      log-probabilities serve as scores, so the target is the normalised
      geometric mixture `p_teacher^a * p_student^(1 - a)` over the allowed
      keys (a = 1 gives the teacher's row renormalised over them).

  Returns:
    float32 scalar: KL summed over keys, averaged over valid query rows and
    heads.
  """
  check_rank("teacher_probs", teacher_probs, 4,
              "[batch, heads, len_q, len_k]")
  if tuple(jnp.shape(teacher_probs)) != tuple(jnp.shape(student_probs)):
    raise ValueError(
        f"attention_kl needs equal shapes (same head count); got teacher "
        f"{jnp.shape(teacher_probs)} and student {jnp.shape(student_probs)}. "
        "For different head counts use relation_kl on the projections.")
  batch, _, len_q, len_k = jnp.shape(teacher_probs)
  if tuple(jnp.shape(query_mask)) != (batch, len_q) or tuple(
      jnp.shape(key_mask)) != (batch, len_k):
    raise ValueError(
        f"query_mask {jnp.shape(query_mask)} / key_mask {jnp.shape(key_mask)}"
        f" must be {(batch, len_q)} / {(batch, len_k)}.")
  allowed = _allowed_keys(query_mask, key_mask, causal, None, None)
  tiny = jnp.finfo(jnp.float32).tiny  # log(0) guard for underflowed probs.
  teacher_logp = jnp.log(jnp.maximum(
      f32(jax.lax.stop_gradient(teacher_probs)), tiny))
  student_logp = jnp.log(jnp.maximum(f32(student_probs), tiny))
  log_target = teacher_logp
  if interpolation is not None:
    masked = lambda logp: jnp.where(allowed[:, None], logp, _MASKED_SCORE)
    log_target = interpolated_log_target(masked(teacher_logp),
                                          masked(student_logp), interpolation)
  kl = _kl_terms(log_target, student_logp, allowed[:, None])
  return _mean_over_valid_rows(jnp.sum(kl, axis=-1), allowed)
