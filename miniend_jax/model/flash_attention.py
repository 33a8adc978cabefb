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

Kernels (grids; batch innermost; a step takes a group of heads, 2 at d_kv 64,
as one lane-dense [len, group * d_kv] block of the [batch, len, heads * d_kv]
projections, see `_only_head`):
  forward  (head groups, q blocks, batch): one q block against all keys -> context
           and the row max and sum of the softmax (residuals of the backward).
  dq       (head groups, q blocks, batch): recomputes the probabilities of the
           row block, gives dq and accumulates dS over the batch into the shared
           position-bias gradient [heads, q, kv] (the table's gradient is the
           segment sum of that over buckets, XLA's transpose of the gather).
  dk, dv   (head groups, kv blocks, batch): recomputes the probabilities of a
           column block, transposed (keys along rows), gives dk and dv.
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

import dataclasses
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


# TPU generations whose Mosaic compiler rejects these kernels' bf16 matmul
# operands ("E2001: Unsupported matmul RHS type on target: vector<128x128xbf16>",
# seen compiling for v2 and v3 with libtpu): Colab's and TRC's v2-8 / v3-8.
_TPUS_WITHOUT_BF16_MOSAIC_MATMUL = ("TPU v2", "TPU v3")


def pallas_tpu_target() -> bool:
  """Whether the computation being traced can run the project's Pallas kernels: it is
  for TPU devices that compile them (v4 and newer; `target_platform`'s devices), and
  either under a mesh or on a single device. XLA cannot partition a Pallas call, so
  the kernels run per shard under the current mesh (`shard_map`); with several
  devices and no mesh they are not taken."""
  if target_platform() != "tpu":
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty and jax.device_count() > 1:
    return False
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  kind = device.device_kind if device is not None else jax.devices()[0].device_kind
  return not kind.startswith(_TPUS_WITHOUT_BF16_MOSAIC_MATMUL)


def _block(length: int, block: int) -> int:
  return block if length % block == 0 else length


def _diagonal(square: Array, axis: int) -> Array:
  """The diagonal of a square block, kept along the other axis (sum of the diagonal
  entries only: exact)."""
  n = square.shape[0]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))
  return jnp.sum(jnp.where(eye, square, jnp.zeros_like(square)), axis=axis, keepdims=True)


def _column(row: Array) -> Array:
  """A per-query-row value stored lane-dense ([1, rows]) as a column [rows, 1].

  Per-row arrays live in HBM as [.., 1, q_len]: as [.., q_len, 1] TPU tiling
  would pad each to 128 lanes, 128 times the bytes. The turn goes through the
  diagonal of a broadcast square (v4's Mosaic has no sublane gather for a
  reshape); its cost is one pass over a [rows, rows] block."""
  return _diagonal(jnp.broadcast_to(row, (row.shape[1], row.shape[1])), axis=1)


def _row(column: Array) -> Array:
  """[rows, 1] -> [1, rows], to store a per-query-row value lane-dense."""
  return _diagonal(jnp.broadcast_to(column, (column.shape[0], column.shape[0])), axis=0)


def _only_head(x: Array, head: int, d_kv: int) -> Array:
  """x [rows, group * d_kv] with the lanes of every head but `head` zeroed. The
  kernels read a group of heads as one lane-dense block (q, k, v stay [batch,
  len, heads * d_kv] as the projections give them: no transposes, no d_kv=64
  padded to 128 lanes) and pick a head by masking, not slicing: a dot over the
  zeroed lanes adds exact zeros, and at d_kv 64 the MXU's 128-deep pass costs
  the same either way."""
  lanes = jax.lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
  mine = (lanes >= head * d_kv) & (lanes < (head + 1) * d_kv)
  return jnp.where(mine, x, jnp.zeros_like(x))


