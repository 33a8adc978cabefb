"""Pure distillation losses: arrays in, float32 scalar out.

Every function here is a pure function of its array arguments (no Flax
modules, no globals, no randomness) and is safe to call inside `jax.jit`.
Conventions shared by all of them:

* Inputs may be any floating dtype (bf16 teacher, f32 student, ...). All
  arithmetic that matters (dot products, softmax, logarithms, reductions) is
  done in float32, and the returned loss is a float32 scalar.
* Teacher arguments are wrapped in `jax.lax.stop_gradient`: the teacher is a
  fixed target, so no gradient can leak into it even if a caller forgets to
  freeze it.
* Masks are `[batch, length]`. A position whose mask is 0/False contributes
  nothing, and its content (padding, garbage) cannot change the loss. Losses
  are means over *valid* positions (or query rows), so extra padding does not
  change them either.
* `interpolation` (optional, a scalar `a` in [0, 1], may be traced) replaces
  the teacher target by `softmax(a * teacher_scores + (1 - a) *
  stop_gradient(student_scores))`: the two models' scores (logits over
  the temperature, relation scores) are mixed *before* the softmax, as TAID
  does for logits. This is our reading of the paper's "interpolated
  distillation". `a = 1` is plain distillation (bit for bit); `a = 0` makes
  the target the student itself, so the loss is zero (to float32 rounding).

  Why before the softmax: with a target `a * p_teacher + (1 - a) *
  stop_gradient(p_student)` the KL's gradient in the student's scores is
  exactly `a * (p_student - p_teacher)`, the plain gradient scaled by `a`,
  which an Adam-type optimizer divides out again. Mixing the scores makes the
  target a distribution between the two that is not on that line, so the
  direction of the update changes with `a` (tests/distill checks both).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from miniend_jax.model.t5 import dot_f32

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# Score given to disallowed keys before the softmax. Finite (not -inf) so that
# masked rows and their gradients never produce inf - inf = NaN; exp(-1e9)
# underflows to exactly 0 in float32, so masked keys get no probability.
_MASKED_SCORE = -1e9

# Matmuls feeding a distillation loss run at full float32 precision: on TPU
# the default float32 matmul rounds its operands to bf16, which would silently
# coarsen the relation scores of float32 inputs (bf16 inputs are exact either
# way). The relation matmuls are a small fraction of a training step.
_PRECISION = jax.lax.Precision.HIGHEST

# Default number of sequence positions per chunk for the vocabulary-sized
# losses (see "Vocabulary-sized losses" below); the training step sizes chunks
# from the batch each device holds instead (`chunk_positions`).
DEFAULT_CHUNK_SIZE = 64

# Float32 bytes of one chunk of logits on one device: a few such arrays are
# alive at once inside the losses' loops. 64 MB keeps them under ~0.5 GB; the
# TPU plans of the paper's runs measured 0.8-0.9 GiB per chip less than with
# 256 MB chunks (benchmarks/README.md).
DEFAULT_CHUNK_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _f32(x: ArrayLike) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, or 0 when nothing was valid (denominator 0)."""
  return numerator / jnp.where(denominator > 0, denominator, 1.0)


def _weighted_sum(values: Array, weights: Array) -> Array:
  """sum(values * weights), where zero-weight positions contribute exactly 0.

  `where` rather than a bare product so that non-finite values computed from
  padding (e.g. an overflowed padded logit) cannot turn the sum into NaN.
  """
  return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def _check_rank(name: str, x: ArrayLike, rank: int, shape_doc: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{name} must have rank {rank} ({shape_doc}); got shape {jnp.shape(x)}."
    )


