"""What the distillation losses share: float32 casts, safe means, shape checks
and the interpolated target.

The losses (`relations`, `logits`, `hidden`) are pure functions of their
array arguments (no Flax modules, no globals, no randomness) and are safe to
call inside `jax.jit`. Conventions shared by all of them:

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

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# Matmuls feeding a distillation loss run at full float32 precision: on TPU
# the default float32 matmul rounds its operands to bf16, which would silently
# coarsen the relation scores of float32 inputs (bf16 inputs are exact either
# way). The relation matmuls are a small fraction of a training step.
PRECISION = jax.lax.Precision.HIGHEST


def f32(x: ArrayLike) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, or 0 when nothing was valid (denominator 0)."""
  return numerator / jnp.where(denominator > 0, denominator, 1.0)


def weighted_sum(values: Array, weights: Array) -> Array:
  """sum(values * weights), where zero-weight positions contribute exactly 0.

  `where` rather than a bare product so that non-finite values computed from
  padding (e.g. an overflowed padded logit) cannot turn the sum into NaN.
  """
  return jnp.sum(jnp.where(weights != 0, values * weights, 0.0))


def check_rank(name: str, x: ArrayLike, rank: int, shape_doc: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{name} must have rank {rank} ({shape_doc}); got shape {jnp.shape(x)}."
    )


def interpolated_log_target(
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
  a = jax.lax.stop_gradient(jnp.clip(f32(interpolation), 0.0, 1.0))
  mixed = a * teacher_scores + (1.0 - a) * jax.lax.stop_gradient(student_scores)
  return jax.nn.log_softmax(mixed, axis=-1)