def _mask_add(q_seg, k_seg, bias, causal, rows, cols, keys_first: bool = False) -> Array:
  """The additive bias of one block, float32, with the explicit path's arithmetic:
  (mask bias [+ causal bias]) + position bias. rows / cols: int iotas of the block's
  positions (queries along rows unless `keys_first`)."""
  add = jnp.where(q_seg == k_seg, 0.0, MASK_BIAS).astype(jnp.float32)
  if causal:
    keys, queries = (rows, cols) if keys_first else (cols, rows)
    add = add + jnp.where(keys <= queries, 0.0, MASK_BIAS).astype(jnp.float32)
  if bias is not None:
    add = add + bias
  return add


def _dot_nt(a: Array, b: Array) -> Array:
  """a [m, k] . b [n, k]^T -> float32 [m, n]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: Array, b: Array) -> Array:
  return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def _iotas(shape, row0, col0):
  return (row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0),
          col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1))


def _forward_kernel(*refs, causal: bool, has_bias: bool, d_kv: int):
  q_ref, k_ref, v_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, o_ref, max_ref, sum_ref = refs
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  block_q, kv_len = q.shape[0], k.shape[0]
  rows, cols = _iotas((block_q, kv_len), pl.program_id(1) * block_q, 0)
  q_seg, k_seg = _column(q_seg_ref[...]), k_seg_ref[...]
  out = jnp.zeros(o_ref.shape, jnp.float32)
  for head in range(max_ref.shape[0]):
    bias = None if bias_ref is None else bias_ref[head]
    s = _dot_nt(_only_head(q, head, d_kv), k) + _mask_add(q_seg, k_seg, bias, causal, rows, cols)
    m = jnp.max(s, axis=1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=1, keepdims=True)
    p = e / total
    out = out + _dot(p.astype(v.dtype), _only_head(v, head, d_kv))
    # The backward recomputes p as exp(s - max) / sum, not exp(s - logsumexp): in
    # a row whose keys are all masked (scores near -1e10) max + log(sum) rounds to max.
    max_ref[head] = _row(m)
    sum_ref[head] = _row(total)
  o_ref[...] = out.astype(o_ref.dtype)


def _dq_kernel(*refs, causal: bool, has_bias: bool, d_kv: int):
  q_ref, k_ref, v_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, max_ref, sum_ref, di_ref, do_ref, dq_ref, *dbias = refs
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  block_q, kv_len = q.shape[0], k.shape[0]
  rows, cols = _iotas((block_q, kv_len), pl.program_id(1) * block_q, 0)
  q_seg, k_seg = _column(q_seg_ref[...]), k_seg_ref[...]
  if dbias:
    # The position bias is shared by the batch: its gradient block stays in VMEM
    # while the (innermost) batch axis runs and sums dS over it.
    dbias_ref, = dbias

    @pl.when(pl.program_id(2) == 0)
    def _zero():
      dbias_ref[...] = jnp.zeros_like(dbias_ref)

  dq = jnp.zeros(dq_ref.shape, jnp.float32)
  for head in range(max_ref.shape[0]):
    bias = None if bias_ref is None else bias_ref[head]
    s = _dot_nt(_only_head(q, head, d_kv), k) + _mask_add(q_seg, k_seg, bias, causal, rows, cols)
    p = jnp.exp(s - _column(max_ref[head])) / _column(sum_ref[head])
    dp = _dot_nt(_only_head(do, head, d_kv), v)
    ds = p * (dp - _column(di_ref[head]))
    dq = dq + _dot(ds.astype(k.dtype), _only_head(k, head, d_kv))
    if dbias:
      dbias_ref[head] += ds
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(*refs, causal: bool, has_bias: bool, d_kv: int):
  """Runs transposed, keys along rows ([block_k, q_len]), so the per-query values
  (max, sum, D, segments) are used as the lane-dense rows they are stored as."""
  q_ref, k_ref, v_ref, *refs = refs
  bias_t_ref = refs.pop(0) if has_bias else None
  q_seg_ref, k_seg_ref, max_ref, sum_ref, di_ref, do_ref, dk_ref, dv_ref = refs
  q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
  block_k, q_len = k.shape[0], q.shape[0]
  rows, cols = _iotas((block_k, q_len), pl.program_id(1) * block_k, 0)
  k_seg, q_seg = _column(k_seg_ref[...]), q_seg_ref[...]
  dk = jnp.zeros(dk_ref.shape, jnp.float32)
  dv = jnp.zeros(dv_ref.shape, jnp.float32)
  for head in range(max_ref.shape[0]):
    bias_t = None if bias_t_ref is None else bias_t_ref[head]
    s_t = _dot_nt(_only_head(k, head, d_kv), q) + _mask_add(
        k_seg, q_seg, bias_t, causal, rows, cols, keys_first=True)
    p_t = jnp.exp(s_t - max_ref[head]) / sum_ref[head]  # [block_k, q_len]
    dv = dv + _dot(p_t.astype(do.dtype), _only_head(do, head, d_kv))
    dp_t = _dot_nt(_only_head(v, head, d_kv), do)
    ds_t = p_t * (dp_t - di_ref[head])
    dk = dk + _dot(ds_t.astype(q.dtype), _only_head(q, head, d_kv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


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


def _group(heads: int, d_kv: int) -> int:
  """Heads per grid step: as many as fill 128 lanes (2 at d_kv 64), so a block of
  [len, group * d_kv] is lane-dense; all heads when they fill fewer."""
  group = max(1, 128 // d_kv) if 128 % d_kv == 0 else 1
  return group if heads % group == 0 else heads


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static sizes of one call: q, k, v are [batch, len, heads * d_kv]."""

  batch: int
  q_len: int
  kv_len: int
  heads: int
  d_kv: int
  block: int

  @property
  def group(self) -> int:
    return _group(self.heads, self.d_kv)

  def grid(self, rows_of_q: bool) -> tuple[int, int, int]:
    length = self.q_len if rows_of_q else self.kv_len
    return (self.heads // self.group, length // _block(length, self.block), self.batch)

  def specs(self, has_bias: bool, rows_of_q: bool):
    """BlockSpecs of q, k, v, bias, q segments, k segments, and the per-query-row
    [batch, heads, 1, q_len] arrays, for a grid (head groups, blocks, batch) whose
    blocks run over query rows (`rows_of_q`) or key columns."""
    g, width = self.group, self.group * self.d_kv
    if rows_of_q:
      bq, bk = _block(self.q_len, self.block), self.kv_len
      q_map = lambda h, i, b: (b, i, h)
      k_map = lambda h, i, b: (b, 0, h)
      bias_map = lambda h, i, b: (h, i, 0)
      q_seg_map = lambda h, i, b: (b, 0, i)
      k_seg_map = lambda h, i, b: (b, 0, 0)
      row_map = lambda h, i, b: (b, h, 0, i)
    else:
      bq, bk = self.q_len, _block(self.kv_len, self.block)
      q_map = lambda h, j, b: (b, 0, h)
      k_map = lambda h, j, b: (b, j, h)
      bias_map = lambda h, j, b: (h, j, 0)  # of the transposed bias [heads, kv, q]
      q_seg_map = lambda h, j, b: (b, 0, 0)
      k_seg_map = lambda h, j, b: (b, 0, j)
      row_map = lambda h, j, b: (b, h, 0, 0)
    q_spec = pl.BlockSpec((None, bq, width), q_map)
    k_spec = pl.BlockSpec((None, bk, width), k_map)
    specs = [q_spec, k_spec, k_spec]
    if has_bias:
      specs.append(pl.BlockSpec((g, bq, bk) if rows_of_q else (g, bk, bq), bias_map))
    specs += [pl.BlockSpec((None, 1, bq), q_seg_map), pl.BlockSpec((None, 1, bk), k_seg_map)]
    row_spec = pl.BlockSpec((None, g, 1, bq), row_map)
    return specs, q_spec, k_spec, row_spec

  def work(self, matmuls: int) -> dict:
    """Cost estimate of a kernel doing `matmuls` [q, kv] x d_kv products per head."""
    pairs = self.batch * self.heads * self.q_len * self.kv_len
    return dict(flops=2 * matmuls * pairs * self.d_kv, transcendentals=pairs)


def _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, layout):
  has_bias = bias is not None
  specs, q_spec, _, row_spec = layout.specs(has_bias, rows_of_q=True)
  args = [q, k, v] + ([bias] if has_bias else []) + [q_seg, k_seg]
  row = jax.ShapeDtypeStruct((layout.batch, layout.heads, 1, layout.q_len), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), row, row]
  kernel = functools.partial(_forward_kernel, causal=causal, has_bias=has_bias,
                             d_kv=layout.d_kv)
  return _call(kernel, layout.grid(True), specs, [q_spec, row_spec, row_spec], out_shape, args,
               semantics=("parallel", "parallel", "parallel"), interpret=interpret,
               name="t5_flash_attention_fwd", **layout.work(2))