def _interpolated_log_target(
    teacher_scores: Array, student_scores: Array, interpolation: Optional[ArrayLike]
) -> Array:
  """log softmax(a * teacher_scores + (1 - a) * stop_gradient(student_scores)).

  The scores are what each side's softmax reads (logits over the
  temperature, masked relation scores; log-probabilities work too, since a
  row's normaliser is one constant per side). With a = 1 the mixed scores
  are `teacher_scores` exactly (1 * x == x, 0 * y == 0), so the target is
  the teacher's own log-softmax bit for bit; with a = 0 it is the
  (stop-gradient) student's. Masked entries carry the same large negative
  score on both sides, so they stay masked for every a.

  Args:
    teacher_scores: float32, any shape; the softmax runs over the last axis.
    student_scores: float32, the same shape.
    interpolation: None (plain distillation) or a scalar a in [0, 1].

  Returns:
    float32 log-probabilities of the target, same shape.
  """
  if interpolation is None:
    return jax.nn.log_softmax(teacher_scores, axis=-1)
  a = jax.lax.stop_gradient(jnp.clip(_f32(interpolation), 0.0, 1.0))
  mixed = a * teacher_scores + (1.0 - a) * jax.lax.stop_gradient(student_scores)
  return jax.nn.log_softmax(mixed, axis=-1)


def _kl_terms(log_target: Array, student_logp: Array, allowed: Array) -> Array:
  """Elementwise p_target * (log p_target - log p_student) where `allowed`.

  Disallowed entries are exactly 0 (via `where`, not by multiplying a 0
  probability by a possibly infinite log ratio).
  """
  kl = jnp.exp(log_target) * (log_target - student_logp)
  return jnp.where(allowed, kl, 0.0)


def _chunking(length: int, chunk_size: Optional[int]) -> tuple[int, int, int]:
  """(chunk, number of full chunks, remainder) for a sequence of `length`."""
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive or None; got {chunk_size}.")
  chunk = length if chunk_size is None else max(1, min(chunk_size, length))
  num_full, remainder = divmod(length, chunk)
  return chunk, num_full, remainder


