"""TinyBERT hidden-state distillation: MSE between a block's outputs, through a
learned student-side projection.

Conventions (float32, stop-gradient teachers, masks) are `distill.common`'s.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from miniend_jax.distill.common import (
    PRECISION, Array, ArrayLike, check_rank, f32, safe_divide, weighted_sum)


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
  check_rank("teacher_h", teacher_h, 3, "[batch, length, width]")
  check_rank("student_h", student_h, 3, "[batch, length, width]")
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
    projected = f32(student_h)
  else:
    if tuple(jnp.shape(projection)) != (s_width, t_width):
      raise ValueError(f"projection has shape {jnp.shape(projection)}, "
                       f"expected [student_width, teacher_width] = "
                       f"{(s_width, t_width)}.")
    projected = jnp.einsum("bld,de->ble", student_h, projection,
                           preferred_element_type=jnp.float32,
                           precision=PRECISION)
  target = f32(jax.lax.stop_gradient(teacher_h))
  per_position = jnp.mean(jnp.square(projected - target), axis=-1)
  weights = f32(mask)
  return safe_divide(weighted_sum(per_position, weights), jnp.sum(weights))