def _backward(q, k, v, bias, q_seg, k_seg, row_max, row_sum, di, do, causal, interpret,
              layout):
  has_bias = bias is not None
  common = [q, k, v] + ([bias] if has_bias else []) + [q_seg, k_seg, row_max, row_sum, di, do]
  static = dict(causal=causal, has_bias=has_bias, d_kv=layout.d_kv)

  specs, q_spec, _, row_spec = layout.specs(has_bias, rows_of_q=True)
  out_specs = [q_spec]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if has_bias:
    out_specs.append(specs[3])
    out_shape.append(jax.ShapeDtypeStruct(bias.shape, jnp.float32))
  dq, *dbias = _call(
      functools.partial(_dq_kernel, **static), layout.grid(True),
      specs + [row_spec, row_spec, row_spec, q_spec], out_specs, out_shape, common,
      # dbias sums over the batch: that axis must run in order on one core.
      semantics=("parallel", "parallel", "arbitrary" if has_bias else "parallel"),
      interpret=interpret, name="t5_flash_attention_dq", **layout.work(3))

  specs, q_spec, k_spec, row_spec = layout.specs(has_bias, rows_of_q=False)
  if has_bias:  # the key-major kernel reads the bias transposed (shared: small)
    common[3] = jnp.swapaxes(bias, 1, 2)
  dk, dv = _call(
      functools.partial(_dkv_kernel, **static), layout.grid(False),
      specs + [row_spec, row_spec, row_spec, q_spec], [k_spec, k_spec],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], common,
      semantics=("parallel", "parallel", "parallel"), interpret=interpret,
      name="t5_flash_attention_dkv", **layout.work(4))
  return dq, dk, dv, (dbias[0] if dbias else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, bias, q_seg, k_seg, causal, interpret, layout):
  return _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, layout)[0]


