"""Interpolation schedules: a(step) in [0, 1] for a term's interpolated target.

Interpolated distillation (our reading of the paper's term; it publishes no
formula). Any relation or logits term may carry an `interpolation` schedule
a(step), where `step` is the optimizer update count (not the micro-batch
count under gradient accumulation); its target becomes `softmax(a *
teacher_scores + (1 - a) * stop_gradient(student_scores))`, the scores mixed
before the softmax (TAID-style for logits, the same on relation scores), so
the update's direction, not only its size, changes with a (see
`distill.common`). a = 1 is plain distillation, a = 0 trains nothing.
Hidden-state terms take no schedule: an MSE toward `a * teacher + (1 - a) *
student` only scales its gradient by a. The schedules are constant, linear
and cosine ramps in the step, and `AdaptiveSchedule`, which sets a from how
close the student already is to the teacher (see its docstring;
`Recipe.resolve` rejects it in recipes that never train the student's output
layer).

Each schedule returns a float32 jnp scalar; they are plain frozen dataclasses,
registered with gin by `distill.recipe`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_unit_interval(owner: str, **values: float) -> None:
  for name, value in values.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{owner}.{name} must be in [0, 1]; got {value}.")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """a(step) = value."""

  value: float = 1.0

  needs_losses = False

  def __post_init__(self):
    _check_unit_interval("ConstantSchedule", value=self.value)

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del step, student_loss, teacher_loss
    return jnp.asarray(self.value, jnp.float32)


def _ramp_fraction(step, start_step: int, end_step: int) -> Array:
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip((step - start_step) / float(end_step - start_step), 0.0, 1.0)


def _check_ramp(owner, start_value, end_value, start_step, end_step):
  _check_unit_interval(owner, start_value=start_value, end_value=end_value)
  if not 0 <= start_step < end_step:
    raise ValueError(f"{owner} needs 0 <= start_step < end_step; got "
                     f"start_step={start_step}, end_step={end_step}.")


@dataclasses.dataclass(frozen=True)
class LinearRamp:
  """a goes linearly from `start_value` (at `start_step`) to `end_value`
  (at `end_step`), constant outside. Steps count optimizer updates."""

  start_value: float = 0.0
  end_value: float = 1.0
  start_step: int = 0
  end_step: int = 10_000

  needs_losses = False

  def __post_init__(self):
    _check_ramp(type(self).__name__, self.start_value, self.end_value,
                self.start_step, self.end_step)

  def _shape(self, frac):
    return frac

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del student_loss, teacher_loss
    frac = _ramp_fraction(step, self.start_step, self.end_step)
    return self.start_value + (self.end_value - self.start_value) * self._shape(frac)


@dataclasses.dataclass(frozen=True)
class CosineRamp(LinearRamp):
  """Like `LinearRamp` with a half-cosine shape: slow at both ends."""

  def _shape(self, frac):
    return 0.5 * (1.0 - jnp.cos(math.pi * frac))


@dataclasses.dataclass(frozen=True)
class AdaptiveSchedule:
  """a = clip((teacher_loss / student_loss) ** power, min_value, max_value).

  Choice: the losses are the teacher's and the student's span-corruption
  cross-entropies on the current batch (stop-gradient). While the student is
  far from the teacher (early training, or a 3B teacher far above a small
  student) its loss is much larger, a is small and the target stays close to
  what the student can already represent; as the student catches up, a -> 1
  and the target becomes the teacher. Unlike a running estimate (e.g. TAID's
  momentum update) this needs no state carried between steps, so it stays a
  pure function inside the jitted step and survives checkpoint restarts
  unchanged. `recipe_loss` computes both losses when a term uses it.

  The student's cross-entropy only measures progress if the recipe trains
  the student's output layer, through a logits term or `Recipe.ce_weight >
  0`. A relation-only recipe with `ce_weight=0` leaves the output layer
  untouched, its cross-entropy stays near its initial value and a would
  never leave its starting level, so `Recipe.resolve` rejects that
  combination (use a step ramp there, or add a logits term / the student's
  own loss).
  """

  min_value: float = 0.0
  max_value: float = 1.0
  power: float = 1.0

  needs_losses = True

  def __post_init__(self):
    _check_unit_interval("AdaptiveSchedule", min_value=self.min_value,
                         max_value=self.max_value)
    if self.min_value > self.max_value:
      raise ValueError("AdaptiveSchedule needs min_value <= max_value; got "
                       f"{self.min_value} > {self.max_value}.")
    if not self.power > 0:
      raise ValueError(f"AdaptiveSchedule.power must be > 0; got {self.power}.")

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del step
    if student_loss is None or teacher_loss is None:
      raise ValueError("AdaptiveSchedule needs student_loss and teacher_loss.")
    student_loss = jax.lax.stop_gradient(jnp.asarray(student_loss, jnp.float32))
    teacher_loss = jax.lax.stop_gradient(jnp.asarray(teacher_loss, jnp.float32))
    ratio = teacher_loss / jnp.maximum(student_loss, 1e-6)
    return jnp.clip(ratio ** self.power, self.min_value, self.max_value)


Schedule = Union[ConstantSchedule, LinearRamp, CosineRamp, AdaptiveSchedule]
SCHEDULE_TYPES = (ConstantSchedule, LinearRamp, CosineRamp, AdaptiveSchedule)
