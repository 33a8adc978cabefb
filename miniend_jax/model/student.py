"""Student construction and initialisation from a teacher.

A student always shares the teacher's vocabulary (logit distillation compares
distributions over the same tokens) and its family (feed-forward kind, head
tying, relative-position buckets); it differs in depth and width.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from miniend_jax.model import presets
from miniend_jax.model.config import T5Config


# Feed-forward widths the teacher's ratio does not map to a whole number are
# rounded to this multiple (matmul tiles on TPUs and GPUs).
_D_FF_MULTIPLE = 64


def feed_forward_width(teacher: T5Config, d_model: int) -> int:
  """The teacher's d_ff / d_model ratio at width `d_model`.

  Exact when whole (T5 v1.1-base, 2048 / 768: 1024 at 384, 2048 at 768; T5
  v1.0-base, 3072 / 768: 1536 at 384), else the nearest multiple of 64.
  """
  d_ff, remainder = divmod(teacher.d_ff * d_model, teacher.d_model)
  if not remainder:
    return d_ff
  exact = teacher.d_ff * d_model / teacher.d_model
  return max(_D_FF_MULTIPLE, _D_FF_MULTIPLE * round(exact / _D_FF_MULTIPLE))


def student_config(teacher: T5Config, shape: str | presets.StudentShape, **overrides) -> T5Config:
  """The config of a student of `shape` (a name such as "6L-384H" or a StudentShape).

  A shape without `d_ff` (every named one) takes the teacher's feed-forward
  ratio (`feed_forward_width`), so a student as wide as its teacher has the
  teacher's layer shapes and can copy its layers (`init_student`);
  `overrides={"d_ff": N}` (gin: `ModelSetup.overrides`) sets it outright.
  """
  if isinstance(shape, str):
    shape = presets.get_student_shape(shape)
  if shape.d_model % shape.num_heads:
    raise ValueError(f"Student width {shape.d_model} is not divisible by {shape.num_heads} heads.")
  d_ff = shape.d_ff or feed_forward_width(teacher, shape.d_model)
  fields = dict(d_model=shape.d_model, num_heads=shape.num_heads, d_kv=shape.d_kv,
                d_ff=d_ff, num_layers=shape.num_layers,
                num_decoder_layers=shape.num_decoder_layers or shape.num_layers)
  fields.update(overrides)  # e.g. {"num_heads": 8, "d_kv": 4}: the overrides win
  return teacher.replace(**fields)


def evenly_spaced_layers(num_teacher: int, num_student: int) -> tuple[int, ...]:
  """Teacher layers a student of `num_student` layers copies: first and last kept,
  the rest evenly spaced (DistilBART's choice, e.g. 12 -> 6 gives 0,2,4,7,9,11)."""
  if num_student > num_teacher:
    raise ValueError(f"A student with {num_student} layers cannot copy from a teacher with "
                     f"only {num_teacher}.")
  if num_student == 1:
    return (num_teacher - 1,)
  return tuple(int(round(x)) for x in np.linspace(0, num_teacher - 1, num_student))


def check_same_vocabulary(teacher: T5Config, student: T5Config) -> None:
  if teacher.vocab_size != student.vocab_size:
    raise ValueError(
        f"Teacher vocabulary ({teacher.vocab_size} ids) and student vocabulary "
        f"({student.vocab_size} ids) differ; distillation needs the same vocabulary. Build the "
        "student with student_config(teacher_config, shape).")


def init_student(config: T5Config, rng, *, teacher_config: T5Config | None = None,
                 teacher_params: Mapping | None = None,
                 encoder_layers: Sequence[int] | None = None,
                 decoder_layers: Sequence[int] | None = None) -> dict:
  """Initialises a student's parameters.

  Without a teacher: random (T5 initialisation). With one, the student must have
  the teacher's width, heads and d_ff; it then copies the embedding, relative
  position tables, final norms, output head and the chosen teacher layers
  (default: evenly spaced, first and last kept), DistilBART-style.

  Returns:
    params: nested dict of arrays, shaped for `config`.
  """
  import jax  # pylint: disable=import-outside-toplevel  (student_config needs no JAX)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.params import (init_params, stack_layer_params,  # pylint: disable=import-outside-toplevel
                                        unstack_layer_params)
  if teacher_params is None:
    return init_params(config, rng)
  if teacher_config is None:
    raise ValueError("init_student: teacher_params needs teacher_config too.")
  # Layers are copied one by one, in the unrolled layout, whatever either side scans.
  if teacher_config.scan_layers:
    teacher_params = unstack_layer_params(teacher_params, teacher_config)
    teacher_config = teacher_config.replace(scan_layers=False)
  if config.scan_layers:
    unrolled = init_student(config.replace(scan_layers=False), rng,
                            teacher_config=teacher_config, teacher_params=teacher_params,
                            encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    return stack_layer_params(unrolled, config)
  params = init_params(config, rng)
  check_same_vocabulary(teacher_config, config)
  mismatched = [f for f in ("d_model", "num_heads", "d_kv", "d_ff", "feed_forward_proj",
                            "tie_word_embeddings", "relative_attention_num_buckets",
                            "relative_bias_per_layer")
                if getattr(teacher_config, f) != getattr(config, f)]
  if mismatched:
    raise ValueError(
        "Initialising a student from teacher layers needs the same "
        + ", ".join(f"{f} (teacher {getattr(teacher_config, f)}, student {getattr(config, f)})"
                    for f in mismatched)
        + ". Use random initialisation for a narrower student.")
  encoder_layers = tuple(encoder_layers or evenly_spaced_layers(teacher_config.num_layers,
                                                                config.num_layers))
  decoder_layers = tuple(decoder_layers or evenly_spaced_layers(teacher_config.num_decoder_layers,
                                                                config.num_decoder_layers))
  for name, layers, n_student, n_teacher in (
      ("encoder", encoder_layers, config.num_layers, teacher_config.num_layers),
      ("decoder", decoder_layers, config.num_decoder_layers, teacher_config.num_decoder_layers)):
    if len(layers) != n_student or not all(0 <= i < n_teacher for i in layers):
      raise ValueError(f"{name}_layers={layers} must name {n_student} teacher layers in "
                       f"0..{n_teacher - 1}.")

  # jnp, not np: under jit (the run loop builds the state this way) the teacher's
  # params are sharded device arrays, copied device to device.
  dtype = jnp.dtype(config.param_dtype)
  copy = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  new = {k: v for k, v in params.items()}
  new["shared"] = copy(teacher_params["shared"])
  if "lm_head" in teacher_params:
    new["lm_head"] = copy(teacher_params["lm_head"])
  for stack, layers, norm in (("encoder", encoder_layers, "encoder_norm"),
                              ("decoder", decoder_layers, "decoder_norm")):
    # A stack's shared relative-position table (T5, mT5); umT5's travel with its layers.
    new[stack] = {k: copy(teacher_params[stack][k]) for k in ("relpos_bias", norm)
                  if k in teacher_params[stack]}
    for i, t in enumerate(layers):
      new[stack][f"layers_{i}"] = copy(teacher_params[stack][f"layers_{t}"])
  return new
