"""The relation KL as one Pallas TPU kernel: the relation never leaves VMEM.

`relation_blocks` tiles the relation in plain JAX, which keeps no `[batch,
heads, len_a, len_b]` array alive, but XLA still writes each tile's scores to
HBM between the matmul that forms them and the reductions that read them, on
each of its three passes. This kernel does the work of a row block of one
(example, relation head) inside VMEM, with every key at once:

* scores of the teacher (the target: with interpolation `a * t + (1 - a) *
  s`) and the student over all keys, masked as the explicit version masks
  them (`[block_q, len_b]` float32 in VMEM);
* their row log-sum-exps and the row KL `sum_k p_t,k ((t_k - lse_t) - (s_k -
  lse_s))`;
* and, since the loss is a scalar whose cotangent `g` only scales it, the
  gradient right away: `d s = (p_s - p_t)` on the allowed keys of rows that
  see one, sent to `student_a` (`d s @ b`) and accumulated into `student_b`
  (`d s^T @ a`) over the row blocks of that (example, head).

The custom VJP keeps those two gradients as residuals (the student's own
shapes, float32) and its backward pass only multiplies them by `g /
num_rows`: the scores are formed once, forward and backward together (the
fused "loss and gradient" of Liger-Kernel's losses). HBM traffic is the
inputs, the gradients and `[batch, heads, len_a]` row sums.

Every key of a row block is in VMEM at once, so `len_b` is bounded
(`fits`: up to 2,688 keys with 128-row blocks); beyond it use `relation_blocks`.
Runs on TPU, on per-device arrays (a Mosaic kernel cannot be partitioned by
XLA: inside `shard_map`); `interpret=True` runs the same kernel anywhere (the
tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from miniend_jax.distill.common import Array, safe_divide
from miniend_jax.distill.relation_blocks import (
    MASKED_SCORE, interpolation_coefficient)

# TPU vector registers are [8 sublanes, 128 lanes]: keys are padded to whole
# lanes, rows to whole sublanes, per-row codes are spread over the lanes and
# per-key codes over the sublanes (as `pallas.ops.tpu.flash_attention` does).
_LANES, _SUBLANES = 128, 8

# Rows per block. A block's float32 [rows, len_b] arrays (scores of both
# sides, probabilities, the score gradient) must fit in VMEM with the inputs.
DEFAULT_BLOCK_ROWS = 128

# VMEM the float32 [block_rows, len_b] working arrays may take (about six of
# them live at once); above it `fits` says no. v4's scoped VMEM is 16 MiB.
_VMEM_BUDGET = 8 * 2**20

# Code of a row or key that is masked out: rows and keys match when their
# codes are equal (the segment id, 0 when not packed), so -1 (rows) and -2
# (keys) match nothing.
_MASKED_ROW, _MASKED_KEY = -1, -2


def _round_up(x: int, multiple: int) -> int:
  return multiple * math.ceil(x / multiple)


def fits(len_b: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> bool:
  """Whether a row block's working arrays over `len_b` keys fit the VMEM budget."""
  return 6 * block_rows * _round_up(len_b, _LANES) * 4 <= _VMEM_BUDGET


def _dot(a, b, dimension_numbers):
  """float32-accumulated dot; float32 operands at full float32 precision (as the
  explicit version's `PRECISION`), bf16 ones as they are (their products are
  exact in float32)."""
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)
  return jax.lax.dot_general(a, b, dimension_numbers,
                             preferred_element_type=jnp.float32,
                             precision=precision)


