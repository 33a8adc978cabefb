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
shapes, float32) and its backward pass only multiplies them by the cotangent of the KL sum (the
mean's `g / num_rows`): the scores are formed once, forward and backward together (the
fused "loss and gradient" of Liger-Kernel's losses). HBM traffic is the
inputs, the gradients, the rows' mask codes (once per head) and a sum per
(example, head).

Every key of a row block is in VMEM at once, so `len_b` is bounded
(`fits`: up to 2,688 keys with 128-row blocks); beyond it use `relation_blocks`.
Runs on TPU; under a mesh on each device's examples, inside `shard_map` (a
Mosaic kernel cannot be partitioned by XLA), the mean taken over the whole
batch from the shards' sums. `interpret=True` runs the same kernel anywhere
(the tests).
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
from miniend_jax.model.ops import mesh_axis_names, mesh_shards

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
  """One (example, head, row block): KL and rows seen, added to the (example,
  head)'s sums, and gradients."""
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
  row_kl = jnp.sum(kl, axis=1, keepdims=True) * seen

  # The (example, head)'s sums accumulate over its row blocks (in order on
  # one core), lane-dense: [1, 128] per (example, head) in HBM, where per-row
  # [len_a, 1] columns would be tiled to 128 lanes each.
  @pl.when(row_block == 0)
  def _():
    kl_ref[...] = jnp.zeros(kl_ref.shape, f32)
    seen_ref[...] = jnp.zeros(seen_ref.shape, f32)

  kl_ref[...] += jnp.broadcast_to(jnp.sum(row_kl, axis=0, keepdims=True), kl_ref.shape)
  seen_ref[...] += jnp.broadcast_to(jnp.sum(seen, axis=0, keepdims=True), seen_ref.shape)
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
  Returns (KL summed over the seen rows `[batch, heads, 1, 128]`, the number
  of seen rows `[batch, heads, 1, 128]` (the same value in every lane), and
  with gradients the student's a and b gradients of the KL sum, float32, in
  `operands`' layout).
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
  head_sum = jax.ShapeDtypeStruct((batch, heads, 1, _LANES), jnp.float32)
  head_sum_spec = pl.BlockSpec((squeeze, squeeze, 1, _LANES),
                               lambda b, h, i: (b, h, 0, 0))
  out_shape = [head_sum, head_sum]
  out_specs = [head_sum_spec, head_sum_spec]
  if with_gradients:
    out_shape += [jax.ShapeDtypeStruct(sa.shape, jnp.float32),
                  jax.ShapeDtypeStruct(sb.shape, jnp.float32)]
    out_specs += [rows_spec(sa.shape[3]), keys_spec(sb.shape[3])]
  kernel = functools.partial(_kernel, causal=causal, interpolate=interpolate,
                             with_gradients=with_gradients)
  if not with_gradients:
    kernel = functools.partial(
        lambda *refs, k: k(*refs, None, None), k=kernel)
  # What the kernel does, for XLA's cost analysis (it cannot see inside): the
  # score matmuls of both sides, with gradients two more of the student's;
  # HBM bytes as TPU lays them out (minor dimension padded to 128 lanes).
  # Pallas fetches a block again only when its index changes: the key-side
  # operands once per (example, head), the row codes once per head.
  d_t, d_s = ta.shape[3], sa.shape[3]
  lanes = lambda x: x.size // x.shape[-1] * _round_up(x.shape[-1], _LANES)
  hbm_bytes = sum(lanes(x) * x.dtype.itemsize for x in operands)
  hbm_bytes += heads * row_codes.size * 4 + key_codes.size * 4
  hbm_bytes += 2 * batch * heads * _LANES * 4
  if with_gradients:
    hbm_bytes += (lanes(sa) + lanes(sb)) * 4
  pairs = batch * heads * len_a * len_b
  cost = pl.CostEstimate(
      flops=int(2 * pairs * (d_t + d_s + (2 * d_s if with_gradients else 0))),
      transcendentals=int((4 if with_gradients else 3) * pairs),
      bytes_accessed=int(hbm_bytes))
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


def _sums(kl_sums, seen_counts):
  """(KL summed over seen rows and heads, number of seen (row, head) pairs),
  from the kernel's per-(example, head) sums (lane 0 of each)."""
  return jnp.sum(kl_sums[..., 0]), jnp.sum(seen_counts[..., 0])


# The kernel gives sums, not the mean: under `shard_map` each shard sums its own
# rows and the mean is taken over the whole batch outside (as the explicit and
# tiled versions average over every valid row of the batch). The row count has
# no gradient.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _kernel_kl_sums(operands, codes, alpha, causal, interpolate, block_q,
                    interpret):
  kl_sums, seen = _call(operands, codes, alpha, causal=causal,
                        interpolate=interpolate, block_q=block_q,
                        with_gradients=False, interpret=interpret)
  return _sums(kl_sums, seen)


def _kernel_kl_sums_fwd(operands, codes, alpha, causal, interpolate, block_q,
                        interpret):
  kl_sums, seen, d_sa, d_sb = _call(
      operands, codes, alpha, causal=causal, interpolate=interpolate,
      block_q=block_q, with_gradients=True, interpret=interpret)
  # Kept in the inputs' dtype (the cotangents' dtype), as autodiff would.
  d_sa, d_sb = d_sa.astype(operands[2].dtype), d_sb.astype(operands[3].dtype)
  return _sums(kl_sums, seen), (d_sa, d_sb)