def _flash_fwd(q, k, v, bias, q_seg, k_seg, causal, interpret, layout):
  out, row_max, row_sum = _forward(q, k, v, bias, q_seg, k_seg, causal, interpret, layout)
  return out, (q, k, v, bias, q_seg, k_seg, out, row_max, row_sum)


def _flash_bwd(causal, interpret, layout, residuals, do):
  q, k, v, bias, q_seg, k_seg, out, row_max, row_sum = residuals
  do = do.astype(out.dtype)
  # D_i = sum_j P_ij dP_ij = rowsum(dO * O) per head: [batch, heads, 1, q_len], small.
  per_head = (layout.batch, layout.q_len, layout.heads, layout.d_kv)
  di = jnp.sum(do.astype(jnp.float32).reshape(per_head) * out.astype(jnp.float32).reshape(
      per_head), axis=-1)
  di = jnp.swapaxes(di, 1, 2)[:, :, None, :]
  dq, dk, dv, dbias = _backward(q, k, v, bias, q_seg, k_seg, row_max, row_sum, di, do,
                                causal, interpret, layout)
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
  width = heads * query.shape[-1]
  layout = _Layout(batch, q_len, kv_len, heads, query.shape[-1], block)
  flat = lambda x: x.reshape(x.shape[:2] + (width,))  # free: the projections' layout
  context = _flash(flat(query), flat(key), flat(value), position_bias, q_seg, k_seg, causal,
                   interpret, layout)
  return context.reshape(query.shape).astype(dtype or query.dtype)