def _kernel(alpha_ref, ta_ref, tb_ref, sa_ref, sb_ref, row_ref, key_ref,
            kl_ref, seen_ref, d_sa_ref, d_sb_ref, *, causal, interpolate,
            with_gradients):
  """One (example, head, row block): row KLs, rows seen, gradients."""
  row_block = pl.program_id(2)
  block_q, len_b = ta_ref.shape[0], tb_ref.shape[0]
  f32 = jnp.float32

  def scores(a, b):
    s = _dot(a, b, (((1,), (1,)), ((), ())))
    return s * (1.0 / float(a.shape[-1]) ** 0.5)

  rows = jnp.tile(row_ref[...], (1, len_b // _LANES))  # [block_q, len_b]
  allowed = rows == key_ref[:1, :]
  if causal:
    row_ids = (jax.lax.broadcasted_iota(jnp.int32, (block_q, len_b), 0)
               + row_block * block_q)
    key_ids = jax.lax.broadcasted_iota(jnp.int32, (block_q, len_b), 1)
    allowed = allowed & (key_ids <= row_ids)
  t = jnp.where(allowed, scores(ta_ref[...], tb_ref[...]), MASKED_SCORE)
  s = jnp.where(allowed, scores(sa_ref[...], sb_ref[...]), MASKED_SCORE)
  if interpolate:
    alpha = alpha_ref[0]
    t = alpha * t + (1.0 - alpha) * s

  def log_softmax(x):
    top = jnp.max(x, axis=1, keepdims=True)
    return x - (top + jnp.log(jnp.sum(jnp.exp(x - top), axis=1, keepdims=True)))

  log_target, log_student = log_softmax(t), log_softmax(s)
  p_target = jnp.exp(log_target)
  kl = jnp.where(allowed, p_target * (log_target - log_student), 0.0)
  seen = jnp.max(allowed.astype(f32), axis=1, keepdims=True)  # [block_q, 1]
  kl_ref[...] = jnp.sum(kl, axis=1, keepdims=True) * seen
  seen_ref[...] = seen
  if not with_gradients:
    return
  # d KL_row / d s_k = p_s,k - p_t,k on the row's allowed keys; through
  # s = a . b / sqrt(d) to a and b. Rows that see no key do not count.
  d_s = jnp.where(allowed, jnp.exp(log_student) - p_target, 0.0) * seen
  d_s = d_s * (1.0 / float(sa_ref.shape[-1]) ** 0.5)
  a, b = sa_ref[...].astype(f32), sb_ref[...].astype(f32)
  d_sa_ref[...] = _dot(d_s, b, (((1,), (0,)), ((), ())))

  @pl.when(row_block == 0)
  def _():
    d_sb_ref[...] = jnp.zeros(d_sb_ref.shape, f32)

  d_sb_ref[...] += _dot(d_s, a, (((0,), (0,)), ((), ())))


def _call(operands, codes, alpha, *, causal, interpolate, block_q,
          with_gradients, interpret):
  """The kernel over the grid (batch, heads, row blocks).

  operands: `[batch, heads, length, d]` teacher a, b and student a, b (rows
  padded to `block_q`, keys to whole lanes); codes: rows `[batch, len_a,
  128]`, keys `[batch, 8, len_b]` (int32).
  Returns (row KLs `[batch, heads, len_a, 1]`, rows seen `[batch, heads,
  len_a, 1]`, and with gradients the student's a and b gradients of the KL
  sum over seen rows, float32, in `operands`' layout).
  """
  ta, tb, sa, sb = operands
  row_codes, key_codes = codes
  batch, heads, len_a, _ = ta.shape
  len_b = tb.shape[2]
  squeeze = pl.Squeezed()

  def rows_spec(width):
    return pl.BlockSpec((squeeze, squeeze, block_q, width),
                        lambda b, h, i: (b, h, i, 0))

  def keys_spec(width):
    return pl.BlockSpec((squeeze, squeeze, len_b, width),
                        lambda b, h, i: (b, h, 0, 0))

  in_specs = [
      pl.BlockSpec(memory_space=pltpu.SMEM),
      rows_spec(ta.shape[3]), keys_spec(tb.shape[3]),
      rows_spec(sa.shape[3]), keys_spec(sb.shape[3]),
      pl.BlockSpec((squeeze, block_q, _LANES), lambda b, h, i: (b, i, 0)),
      pl.BlockSpec((squeeze, _SUBLANES, len_b), lambda b, h, i: (b, 0, 0)),
  ]
  row_stat = jax.ShapeDtypeStruct((batch, heads, len_a, 1), jnp.float32)
  out_shape = [row_stat, row_stat]
  out_specs = [rows_spec(1), rows_spec(1)]
  if with_gradients:
    out_shape += [jax.ShapeDtypeStruct(sa.shape, jnp.float32),
                  jax.ShapeDtypeStruct(sb.shape, jnp.float32)]
    out_specs += [rows_spec(sa.shape[3]), keys_spec(sb.shape[3])]
  kernel = functools.partial(_kernel, causal=causal, interpolate=interpolate,
                             with_gradients=with_gradients)
  if not with_gradients:
    kernel = functools.partial(
        lambda *refs, k: k(*refs, None, None), k=kernel)
  matmuls = 2 + (2 if with_gradients else 0)
  width = ta.shape[3] + sa.shape[3]
  cost = pl.CostEstimate(
      flops=int(batch * heads * len_a * len_b * width * matmuls),
      transcendentals=int(3 * batch * heads * len_a * len_b),
      bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in operands)
                         + sum(x.size * 4 for x in (sa, sb) if with_gradients)))
  return pl.pallas_call(
      kernel,
      grid=(batch, heads, len_a // block_q),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      # The student-b gradient accumulates over row blocks: that axis runs
      # in order on one core.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost,
      interpret=interpret,
  )(alpha, ta, tb, sa, sb, row_codes, key_codes)


def _mean(kl_rows, seen):
  num_rows = jnp.sum(seen)
  return safe_divide(jnp.sum(kl_rows), num_rows), num_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _kernel_mean_kl(operands, codes, alpha, causal, interpolate, block_q,
                    interpret):
  kl_rows, seen = _call(operands, codes, alpha, causal=causal,
                        interpolate=interpolate, block_q=block_q,
                        with_gradients=False, interpret=interpret)
  return _mean(kl_rows, seen)[0]


def _kernel_mean_kl_fwd(operands, codes, alpha, causal, interpolate, block_q,
                        interpret):
  kl_rows, seen, d_sa, d_sb = _call(
      operands, codes, alpha, causal=causal, interpolate=interpolate,
      block_q=block_q, with_gradients=True, interpret=interpret)
  value, num_rows = _mean(kl_rows, seen)
  # Kept in the inputs' dtype (the cotangents' dtype), as autodiff would.
  d_sa, d_sb = d_sa.astype(operands[2].dtype), d_sb.astype(operands[3].dtype)
  return value, (d_sa, d_sb, num_rows)


def _kernel_mean_kl_bwd(causal, interpolate, block_q, interpret, residuals, g):
  del causal, interpolate, block_q, interpret
  d_sa, d_sb, num_rows = residuals
  scale = safe_divide(g, num_rows)
  return ((None, None, d_sa * scale.astype(d_sa.dtype),
           d_sb * scale.astype(d_sb.dtype)), None, None)


_kernel_mean_kl.defvjp(_kernel_mean_kl_fwd, _kernel_mean_kl_bwd)


def _heads_first(x: Array, heads: int, length: int, dtype) -> Array:
  """`[batch, len, width]` -> `[batch, heads, length, width / heads]`, zero-padded."""
  batch, len_x, width = x.shape
  x = jnp.reshape(x.astype(dtype), (batch, len_x, heads, width // heads))
  x = jnp.pad(x, ((0, 0), (0, length - len_x), (0, 0), (0, 0)))
  return jnp.transpose(x, (0, 2, 1, 3))


def _codes(mask, segment_ids, length, masked_code):
  """int32 `[batch, length]`: the segment id (0 when not packed) where the mask
  holds, `masked_code` elsewhere (and on padding)."""
  mask = jnp.asarray(mask).astype(bool)
  ids = (jnp.zeros(mask.shape, jnp.int32) if segment_ids is None
         else jnp.asarray(segment_ids).astype(jnp.int32))
  codes = jnp.where(mask, ids, masked_code)
  return jnp.pad(codes, ((0, 0), (0, length - mask.shape[1])),
                 constant_values=masked_code)


def kernel_relation_kl(teacher_a, teacher_b, student_a, student_b, *,
                       num_relation_heads: int, query_mask, key_mask,
                       causal: bool, query_segment_ids, key_segment_ids,
                       interpolation, block_rows: int = DEFAULT_BLOCK_ROWS,
                       interpret: bool = False) -> Array:
  """`relations.relation_kl`'s value and gradients from the Pallas kernel.

  Arguments as `relations.relation_kl` (checked there; the teacher already
  under `stop_gradient`; segment ids non-negative, as packing makes them);
  `block_rows` rows per block (multiple of 8);
  `interpret` runs the kernel in Pallas' interpreter (any backend).
  """
  if block_rows <= 0 or block_rows % _SUBLANES:
    raise ValueError(f"block_rows must be a positive multiple of {_SUBLANES}; "
                     f"got {block_rows}.")
  len_a, len_b = teacher_a.shape[1], teacher_b.shape[1]
  block_q = min(block_rows, _round_up(len_a, _SUBLANES))
  if not fits(len_b, block_q):
    raise ValueError(
        f"The relation kernel holds every key of a row block in VMEM: {len_b} "
        f"keys with {block_q}-row blocks exceed its budget; use "
        "implementation='blockwise' (or fewer block_rows).")
  padded_a, padded_b = _round_up(len_a, block_q), _round_up(len_b, _LANES)
  heads = num_relation_heads
  # One dtype per side for the kernel's matmuls (bf16 stays bf16).
  t_dtype = jnp.promote_types(teacher_a.dtype, teacher_b.dtype)
  s_dtype = jnp.promote_types(student_a.dtype, student_b.dtype)
  operands = (_heads_first(teacher_a, heads, padded_a, t_dtype),
              _heads_first(teacher_b, heads, padded_b, t_dtype),
              _heads_first(student_a, heads, padded_a, s_dtype),
              _heads_first(student_b, heads, padded_b, s_dtype))
  rows = _codes(query_mask, query_segment_ids, padded_a, _MASKED_ROW)
  keys = _codes(key_mask, key_segment_ids, padded_b, _MASKED_KEY)
  codes = (jnp.broadcast_to(rows[:, :, None], (*rows.shape, _LANES)),
           jnp.broadcast_to(keys[:, None, :],
                            (keys.shape[0], _SUBLANES, keys.shape[1])))
  interpolate = interpolation is not None
  alpha = jnp.reshape(interpolation_coefficient(interpolation), (1,))
  return _kernel_mean_kl(operands, codes, alpha, causal, interpolate, block_q,
                         interpret)