def chunk_positions(rows_per_device: int, vocab: int, length: int,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
  """Sequence positions per chunk so one float32 chunk of logits, `[rows_per_device,
  chunk, vocab]`, stays within `budget_bytes` (at least 1, at most `length`).

  Chunks run along the sequence (batch-sharded inputs stay batch-sharded), so
  their size must shrink as the rows per device and the vocabulary grow: with
  64 MB, 16 rows of T5's 32k vocabulary take 32 positions per chunk, 64 rows of
  mT5's 250k one position, 2 rows of 32k a whole 114-token target (one chunk:
  no loop).
  """
  per_position = max(rows_per_device, 1) * vocab * 4
  return int(max(1, min(length, budget_bytes // per_position)))


def _slice_chunk(arrays, start, chunk):
  """`[:, start:start + chunk]` of each array (start may be traced)."""
  return [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in arrays]


def _map_sequence_chunks(fn, arrays, chunk_size):
  """Forward pass over sequence chunks.

  Applies `fn` to slices `[:, i * c:(i + 1) * c]` of every `[batch, length,
  ...]` array in `arrays`, one chunk at a time (`jax.lax.map`), plus one
  static slice for a remainder shorter than `c` (no padding copy). `fn`
  returns a tuple of float32 `[batch, c]` arrays; the result is the tuple of
  their `[batch, length]` concatenations. Slicing is along the sequence axis
  only, so batch-sharded inputs stay batch-sharded under SPMD partitioning.
  """
  batch, length = arrays[0].shape[:2]
  chunk, num_full, remainder = _chunking(length, chunk_size)
  if num_full == 1 and not remainder:
    return tuple(fn(*arrays))
  parts = []
  if num_full:
    def body(index):
      return tuple(fn(*_slice_chunk(arrays, index * chunk, chunk)))
    stacked = jax.lax.map(body, jnp.arange(num_full))  # each [n, batch, c]
    parts.append(tuple(jnp.moveaxis(o, 0, 1).reshape(batch, num_full * chunk)
                       for o in stacked))
  if remainder:
    parts.append(tuple(fn(*[x[:, num_full * chunk:] for x in arrays])))
  return tuple(jnp.concatenate(pieces, axis=1) for pieces in zip(*parts))


def _sequence_chunk_gradient(fn, arrays, chunk_size, hidden, kernel):
  """Backward pass over sequence chunks: the gradients of `hidden` and `kernel`.

  `fn` maps slices of `arrays` (as in `_map_sequence_chunks`) to the float32
  gradient of the logits slice, `[batch, c, vocab]`. With `kernel` None,
  `hidden` is the logits: each slice is cast to its dtype and written in place
  (`dynamic_update_slice` in a `fori_loop`) into one `[batch, length, vocab]`
  buffer. With a `[d_model, vocab]` kernel, the logits were `hidden @ kernel`:
  each slice becomes `[batch, c, d_model]` of hidden gradient, and the
  kernel's gradient accumulates over chunks in float32. Either way the only
  full-size array is the gradient of `hidden` itself.

  Returns:
    (gradient like `hidden`, gradient like `kernel` or None).
  """
  length = hidden.shape[1]
  chunk, num_full, remainder = _chunking(length, chunk_size)

  def chunk_grads(pieces, hidden_piece):
    d_logits = fn(*pieces)
    if kernel is None:
      return d_logits.astype(hidden.dtype), None
    return _project_back(d_logits, hidden_piece, kernel)

  if num_full == 1 and not remainder:
    d_hidden, d_kernel = chunk_grads(arrays, hidden)
    return d_hidden, None if kernel is None else d_kernel.astype(kernel.dtype)

  def body(index, carry):
    d_hidden, d_kernel = carry
    start = index * chunk
    piece, piece_kernel = chunk_grads(_slice_chunk(arrays, start, chunk),
                                      _slice_chunk([hidden], start, chunk)[0])
    d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, piece, start, axis=1)
    return d_hidden, None if kernel is None else d_kernel + piece_kernel

  d_kernel = None if kernel is None else jnp.zeros(kernel.shape, jnp.float32)
  d_hidden, d_kernel = jax.lax.fori_loop(
      0, num_full, body, (jnp.zeros(hidden.shape, hidden.dtype), d_kernel))
  if remainder:
    tail = num_full * chunk
    piece, piece_kernel = chunk_grads([x[:, tail:] for x in arrays], hidden[:, tail:])
    d_hidden = d_hidden.at[:, tail:].set(piece)
    if kernel is not None:
      d_kernel = d_kernel + piece_kernel
  return d_hidden, None if kernel is None else d_kernel.astype(kernel.dtype)


# ---------------------------------------------------------------------------
# Relation (MiniLMv2) and attention distillation.
# ---------------------------------------------------------------------------


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
                      precision=_PRECISION)
  scores = scores * (1.0 / float(head_width) ** 0.5)
  return jnp.where(jnp.asarray(allowed)[:, None], scores, _MASKED_SCORE)


def _allowed_keys(query_mask, key_mask, causal, query_segment_ids,
                  key_segment_ids) -> Array:
  """bool `[batch, len_q, len_k]`: which key each query row may attend to."""
  query_mask = jnp.asarray(query_mask).astype(bool)
  key_mask = jnp.asarray(key_mask).astype(bool)
  allowed = query_mask[:, :, None] & key_mask[:, None, :]
  if causal:
    len_q, len_k = query_mask.shape[1], key_mask.shape[1]
    if len_q != len_k:
      raise ValueError(
          "causal=True needs queries and keys over the same positions; got "
          f"len_q={len_q}, len_k={len_k}.")
    allowed &= jnp.tril(jnp.ones((len_q, len_k), dtype=bool))[None]
  if (query_segment_ids is None) != (key_segment_ids is None):
    raise ValueError("Pass both query_segment_ids and key_segment_ids, or "
                     "neither.")
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
  return _safe_divide(total, num_rows)


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
    interpolation: optional scalar a in [0, 1] (see module docstring).

  Returns:
    float32 scalar: KL summed over keys, averaged over valid query rows of the
    whole batch and over relation heads.

  Memory: a few float32 `[batch, num_relation_heads, len_a, len_b]` arrays
  (both sides' scores, the student's log-relation, the target and the KL
  terms), as in MiniLMv2.
  """
  for name, x in (("teacher_a", teacher_a), ("teacher_b", teacher_b),
                  ("student_a", student_a), ("student_b", student_b)):
    _check_rank(name, x, 3, "[batch, length, width]")
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
  allowed = _allowed_keys(query_mask, key_mask, causal, query_segment_ids,
                          key_segment_ids)
  teacher_scores = relation_scores(teacher_a, teacher_b, num_relation_heads,
                                   allowed)
  student_scores = relation_scores(student_a, student_b, num_relation_heads,
                                   allowed)
  student_logp = jax.nn.log_softmax(student_scores, axis=-1)
  log_target = _interpolated_log_target(teacher_scores, student_scores,
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
    interpolation: optional scalar a in [0, 1] (see module docstring); the
      log-probabilities serve as scores, so the target is the normalised
      geometric mixture `p_teacher^a * p_student^(1 - a)` over the allowed
      keys (a = 1 gives the teacher's row renormalised over them).

  Returns:
    float32 scalar: KL summed over keys, averaged over valid query rows and
    heads.
  """
  _check_rank("teacher_probs", teacher_probs, 4,
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
      _f32(jax.lax.stop_gradient(teacher_probs)), tiny))
  student_logp = jnp.log(jnp.maximum(_f32(student_probs), tiny))
  log_target = teacher_logp
  if interpolation is not None:
    masked = lambda logp: jnp.where(allowed[:, None], logp, _MASKED_SCORE)
    log_target = _interpolated_log_target(masked(teacher_logp),
                                          masked(student_logp), interpolation)
  kl = _kl_terms(log_target, student_logp, allowed[:, None])
  return _mean_over_valid_rows(jnp.sum(kl, axis=-1), allowed)


# ---------------------------------------------------------------------------
# Vocabulary-sized losses.
#
# Memory: a `[batch, length, vocab]` float32 array for a 32k vocabulary is the
# largest tensor of a distillation step (250k for mT5), and autodiff through a
# naive logit KL keeps several alive (both log-softmaxes, the target, their
# products, and the backward pass's residuals) - about five float32 copies
# when measured with XLA's memory analysis. The two losses below instead
#   * compute the forward pass `chunk_size` sequence positions at a time
#     (`_map_sequence_chunks`), keeping only float32 `[batch, length]` results;
#   * define their gradient explicitly (`jax.custom_vjp`): the backward pass
#     recomputes each chunk's softmax and writes that chunk's gradient
#     (softmax - target, in closed form) straight into one buffer of the
#     input's own dtype (`_sequence_chunk_gradient`);
#   * accept the logits unformed, as `ProjectedLogits(hidden, kernel)` (what
#     `T5(...)(..., project_logits=False)` returns): each chunk's logits are
#     `hidden[:, chunk] @ kernel` in float32, made and dropped inside the loop,
#     and the backward pass returns the gradients of `hidden` and `kernel`
#     (the latter summed over chunks in float32). No `[batch, length, vocab]`
#     array exists at all then, in any dtype: peak memory is flat in the
#     vocabulary except for O(batch * chunk_size * vocab) float32 - the fused
#     "linear + cross-entropy" of Liger-Kernel / Cut Cross-Entropy, here for
#     the KL too. The price is one more head matmul per model (the chunk's
#     logits are recomputed for the backward pass).
# Residuals are the inputs themselves. `tests/distill` checks the memory with
# XLA's `memory_analysis()` and the values and gradients against plain
# autodiff through `hidden @ kernel`. Caveat: XLA's CPU backend has no native
# bf16 slicing and upcasts whole bf16 inputs to float32 before the loop, so
# on CPU the saving is only seen with float32 inputs.
# ---------------------------------------------------------------------------


class ProjectedLogits(NamedTuple):
  """Logits given as `hidden @ kernel`, for the losses to form chunk by chunk.

  Attributes:
    hidden: `[batch, length, d_model]`, the decoder output as the head sees it.
    kernel: `[d_model, vocab]`, the output head in `hidden`'s dtype.
  The logits they stand for are `hidden @ kernel`, accumulated in float32.
  """

  hidden: Array
  kernel: Array


def _dot_2d(lhs: Array, rhs: Array, contracting: tuple[int, int]) -> Array:
  """The model's 2-D float32-accumulated dot (fast bf16 kernels on XLA:CPU), in float32."""
  return dot_f32(lhs, rhs, contracting, jnp.float32)


def _project(hidden: Array, kernel: Optional[Array]) -> Array:
  """float32 logits of a chunk: `hidden` itself, or `hidden @ kernel`."""
  if kernel is None:
    return _f32(hidden)
  batch, chunk, width = hidden.shape
  logits = _dot_2d(hidden.reshape(batch * chunk, width), kernel, (1, 0))
  return logits.reshape(batch, chunk, kernel.shape[1])


def _project_back(d_logits: Array, hidden: Array, kernel: Array):
  """(d hidden [b, c, d] in hidden's dtype, d kernel [d, vocab] float32) of a chunk."""
  batch, chunk, width = hidden.shape
  d_logits = d_logits.reshape(batch * chunk, -1).astype(kernel.dtype)
  d_hidden = _dot_2d(d_logits, kernel, (1, 1)).reshape(batch, chunk, width)
  d_kernel = _dot_2d(hidden.reshape(batch * chunk, width), d_logits, (0, 0))
  return d_hidden.astype(hidden.dtype), d_kernel


def _logits_operands(name: str, logits) -> tuple[Array, Optional[Array]]:
  """(hidden, kernel) of an array of logits (kernel None) or a ProjectedLogits."""
  if isinstance(logits, ProjectedLogits):
    hidden, kernel = jnp.asarray(logits.hidden), jnp.asarray(logits.kernel)
    _check_rank(f"{name}.hidden", hidden, 3, "[batch, length, d_model]")
    _check_rank(f"{name}.kernel", kernel, 2, "[d_model, vocab]")
    if hidden.shape[-1] != kernel.shape[0]:
      raise ValueError(f"{name}: hidden {hidden.shape} and kernel {kernel.shape} "
                       "do not contract (hidden [..., d_model], kernel [d_model, vocab]).")
    return hidden, kernel
  _check_rank(name, logits, 3, "[batch, length, vocab]")
  return jnp.asarray(logits), None


def _logits_shape(hidden: Array, kernel: Optional[Array]) -> tuple[int, int, int]:
  """[batch, length, vocab] of the logits an operand stands for."""
  if kernel is None:
    return tuple(hidden.shape)
  return (*hidden.shape[:2], kernel.shape[1])


def _logits_kl_per_position(t, s, alpha, inverse_t, interpolate):
  """(KL [b, c], target log-probs, student log-probs) for one chunk.

  The target is the teacher's softmax(t / T), or with interpolation
  softmax(a * t / T + (1 - a) * stop_gradient(s / T)); either way a
  constant of the backward pass, which only needs it recomputed.
  """
  t_scores, s_scores = t * inverse_t, s * inverse_t
  s_logp = jax.nn.log_softmax(s_scores, axis=-1)
  log_target = _interpolated_log_target(t_scores, s_scores,
                                        alpha if interpolate else None)
  kl = jnp.sum(jnp.exp(log_target) * (log_target - s_logp), axis=-1)
  return kl, log_target, s_logp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _logits_kl_sum(teacher, teacher_kernel, student, student_kernel, weights,
                   alpha, inverse_t, interpolate, chunk_size):
  """sum over positions of weights * KL(target || softmax(student / T))."""
  (kl,) = _map_sequence_chunks(
      lambda t, s: (_logits_kl_per_position(
          _project(t, teacher_kernel), _project(s, student_kernel), alpha,
          inverse_t, interpolate)[0],),
      (teacher, student), chunk_size)
  return _weighted_sum(kl, weights)


def _logits_kl_sum_fwd(teacher, teacher_kernel, student, student_kernel,
                       weights, alpha, inverse_t, interpolate, chunk_size):
  value = _logits_kl_sum(teacher, teacher_kernel, student, student_kernel,
                         weights, alpha, inverse_t, interpolate, chunk_size)
  return value, (teacher, teacher_kernel, student, student_kernel, weights,
                 alpha)


def _logits_kl_sum_bwd(inverse_t, interpolate, chunk_size, residuals, g):
  teacher, teacher_kernel, student, student_kernel, weights, alpha = residuals

  def grad_chunk(t, s, w):
    # d/ds sum_v p_target (log p_target - log softmax(s / T))
    #   = (softmax(s / T) - p_target) / T: the target reads the student's
    # scores only through a stop-gradient (interpolation), so it is a
    # constant here, recomputed from the same inputs as in the forward pass.
    _, log_target, s_logp = _logits_kl_per_position(
        _project(t, teacher_kernel), _project(s, student_kernel), alpha,
        inverse_t, interpolate)
    scale = jnp.where(w != 0, g * w * inverse_t, 0.0)[..., None]
    return scale * (jnp.exp(s_logp) - jnp.exp(log_target))

  d_student, d_kernel = _sequence_chunk_gradient(
      grad_chunk, (teacher, student, weights), chunk_size, student,
      student_kernel)
  # The teacher, the weights and the interpolation coefficient are targets,
  # never trained: zero cotangents (None).
  return None, None, d_student, d_kernel, None, None


_logits_kl_sum.defvjp(_logits_kl_sum_fwd, _logits_kl_sum_bwd)


def logits_kl(
    teacher_logits,
    student_logits,
    mask: ArrayLike,
    temperature: float = 1.0,
    *,
    interpolation: Optional[ArrayLike] = None,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
) -> Array:
  """Logit distillation: T^2 * KL(softmax(t / T) || softmax(s / T)).

  The T^2 factor (Hinton et al.) keeps gradient magnitudes comparable across
  temperatures. Memory-aware: float32 work happens `chunk_size` positions at a
  time, in the forward and (via a custom VJP) the backward pass, so no
  `[batch, length, vocab]` float32 copy is kept, and none at all is made from
  `ProjectedLogits` (see the section comment).

  Args:
    teacher_logits: `[batch, length, vocab]`, or `ProjectedLogits`.
    student_logits: `[batch, length, vocab]`, or `ProjectedLogits`; the same
      vocabulary. Gradients flow to its hidden states and kernel.
    mask: `[batch, length]` position weights (bool or float), e.g. the
      decoder loss weights.
    temperature: softmax temperature T > 0.
    interpolation: optional scalar a in [0, 1] (see module docstring).
    chunk_size: sequence positions per chunk; None computes all at once.

  Returns:
    float32 scalar: T^2 * KL summed over the vocabulary, weighted mean over
    positions.
  """
  teacher, teacher_kernel = _logits_operands("teacher_logits", teacher_logits)
  student, student_kernel = _logits_operands("student_logits", student_logits)
  teacher_shape = _logits_shape(teacher, teacher_kernel)
  student_shape = _logits_shape(student, student_kernel)
  if teacher_shape[-1] != student_shape[-1]:
    raise ValueError(
        f"Teacher vocabulary ({teacher_shape[-1]}) and student "
        f"vocabulary ({student_shape[-1]}) differ; logit "
        "distillation needs the same vocabulary (tokenizer) on both sides.")
  if teacher_shape != student_shape:
    raise ValueError(f"Shapes must match: teacher_logits={teacher_shape}, "
                     f"student_logits={student_shape}.")
  if tuple(jnp.shape(mask)) != teacher_shape[:2]:
    raise ValueError(f"mask has shape {jnp.shape(mask)}, expected [batch, "
                     f"length] = {teacher_shape[:2]}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  stop = lambda x: None if x is None else jax.lax.stop_gradient(x)
  weights = _f32(mask)
  alpha = jnp.float32(1.0) if interpolation is None else jnp.clip(
      _f32(interpolation), 0.0, 1.0)
  total = _logits_kl_sum(stop(teacher), stop(teacher_kernel), student,
                         student_kernel, weights, jax.lax.stop_gradient(alpha),
                         1.0 / float(temperature), interpolation is not None,
                         chunk_size)
  return _safe_divide(total, jnp.sum(weights)) * (float(temperature) ** 2)


class CrossEntropy(NamedTuple):
  """Result of `span_corruption_loss`; float32 scalars.

  Attributes:
    total: cross_entropy + z_loss, the quantity to minimise.
    cross_entropy: weighted mean token cross-entropy (nats).
    z_loss: weighted mean of `z_loss_weight * logsumexp(logits)^2`.
  """

  total: Array
  cross_entropy: Array
  z_loss: Array


def _cross_entropy_per_position(x, y, z_coefficient):
  """(cross-entropy [b, c], z-loss [b, c], softmax, log Z) for float32 logits x."""
  log_z = jax.nn.logsumexp(x, axis=-1)
  target_logit = jnp.take_along_axis(x, y[..., None], axis=-1)[..., 0]
  probs = jnp.exp(x - log_z[..., None])
  return log_z - target_logit, z_coefficient * jnp.square(log_z), probs, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _cross_entropy_sums(logits, kernel, targets, weights, z_coefficient,
                        chunk_size):
  """(sum of weighted cross-entropy, sum of weighted z-loss)."""
  ce, z = _map_sequence_chunks(
      lambda x, y: _cross_entropy_per_position(_project(x, kernel), y,
                                               z_coefficient)[:2],
      (logits, targets), chunk_size)
  return _weighted_sum(ce, weights), _weighted_sum(z, weights)


def _cross_entropy_sums_fwd(logits, kernel, targets, weights, z_coefficient,
                            chunk_size):
  sums = _cross_entropy_sums(logits, kernel, targets, weights, z_coefficient,
                             chunk_size)
  return sums, (logits, kernel, targets, weights)


def _cross_entropy_sums_bwd(z_coefficient, chunk_size, residuals, cotangents):
  logits, kernel, targets, weights = residuals
  g_ce, g_z = cotangents

  def grad_chunk(x, y, w):
    # d CE / dx = softmax - onehot(y); d (c * logZ^2) / dx = 2 c logZ softmax.
    x = _project(x, kernel)
    _, _, probs, log_z = _cross_entropy_per_position(x, y, z_coefficient)
    onehot = jax.nn.one_hot(y, x.shape[-1], dtype=jnp.float32)
    grad = (g_ce * (probs - onehot)
            + g_z * 2.0 * z_coefficient * log_z[..., None] * probs)
    return jnp.where((w != 0)[..., None], w[..., None] * grad, 0.0)

  d_logits, d_kernel = _sequence_chunk_gradient(
      grad_chunk, (logits, targets, weights), chunk_size, logits, kernel)
  return d_logits, d_kernel, None, None


_cross_entropy_sums.defvjp(_cross_entropy_sums_fwd, _cross_entropy_sums_bwd)


def span_corruption_loss(
    logits,
    targets: ArrayLike,
    weights: ArrayLike,
    *,
    z_loss: float = 0.0,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
) -> CrossEntropy:
  """Token cross-entropy of the span-corruption targets, with optional z-loss.

  The z-loss (PaLM, t5x) `z_loss * log(Z)^2` keeps the softmax normaliser
  near 1, which stabilises bf16 training. Computed in float32 and
  memory-aware like `logits_kl`.

  Args:
    logits: `[batch, length, vocab]`, or `ProjectedLogits` (gradients then
      flow to its hidden states and kernel).
    targets: int `[batch, length]` target ids.
    weights: `[batch, length]` loss weights (0 for padding).
    z_loss: coefficient of the z-loss; 0 disables it.
    chunk_size: sequence positions per chunk; None computes all at once.

  Returns:
    `CrossEntropy(total, cross_entropy, z_loss)`, weighted means over tokens.
  """
  hidden, kernel = _logits_operands("logits", logits)
  shape = _logits_shape(hidden, kernel)
  if tuple(jnp.shape(targets)) != shape[:2] or tuple(
      jnp.shape(weights)) != shape[:2]:
    raise ValueError(
        f"targets {jnp.shape(targets)} and weights {jnp.shape(weights)} must "
        f"be [batch, length] = {shape[:2]}.")
  if not z_loss >= 0:
    raise ValueError(f"z_loss must be >= 0; got {z_loss}.")
  w = _f32(weights)
  ce_sum, z_sum = _cross_entropy_sums(
      hidden, kernel, jnp.asarray(targets).astype(jnp.int32),
      jax.lax.stop_gradient(w), float(z_loss), chunk_size)
  denominator = jnp.sum(w)
  ce = _safe_divide(ce_sum, denominator)
  z = _safe_divide(z_sum, denominator)
  return CrossEntropy(total=ce + z, cross_entropy=ce, z_loss=z)


# ---------------------------------------------------------------------------
# Hidden states (TinyBERT).
# ---------------------------------------------------------------------------


def hidden_mse(
    teacher_h: ArrayLike,
    student_h: ArrayLike,
    projection: Optional[ArrayLike],
    mask: ArrayLike,
) -> Array:
  """TinyBERT hidden-state loss: MSE(student_h @ projection, teacher_h).

  No `interpolation`: a target `a * teacher_h + (1 - a) *
  stop_gradient(student)` would only scale this loss's gradient by `a`
  (there is no softmax to interpolate before), which is a term weight, not
  interpolated distillation.

  Args:
    teacher_h: `[batch, length, teacher_width]`.
    student_h: `[batch, length, student_width]`.
    projection: learned `[student_width, teacher_width]` student-side matrix,
      or None when the widths are equal (identity).
    mask: `[batch, length]` position weights.

  Returns:
    float32 scalar: squared error averaged over features, weighted mean over
    positions.
  """
  _check_rank("teacher_h", teacher_h, 3, "[batch, length, width]")
  _check_rank("student_h", student_h, 3, "[batch, length, width]")
  batch, length, t_width = jnp.shape(teacher_h)
  s_width = jnp.shape(student_h)[2]
  if tuple(jnp.shape(student_h)[:2]) != (batch, length):
    raise ValueError(f"student_h {jnp.shape(student_h)} and teacher_h "
                     f"{jnp.shape(teacher_h)} differ in batch or length.")
  if tuple(jnp.shape(mask)) != (batch, length):
    raise ValueError(f"mask has shape {jnp.shape(mask)}, expected "
                     f"{(batch, length)}.")
  if projection is None:
    if s_width != t_width:
      raise ValueError(
          f"Student width {s_width} != teacher width {t_width}: pass a "
          f"[{s_width}, {t_width}] projection.")
    projected = _f32(student_h)
  else:
    if tuple(jnp.shape(projection)) != (s_width, t_width):
      raise ValueError(f"projection has shape {jnp.shape(projection)}, "
                       f"expected [student_width, teacher_width] = "
                       f"{(s_width, t_width)}.")
    projected = jnp.einsum("bld,de->ble", student_h, projection,
                           preferred_element_type=jnp.float32,
                           precision=_PRECISION)
  target = _f32(jax.lax.stop_gradient(teacher_h))
  per_position = jnp.mean(jnp.square(projected - target), axis=-1)
  weights = _f32(mask)
  return _safe_divide(_weighted_sum(per_position, weights), jnp.sum(weights))
