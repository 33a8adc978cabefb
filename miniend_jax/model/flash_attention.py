"""Fused T5 attention for TPU (Pallas): no [batch, heads, q_len, kv_len] array in HBM.

T5's attention adds a relative-position bias that is the same for every example
([heads, q_len, kv_len], from the bucket table) and masks that differ per example
(key padding, packed segments, causality). The explicit path adds them into one
per-example float32 bias and materialises the scores [batch, heads, q, kv] in
HBM, forward and backward. These kernels keep scores in VMEM: the position bias
is read a block at a time with the batch as the innermost grid axis, so each
block is fetched once per call, not once per example; the masks are rebuilt in
the kernel from segment ids (key padding folded into the key segment ids) and
iota (causality).

Kernels (grids; batch innermost):
  forward  (heads, q blocks, batch): one q block against all keys -> context and
           the row max and sum of the softmax (residuals of the backward).
  dq       (heads, q blocks, batch): recomputes the probabilities of the row
           block, gives dq and accumulates dS over the batch into the shared
           position-bias gradient [heads, q, kv] (the table's gradient is the
           segment sum of that over buckets, XLA's transpose of the gather).
  dk, dv   (heads, kv blocks, batch): recomputes the probabilities of a column
           block, transposed (keys along rows), gives dk and dv.
Per-query values (softmax max and sum, D = rowsum(dO * O), query segments) are
[.., 1, q_len] in HBM, lane-dense: as [.., q_len, 1] TPU tiling pads them 128x.
A whole key row (or query column) of a block sits in VMEM: block * length *
4 bytes per score temporary (512 KiB at block 128 and length 1024), plenty for
T5's lengths (up to a few thousand).

No score scaling (T5 folds it into the query init). The arithmetic follows
`ops.attend`'s explicit path step by step (mask bias -1e10 added, not replaced;
softmax as exp(s - max) / sum), so float32 results agree to rounding. Off TPU
the same kernels run in Pallas' interpret mode (slow; for tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

Array = jax.Array

# The explicit path's additive bias for masked keys (ops.MASK_BIAS); kept equal.
MASK_BIAS = -1e10
# Key segment id of a padded key: matches no query segment (ids are >= 0).
PADDED_KEY_SEGMENT = -(2 ** 31)
# Rows of a block. A length that is not a multiple of it runs as one block.
BLOCK = 128


def target_platform() -> str:
  """The platform the computation being traced is for: the current mesh's devices'
  (a plan compiles for TPU devices from a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _block(length: int, block: int) -> int:
  return block if length % block == 0 else length


def _diagonal(square: Array, axis: int) -> Array:
  """The diagonal of a square block, kept along the other axis (sum of the diagonal
  entries only: exact)."""
  n = square.shape[0]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))
  return jnp.sum(jnp.where(eye, square, jnp.zeros_like(square)), axis=axis, keepdims=True)


def _column(row_ref) -> Array:
  """A per-query-row value stored lane-dense ([1, rows]) as a column [rows, 1].

  Per-row arrays live in HBM as [.., 1, q_len]: as [.., q_len, 1] TPU tiling
  would pad each to 128 lanes, 128 times the bytes. The turn goes through the
  diagonal of a broadcast square (v4's Mosaic has no sublane gather for a
  reshape); its cost is one pass over a [rows, rows] block."""
  row = row_ref[...]
  return _diagonal(jnp.broadcast_to(row, (row.shape[1], row.shape[1])), axis=1)


def _row(column: Array) -> Array:
  """[rows, 1] -> [1, rows], to store a per-query-row value lane-dense."""
  return _diagonal(jnp.broadcast_to(column, (column.shape[0], column.shape[0])), axis=0)