def _kernel_kl_sums_bwd(causal, interpolate, block_q, interpret, residuals, g):
  del causal, interpolate, block_q, interpret
  d_sa, d_sb = residuals
  g_sum = g[0]  # the row count's cotangent is ignored: it has no gradient
  return ((None, None, d_sa * g_sum.astype(d_sa.dtype),
           d_sb * g_sum.astype(d_sb.dtype)), None, None)


_kernel_kl_sums.defvjp(_kernel_kl_sums_fwd, _kernel_kl_sums_bwd)


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


def _local_sums(teacher_a, teacher_b, student_a, student_b, query_mask,
                key_mask, query_segment_ids, key_segment_ids, alpha, *,
                num_relation_heads, causal, interpolate, block_q, interpret):
  """(KL sum, seen-row count), float32 scalars, of the examples given (one
  device's shard under `shard_map`)."""
  len_a, len_b = teacher_a.shape[1], teacher_b.shape[1]
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
  return _kernel_kl_sums(operands, codes, alpha, causal, interpolate, block_q,
                         interpret)


def kernel_relation_kl(teacher_a, teacher_b, student_a, student_b, *,
                       num_relation_heads: int, query_mask, key_mask,
                       causal: bool, query_segment_ids, key_segment_ids,
                       interpolation, block_rows: int = DEFAULT_BLOCK_ROWS,
                       batch_axes=None, head_axes=None,
                       interpret: bool = False) -> Array:
  """`relations.relation_kl`'s value and gradients from the Pallas kernel.

  Arguments as `relations.relation_kl` (checked there; the teacher already
  under `stop_gradient`; segment ids non-negative, as packing makes them);
  `block_rows` rows per block (multiple of 8);
  `batch_axes`: under a mesh, the mesh axes the batch is split over. XLA
  cannot partition a Pallas call, so there the kernel runs on each device's
  examples inside `shard_map`, each shard returns its KL sum and seen-row
  count, and the mean is taken over the whole batch. With None under a mesh
  every device computes the whole batch.
  `head_axes`: the mesh axes that split the projections' width (the model's
  heads, under tensor parallelism). When they split the relation heads evenly
  (and share no axis with `batch_axes`) each device computes its own relation
  heads; otherwise the widths are gathered and every device along them
  computes all heads.
  `interpret` runs the kernel in Pallas' interpreter (any backend).
  """
  if block_rows <= 0 or block_rows % _SUBLANES:
    raise ValueError(f"block_rows must be a positive multiple of {_SUBLANES}; "
                     f"got {block_rows}.")
  batch, len_a = teacher_a.shape[:2]
  len_b = teacher_b.shape[1]
  block_q = min(block_rows, _round_up(len_a, _SUBLANES))
  if not fits(len_b, block_q):
    raise ValueError(
        f"The relation kernel holds every key of a row block in VMEM: {len_b} "
        f"keys with {block_q}-row blocks exceed its budget; use "
        "implementation='blockwise' (or fewer block_rows).")
  shards = mesh_shards(batch_axes)
  if batch % shards:
    raise ValueError(
        f"The relation kernel runs per batch shard: a batch of {batch} does not "
        f"split over the {shards} devices of mesh axes {batch_axes!r}.")
  head_shards = mesh_shards(head_axes)
  if (num_relation_heads % head_shards
      or set(mesh_axis_names(head_axes)) & set(mesh_axis_names(batch_axes))):
    head_axes, head_shards = None, 1
  alpha = jnp.reshape(interpolation_coefficient(interpolation), (1,))
  local = functools.partial(
      _local_sums, num_relation_heads=num_relation_heads // head_shards,
      causal=causal, interpolate=interpolation is not None, block_q=block_q,
      interpret=interpret)
  args = [teacher_a, teacher_b, student_a, student_b, query_mask, key_mask,
          query_segment_ids, key_segment_ids]
  args = [None if x is None else jnp.asarray(x) for x in args]
  if jax.sharding.get_abstract_mesh().empty:
    kl_sum, num_rows = local(*args, alpha)
    return safe_divide(kl_sum, num_rows)
  P = jax.sharding.PartitionSpec
  # A width split over `head_axes` gives each device whole relation heads: the
  # width is heads-major, and the relation heads divide by the split.
  per_token, per_row = P(batch_axes, None, head_axes), P(batch_axes, None)
  in_specs = (per_token,) * 4 + tuple(
      None if x is None else per_row for x in args[4:]) + (P(),)

  def per_shard(*shard_args):
    # [1]-shaped, so the shards' sums come out side by side and are added
    # outside: no collective whose transpose the gradient must get right.
    return tuple(jnp.reshape(x, (1,)) for x in local(*shard_args))

  out_spec = P(mesh_axis_names(batch_axes) + mesh_axis_names(head_axes) or None)
  kl_sums, row_counts = jax.shard_map(
      per_shard, in_specs=in_specs, out_specs=(out_spec, out_spec),
      check_vma=False)(*args, alpha)
  return safe_divide(jnp.sum(kl_sums), jnp.sum(row_counts))
