"""Vocabulary-sized losses: logit KL and span-corruption cross-entropy, chunked
over the sequence, with hand-written gradients (the fused head).

Memory: a `[batch, length, vocab]` float32 array for a 32k vocabulary is the
largest tensor of a distillation step (250k for mT5), and autodiff through a
naive logit KL keeps several alive (both log-softmaxes, the target, their
products, and the backward pass's residuals) - about five float32 copies
when measured with XLA's memory analysis. The two losses below instead
  * compute the forward pass `chunk_size` sequence positions at a time
    (`_map_sequence_chunks`), keeping only float32 `[batch, length]` results;
  * define their gradient explicitly (`jax.custom_vjp`): the backward pass
    recomputes each chunk's softmax and writes that chunk's gradient
    (softmax - target, in closed form) straight into one buffer of the
    input's own dtype (`_sequence_chunk_gradient`);
  * accept the logits unformed, as `ProjectedLogits(hidden, kernel)` (what
    `T5(...)(..., project_logits=False)` returns): each chunk's logits are
    `hidden[:, chunk] @ kernel` in float32, made and dropped inside the loop,
    and the backward pass returns the gradients of `hidden` and `kernel`
    (the latter summed over chunks in float32). No `[batch, length, vocab]`
    array exists at all then, in any dtype: peak memory is flat in the
    vocabulary except for O(batch * chunk_size * vocab) float32 - the fused
    "linear + cross-entropy" of Liger-Kernel / Cut Cross-Entropy, here for
    the KL too. The price is one more head matmul per model (the chunk's
    logits are recomputed for the backward pass).
Residuals are the inputs themselves. `tests/distill` checks the memory with
XLA's `memory_analysis()` and the values and gradients against plain
autodiff through `hidden @ kernel`. Caveat: XLA's CPU backend has no native
bf16 slicing and upcasts whole bf16 inputs to float32 before the loop, so
on CPU the saving is only seen with float32 inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from miniend_jax.distill.common import (
    Array, ArrayLike, check_rank, f32, interpolated_log_target, safe_divide,
    weighted_sum)
from miniend_jax.model.ops import dot_f32

# Default number of sequence positions per chunk for the vocabulary-sized
# losses (see the module docstring); the training step sizes chunks
# from the batch each device holds instead (`chunk_positions`).
DEFAULT_CHUNK_SIZE = 64

# Float32 bytes of one chunk of logits on one device: a few such arrays are
# alive at once inside the losses' loops. 64 MB keeps them under ~0.5 GB; the
# TPU plans of the paper's runs measured 0.8-0.9 GiB per chip less than with
# 256 MB chunks (benchmarks/README.md).
DEFAULT_CHUNK_BYTES = 64 * 2**20


class ProjectedLogits(NamedTuple):
  """Logits given as `hidden @ kernel`, for the losses to form chunk by chunk.

  Attributes:
    hidden: `[batch, length, d_model]`, the decoder output as the head sees it.
    kernel: `[d_model, vocab]`, the output head in `hidden`'s dtype.
  The logits they stand for are `hidden @ kernel`, accumulated in float32.
  """

  hidden: Array
  kernel: Array


# Sequence chunks: the forward and backward loops both losses run.


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


# The output head, formed chunk by chunk.


def _dot_2d(lhs: Array, rhs: Array, contracting: tuple[int, int]) -> Array:
  """The model's 2-D float32-accumulated dot (fast bf16 kernels on XLA:CPU), in float32."""
  return dot_f32(lhs, rhs, contracting, jnp.float32)


def _project(hidden: Array, kernel: Optional[Array]) -> Array:
  """float32 logits of a chunk: `hidden` itself, or `hidden @ kernel`."""
  if kernel is None:
    return f32(hidden)
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
    check_rank(f"{name}.hidden", hidden, 3, "[batch, length, d_model]")
    check_rank(f"{name}.kernel", kernel, 2, "[d_model, vocab]")
    if hidden.shape[-1] != kernel.shape[0]:
      raise ValueError(f"{name}: hidden {hidden.shape} and kernel {kernel.shape} "
                       "do not contract (hidden [..., d_model], kernel [d_model, vocab]).")
    return hidden, kernel
  check_rank(name, logits, 3, "[batch, length, vocab]")
  return jnp.asarray(logits), None


def _logits_shape(hidden: Array, kernel: Optional[Array]) -> tuple[int, int, int]:
  """[batch, length, vocab] of the logits an operand stands for."""
  if kernel is None:
    return tuple(hidden.shape)
  return (*hidden.shape[:2], kernel.shape[1])


# Logit distillation.


def _logits_kl_per_position(t, s, alpha, inverse_t, interpolate):
  """(KL [b, c], target log-probs, student log-probs) for one chunk.

  The target is the teacher's softmax(t / T), or with interpolation
  softmax(a * t / T + (1 - a) * stop_gradient(s / T)); either way a
  constant of the backward pass, which only needs it recomputed.
  """
  t_scores, s_scores = t * inverse_t, s * inverse_t
  s_logp = jax.nn.log_softmax(s_scores, axis=-1)
  log_target = interpolated_log_target(t_scores, s_scores,
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
  return weighted_sum(kl, weights)


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
  `ProjectedLogits` (see the module docstring).

  Args:
    teacher_logits: `[batch, length, vocab]`, or `ProjectedLogits`.
    student_logits: `[batch, length, vocab]`, or `ProjectedLogits`; the same
      vocabulary. Gradients flow to its hidden states and kernel.
    mask: `[batch, length]` position weights (bool or float), e.g. the
      decoder loss weights.
    temperature: softmax temperature T > 0.
    interpolation: optional scalar a in [0, 1] (see `distill.common`).
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
  weights = f32(mask)
  alpha = jnp.float32(1.0) if interpolation is None else jnp.clip(
      f32(interpolation), 0.0, 1.0)
  total = _logits_kl_sum(stop(teacher), stop(teacher_kernel), student,
                         student_kernel, weights, jax.lax.stop_gradient(alpha),
                         1.0 / float(temperature), interpolation is not None,
                         chunk_size)
  return safe_divide(total, jnp.sum(weights)) * (float(temperature) ** 2)


# The student's own loss.


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
  return weighted_sum(ce, weights), weighted_sum(z, weights)


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
  w = f32(weights)
  ce_sum, z_sum = _cross_entropy_sums(
      hidden, kernel, jnp.asarray(targets).astype(jnp.int32),
      jax.lax.stop_gradient(w), float(z_loss), chunk_size)
  denominator = jnp.sum(w)
  ce = safe_divide(ce_sum, denominator)
  z = safe_divide(z_sum, denominator)
  return CrossEntropy(total=ce + z, cross_entropy=ce, z_loss=z)