def _scores(q, k, bias_ref, q_seg, k_seg, causal, row0, col0):
  """Scores of one block, float32 [rows, cols], with the explicit path's arithmetic:
  q.k + ((mask bias [+ causal bias]) + position bias)."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  add = jnp.where(q_seg == k_seg, 0.0, MASK_BIAS).astype(jnp.float32)
  if causal:
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    add = add + jnp.where(cols <= rows, 0.0, MASK_BIAS).astype(jnp.float32)
  if bias_ref is not None:
    add = add + bias_ref[...]
  return s + add


def _forward_kernel(*refs, causal: bool, has_bias: bool):
  q_ref, k_ref, v_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, o_ref, max_ref, sum_ref = refs
  block_q = q_ref.shape[0]
  s = _scores(q_ref[...], k_ref[...], bias_ref, _column(q_seg_ref), k_seg_ref[...], causal,
              pl.program_id(1) * block_q, 0)
  m = jnp.max(s, axis=1, keepdims=True)
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=1, keepdims=True)
  p = e / total
  v = v_ref[...]
  o_ref[...] = jax.lax.dot(p.astype(v.dtype), v,
                           preferred_element_type=jnp.float32).astype(o_ref.dtype)
  # The backward recomputes p as exp(s - max) / sum, not exp(s - logsumexp): in a
  # row whose keys are all masked (scores near -1e10) max + log(sum) rounds to max.
  max_ref[...] = _row(m)
  sum_ref[...] = _row(total)


def _dq_kernel(*refs, causal: bool, has_bias: bool):
  q_ref, k_ref, v_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, max_ref, sum_ref, di_ref, do_ref, dq_ref, *dbias = refs
  block_q = q_ref.shape[0]
  k, v, do = k_ref[...], v_ref[...], do_ref[...]
  s = _scores(q_ref[...], k, bias_ref, _column(q_seg_ref), k_seg_ref[...], causal,
              pl.program_id(1) * block_q, 0)
  p = jnp.exp(s - _column(max_ref)) / _column(sum_ref)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - _column(di_ref))
  dq_ref[...] = jax.lax.dot(ds.astype(k.dtype), k,
                            preferred_element_type=jnp.float32).astype(dq_ref.dtype)
  if dbias:
    # The position bias is shared by the batch: its gradient block stays in VMEM
    # while the (innermost) batch axis runs and sums dS over it.
    dbias_ref, = dbias

    @pl.when(pl.program_id(2) == 0)
    def _zero():
      dbias_ref[...] = jnp.zeros_like(dbias_ref)

    dbias_ref[...] += ds


def _dkv_kernel(*refs, causal: bool, has_bias: bool):
  """Runs transposed, keys along rows ([block_k, q_len]), so the per-query values
  (max, sum, D, segments) are used as the lane-dense rows they are stored as."""
  q_ref, k_ref, v_ref, *refs = refs
  bias_t_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, max_ref, sum_ref, di_ref, do_ref, dk_ref, dv_ref = refs
  block_k = k_ref.shape[0]
  q, do = q_ref[...], do_ref[...]
  s_t = jax.lax.dot_general(k_ref[...], q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
  add = jnp.where(_column(k_seg_ref) == q_seg_ref[...], 0.0, MASK_BIAS).astype(jnp.float32)
  if causal:
    keys = pl.program_id(1) * block_k + jax.lax.broadcasted_iota(jnp.int32, s_t.shape, 0)
    queries = jax.lax.broadcasted_iota(jnp.int32, s_t.shape, 1)
    add = add + jnp.where(keys <= queries, 0.0, MASK_BIAS).astype(jnp.float32)
  if bias_t_ref is not None:
    add = add + bias_t_ref[...]
  p_t = jnp.exp((s_t + add) - max_ref[...]) / sum_ref[...]  # [block_k, q_len]
  dv_ref[...] = jax.lax.dot(p_t.astype(do.dtype), do,
                            preferred_element_type=jnp.float32).astype(dv_ref.dtype)
  dp_t = jax.lax.dot_general(v_ref[...], do, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
  ds_t = p_t * (dp_t - di_ref[...])
  dk_ref[...] = jax.lax.dot(ds_t.astype(q.dtype), q,
                            preferred_element_type=jnp.float32).astype(dk_ref.dtype)


def _bytes(*arrays) -> int:
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(arrays))


def _call(kernel, grid, in_specs, out_specs, out_shape, args, *, semantics, flops,
          transcendentals, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals,
                                    bytes_accessed=_bytes(args, out_shape)),
      interpret=interpret, name=name)(*args)


def _specs(q, k, bias, rows_of_q: bool, block: int):
  """BlockSpecs of q, k, v, bias, q segments, k segments, and a per-query-row
  [batch, heads, 1, q_len] array, for a grid (heads, blocks, batch) whose blocks
  run over query rows (`rows_of_q`) or key columns."""
  _, _, q_len, d = q.shape
  kv_len = k.shape[2]
  if rows_of_q:
    bq, bk = _block(q_len, block), kv_len
    q_map = lambda h, i, b: (b, h, i, 0)
    k_map = lambda h, i, b: (b, h, 0, 0)
    bias_map = lambda h, i, b: (h, i, 0)
    q_seg_map = lambda h, i, b: (b, 0, i)
    k_seg_map = lambda h, i, b: (b, 0, 0)
    row_map = lambda h, i, b: (b, h, 0, i)
  else:
    bq, bk = q_len, _block(kv_len, block)
    q_map = lambda h, j, b: (b, h, 0, 0)
    k_map = lambda h, j, b: (b, h, j, 0)
    bias_map = lambda h, j, b: (h, j, 0)  # of the transposed bias [heads, kv, q]
    q_seg_map = lambda h, j, b: (b, 0, 0)
    k_seg_map = lambda h, j, b: (b, 0, j)
    row_map = lambda h, j, b: (b, h, 0, 0)
  q_spec = pl.BlockSpec((None, None, bq, d), q_map)
  k_spec = pl.BlockSpec((None, None, bk, d), k_map)
  specs = [q_spec, k_spec, k_spec]
  if bias is not None:
    specs.append(pl.BlockSpec((None, bq, bk) if rows_of_q else (None, bk, bq), bias_map))
  specs += [pl.BlockSpec((None, 1, bq), q_seg_map), pl.BlockSpec((None, 1, bk), k_seg_map)]
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  return specs, q_spec, k_spec, row_spec


def _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, block):
  batch, heads, q_len, d = q.shape
  kv_len = k.shape[2]
  has_bias = bias is not None
  specs, q_spec, _, row_spec = _specs(q, k, bias, rows_of_q=True, block=block)
  args = [q, k, v] + ([bias] if has_bias else []) + [q_seg, k_seg]
  row = jax.ShapeDtypeStruct((batch, heads, 1, q_len), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), row, row]
  return _call(functools.partial(_forward_kernel, causal=causal, has_bias=has_bias),
               (heads, q_len // _block(q_len, block), batch), specs, [q_spec, row_spec, row_spec],
               out_shape,
               args, semantics=("parallel", "parallel", "parallel"),
               flops=4 * batch * heads * q_len * kv_len * d,
               transcendentals=batch * heads * q_len * kv_len, interpret=interpret,
               name="t5_flash_attention_fwd")


def _backward(q, k, v, bias, q_seg, k_seg, row_max, row_sum, di, do, causal, interpret,
              block):
  batch, heads, q_len, d = q.shape
  kv_len = k.shape[2]
  has_bias = bias is not None
  common = [q, k, v] + ([bias] if has_bias else []) + [q_seg, k_seg, row_max, row_sum, di, do]
  work = dict(transcendentals=batch * heads * q_len * kv_len, interpret=interpret)

  specs, q_spec, _, row_spec = _specs(q, k, bias, rows_of_q=True, block=block)
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if has_bias:
    out_specs.append(pl.BlockSpec((None, _block(q_len, block), kv_len), lambda h, i, b: (h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct(bias.shape, jnp.float32))
  dq, *dbias = _call(
      functools.partial(_dq_kernel, causal=causal, has_bias=has_bias),
      (heads, q_len // _block(q_len, block), batch), specs + [row_spec, row_spec, row_spec, q_spec],
      out_specs, out_shape, common,
      # dbias sums over the batch: that axis must run in order on one core.
      semantics=("parallel", "parallel", "arbitrary" if has_bias else "parallel"),
      flops=6 * batch * heads * q_len * kv_len * d, name="t5_flash_attention_dq", **work)

  specs, q_spec, k_spec, row_spec = _specs(q, k, bias, rows_of_q=False, block=block)
  if has_bias:  # the key-major kernel reads the bias transposed (shared: small)
    common[3] = jnp.swapaxes(bias, 1, 2)
  dk, dv = _call(
      functools.partial(_dkv_kernel, causal=causal, has_bias=has_bias),
      (heads, kv_len // _block(kv_len, block), batch), specs + [row_spec, row_spec, row_spec, q_spec],
      [k_spec, k_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype),
                         jax.ShapeDtypeStruct(v.shape, v.dtype)], common,
      semantics=("parallel", "parallel", "parallel"),
      flops=8 * batch * heads * q_len * kv_len * d, name="t5_flash_attention_dkv", **work)
  return dq, dk, dv, (dbias[0] if dbias else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, bias, q_seg, k_seg, causal, interpret, block):
  return _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, block)[0]


def _flash_fwd(q, k, v, bias, q_seg, k_seg, causal, interpret, block):
  out, row_max, row_sum = _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, block)
  return out, (q, k, v, bias, q_seg, k_seg, out, row_max, row_sum)


def _flash_bwd(causal, interpret, block, residuals, do):
  q, k, v, bias, q_seg, k_seg, out, row_max, row_sum = residuals
  do = do.astype(out.dtype)
  # D_i = sum_j P_ij dP_ij = rowsum(dO * O): [batch, heads, 1, q_len], small.
  di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]
  dq, dk, dv, dbias = _backward(q, k, v, bias, q_seg, k_seg, row_max, row_sum, di, do,
                                causal, interpret, block)
  return dq, dk, dv, dbias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(query: Array, key: Array, value: Array, position_bias: Array | None,
                    key_mask: Array, query_segments: Array | None = None,
                    key_segments: Array | None = None, *, causal: bool = False,
                    dtype: Any = None, interpret: bool | None = None,
                    block: int = BLOCK) -> Array:
  """T5 attention (no score scaling) with the masks and bias passed apart.

  query: [batch, q_len, heads, d_kv]; key, value: [batch, kv_len, heads, d_kv].
  position_bias: float32 [heads, q_len, kv_len] or [1, heads, q_len, kv_len], shared
    by the batch (its gradient is summed over the batch in the kernel), or None.
  key_mask: bool [batch, kv_len], False for padded keys.
  query_segments / key_segments: int [batch, q_len] / [batch, kv_len] (ids >= 0) for
    packed examples, or None: a query sees the keys of its own segment only.
  causal: query i sees keys j <= i (decoder self-attention; q_len == kv_len).
  interpret: run the kernels in Pallas' interpreter; default: unless compiling for
    TPU (`target_platform`).
  block: rows (and columns) of a block; a length it does not divide runs whole.
  Returns the context [batch, q_len, heads, d_kv] in `dtype` (default query's).
  """
  batch, q_len, heads, _ = query.shape
  kv_len = key.shape[1]
  if causal and q_len != kv_len:
    raise ValueError(f"causal attention needs q_len == kv_len, got {q_len} and {kv_len}")
  if interpret is None:
    interpret = target_platform() != "tpu"
  if position_bias is not None:
    position_bias = position_bias.reshape(heads, q_len, kv_len).astype(jnp.float32)
  if query_segments is None or key_segments is None:
    query_segments = jnp.zeros((batch, q_len), jnp.int32)
    key_segments = jnp.zeros((batch, kv_len), jnp.int32)
  # Key padding folds into the key segment ids: a padded key matches no query.
  key_segments = jnp.where(key_mask, key_segments.astype(jnp.int32), PADDED_KEY_SEGMENT)
  q_seg = query_segments.astype(jnp.int32)[:, None, :]
  k_seg = key_segments[:, None, :]
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [batch, heads, len, d_kv]
  context = _flash(heads_first(query), heads_first(key), heads_first(value), position_bias,
                   q_seg, k_seg, causal, interpret, block)
  return heads_first(context).astype(dtype or query.dtype)
