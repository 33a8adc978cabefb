"""The low-level operations of the T5 model, in JAX alone (no Flax).

float32-accumulated dots (`dot_f32`, `matmul` with its own VJP), T5's relative
position buckets, the attention kernels (`attention_implementation` chooses,
`attend` runs; `AttentionMasks` keeps the bias's parts apart for the fused TPU
kernel) and the additive key-mask bias, and the remat policies that know
`matmul`'s saved outputs by name. `layers.py`
builds the Flax modules on these; `distill/` reuses `dot_f32` without loading
any Flax module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from miniend_jax.model.config import REMAT_POLICIES, T5Config
from miniend_jax.model.flash_attention import flash_attention, pallas_tpu_target, target_platform

Array = jax.Array

# Additive attention bias for masked keys. Large but finite, so a row whose keys
# are all masked (a fully padded example) softmaxes to finite values, not NaN.
MASK_BIAS = -1e10

# The dense projections run through `matmul`'s custom VJP, which remat policies
# do not see as a dot, so its outputs are named and saved by name as well.
_MATMUL_NAME = "t5_matmul"
REMAT_CHECKPOINT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names(_MATMUL_NAME)),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(_MATMUL_NAME)),
}


assert tuple(REMAT_CHECKPOINT_POLICIES) == REMAT_POLICIES, "model/config.py names the same policies"


def relative_position_buckets(query_len: int, key_len: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's relative position bucket of every (query, key) pair: int32 [query_len, key_len].

  Computed in numpy at trace time (the shapes are static). The log-spaced
  buckets use float32 arithmetic as Hugging Face and Mesh TensorFlow do, so
  distances that sit exactly on a bucket boundary (16, 32, 64 with the default
  settings) fall in the same bucket as in the pretrained checkpoints.
  """
  relative_position = (np.arange(key_len, dtype=np.int64)[None, :]
                       - np.arange(query_len, dtype=np.int64)[:, None])
  return _buckets_of_offsets(relative_position, bidirectional=bidirectional,
                             num_buckets=num_buckets, max_distance=max_distance)


def offset_buckets(query_len: int, key_len: int, *, bidirectional: bool, num_buckets: int,
                   max_distance: int) -> np.ndarray:
  """The bucket of every offset key - query, from -(query_len - 1) to key_len - 1 in
  order: int32 [query_len + key_len - 1] (`by_offset_to_matrix` spreads values
  indexed so over the [query_len, key_len] matrix)."""
  offsets = np.arange(-(query_len - 1), key_len, dtype=np.int64)
  return _buckets_of_offsets(offsets, bidirectional=bidirectional, num_buckets=num_buckets,
                             max_distance=max_distance)


def by_offset_to_matrix(values: Array, query_len: int, key_len: int) -> Array:
  """[..., query_len + key_len - 1] values by offset (as `offset_buckets` orders them)
  -> [..., query_len, key_len] with entry (i, j) the value of offset j - i.

  Data movement only (no arithmetic: the same values a gather gives), and no
  gather: on TPU a gather of [heads] slices lays its [query * key, heads] result
  out heads-minor, padded to 128 lanes (~10x the bytes for 12 heads). Row i of
  the matrix is a window of the values starting at offset -i: the values,
  rolled, repeated query_len times and read back in rows one shorter, shift by
  one per row."""
  if query_len == 1:
    return values[..., None, :]
  length = query_len + key_len - 1
  rolled = jnp.roll(values, -(query_len - 1), axis=-1)
  repeated = jnp.broadcast_to(rolled[..., None, :], values.shape[:-1] + (query_len, length))
  flat = repeated.reshape(values.shape[:-1] + (query_len * length,))
  skewed = flat[..., :query_len * (length - 1)].reshape(
      values.shape[:-1] + (query_len, length - 1))
  return skewed[..., :key_len]


def _buckets_of_offsets(relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int,
                        max_distance: int) -> np.ndarray:
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(np.int64) * num_buckets
    relative_position = np.abs(relative_position)
  else:
    relative_position = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  with np.errstate(divide="ignore"):
    scaled = (np.log(relative_position.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  # Small distances give -inf or garbage here; they are replaced by is_small below.
  scaled = np.where(is_small, 0, scaled)
  if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  buckets += np.where(is_small, relative_position, if_large)
  return buckets.astype(np.int32)


def dot_f32(lhs: Array, rhs: Array, contracting: tuple[int, int], out_dtype: Any) -> Array:
  """2-D dot contracting lhs axis `contracting[0]` with rhs axis `contracting[1]`."""
  dims = (((contracting[0],), (contracting[1],)), ((), ()))
  return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(lhs: Array, rhs: Array, out_dtype: Any = None) -> Array:
  """[m, k] @ [k, n] -> [m, n] in `out_dtype` (default lhs.dtype), accumulated in float32."""
  return dot_f32(lhs, rhs, (1, 0), out_dtype or lhs.dtype)


def _matmul_2d_fwd(lhs, rhs, out_dtype):
  return _matmul_2d(lhs, rhs, out_dtype), (lhs, rhs)


def _matmul_2d_bwd(out_dtype, residuals, grad):
  del out_dtype
  lhs, rhs = residuals
  grad = grad.astype(lhs.dtype)
  return (dot_f32(grad, rhs, (1, 1), lhs.dtype),   # [m, n] x [k, n] -> [m, k]
          dot_f32(lhs, grad, (0, 0), rhs.dtype))   # [m, k] x [m, n] -> [k, n]


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: Array, kernel: Array, num_contracting: int, out_dtype: Any = None) -> Array:
  """Contracts the trailing `num_contracting` axes of x with the leading ones of kernel.

  x: [*batch, *in_shape]; kernel: [*in_shape, *out_shape] -> [*batch, *out_shape],
  accumulated in float32, returned in `out_dtype` (default x's dtype; x and
  kernel share it). The output head asks for float32, so bf16 models still give
  float32 logits: rounding logits of 16-64 to bf16 (spacing 0.125-0.25) would
  coarsen the distillation targets.

  Written as one 2-D matmul with its own VJP rather than a plain
  `lax.dot_general` for XLA:CPU's sake (TPU and GPU compile either form to the
  same thing): (1) a bf16 dot asked for a bf16 result is upcast and run as a
  float32 dot, while one asked for a float32 result runs on the bf16 (AMX)
  kernels, ~4x faster on a Sapphire Rapids core, and autodiff's gradient dots
  ask for bf16 results; (2) the weight gradient of a dot over [batch, length, d]
  contracts two axes, which XLA:CPU lowers through a strided transpose of the
  output gradient, ~2x slower for a whole MLP block than the 2-D form.
  benchmarks/README.md has the measurements.
  """
  in_shape = kernel.shape[:num_contracting]
  batch_shape = x.shape[:x.ndim - num_contracting]
  if x.shape[x.ndim - num_contracting:] != in_shape:
    raise ValueError(f"matmul: input shape {x.shape} does not end with kernel input {in_shape}")
  out_shape = kernel.shape[num_contracting:]
  k, n = math.prod(in_shape), math.prod(out_shape)
  out = _matmul_2d(x.reshape(-1, k), kernel.reshape(k, n),
                   None if out_dtype is None else jnp.dtype(out_dtype))
  return checkpoint_name(out, _MATMUL_NAME).reshape(batch_shape + out_shape)


def attention_implementation(config: T5Config, *, dropout: bool = False,
                             decode: bool = False) -> str:
  """The attention kernel a layer of `config` runs: "explicit", "xla", "cudnn" or "pallas".

  "auto" takes cuDNN's fused attention on GPUs for bf16 / fp16 compute with
  head sizes cuDNN accepts (a multiple of 8, at most 128), the project's Pallas
  flash attention on TPU v4 and newer (`flash_attention.py`: no [batch, heads, q,
  kv] scores in HBM, the position bias shared over the batch; v2 and v3 cannot
  compile it), and the explicit einsums
  everywhere else: on CPUs the explicit path measured faster. The platform is
  that of the current mesh's devices (`target_platform`), so a plan compiled
  for a TPU slice on a CPU host gets the TPU kernel; on TPU without a mesh
  (which the fused kernel needs to run per shard) only a single device takes it. Naming "pallas" off TPU
  runs the same kernels in Pallas' interpreter (slow; for tests).
  Incremental decoding (`decode`: one query against a cache) always runs
  explicit, whatever the config says, so a model trained with a fused kernel
  decodes as usual. The fused kernels have no attention-probability dropout:
  with `dropout` "auto" stays explicit and naming a fused one is an error.
  """
  chosen = config.attention_impl
  if decode:
    return "explicit"
  if chosen == "auto":
    if dropout:
      return "explicit"
    platform = target_platform()
    if platform == "tpu":
      # Not on TPU v2 / v3, nor on several devices without a mesh (`pallas_tpu_target`).
      return "pallas" if pallas_tpu_target() else "explicit"
    fusable = (platform == "gpu"
               and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
               and config.d_kv % 8 == 0 and config.d_kv <= 128)
    return "cudnn" if fusable else "explicit"
  if chosen != "explicit" and dropout:
    raise ValueError(
        f"T5Config.attention_impl={chosen!r} cannot apply attention dropout; use 'auto' "
        "(explicit for layers with dropout) or set dropout_rate=0.")
  return chosen


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["key_mask", "query_segments", "key_segments", "position"],
                   meta_fields=["query_len", "causal"])
@dataclasses.dataclass(frozen=True)
class AttentionMasks:
  """The parts of an attention's additive bias, kept apart (a pytree).

  The explicit and `jax.nn` kernels take their sum (`additive`); the fused TPU
  kernel takes them as they are, so nothing per example is [.., q_len, kv_len].

  key_mask: bool [batch, kv_len], False for padded keys.
  query_segments / key_segments: int [batch, q_len] / [batch, kv_len] for packed
    examples, or None.
  position: float32 [1, heads, q_len, kv_len], the relative-position bias shared
    by the batch, or None (cross-attention).
  query_len: static; causal: static, query i sees keys j <= i.
  """

  key_mask: Array
  query_segments: Array | None
  key_segments: Array | None
  position: Array | None
  query_len: int
  causal: bool = False

  def additive(self) -> Array:
    """The combined bias, float32 [batch, heads or 1, q_len, kv_len]: the same
    additions in the same order as the model always made them."""
    bias = key_mask_bias(self.query_len, self.key_mask, self.query_segments, self.key_segments)
    if self.causal:
      causal = jnp.tril(jnp.ones((self.query_len, self.key_mask.shape[1]), dtype=bool))
      bias = bias + jnp.where(causal, 0.0, MASK_BIAS)[None, None]
    if self.position is not None:
      bias = bias + self.position
    return bias

  def add_position(self, position: Array) -> "AttentionMasks":
    """With `position` [1, heads, q_len, kv_len] added to the position bias."""
    total = position if self.position is None else self.position + position
    return dataclasses.replace(self, position=total)


def attend(query: Array, key: Array, value: Array, bias: "Array | AttentionMasks",
           implementation: str, dtype: Any,
           dropout: Callable[[Array], Array] = lambda weights: weights,
           mesh_axes: tuple[Any, Any] | None = None) -> Array:
  """Multi-head attention without score scaling (T5 folds it into the query init).

  query: [batch, q_len, heads, d_kv]; key, value: [batch, kv_len, heads, d_kv].
  bias: additive float32 [batch or 1, heads or 1, q_len, kv_len] (positions and
    masks), or their parts as `AttentionMasks` (which "pallas" needs).
  implementation: "explicit", "xla", "cudnn" or "pallas", as `attention_implementation` chose.
  dropout: applied to the attention probabilities; the explicit kernel only (the
    fused ones have none, so `attention_implementation` never picks them with dropout).
  mesh_axes: for "pallas" under a mesh, the mesh axes of the batch and of the heads
    (the kernel runs per shard, under `shard_map`); None without a mesh.
  Returns the context [batch, q_len, heads, d_kv] in `dtype`.
  """
  if implementation == "pallas":
    if not isinstance(bias, AttentionMasks):
      raise ValueError("attend: the 'pallas' kernel takes AttentionMasks, not a combined bias")
    return _sharded_flash(query, key, value, bias, dtype, mesh_axes)
  if isinstance(bias, AttentionMasks):
    bias = bias.additive()
  if implementation == "explicit":
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    weights = dropout(weights)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, value,
                         preferred_element_type=jnp.float32).astype(dtype)
  else:
    # The relative-position bias and the masks travel as one additive bias
    # (cuDNN wants it in the inputs' dtype); scale 1: T5 scales by its init.
    context = jax.nn.dot_product_attention(
        query, key, value, bias=bias.astype(query.dtype) if implementation == "cudnn" else bias,
        scale=1.0, implementation=implementation).astype(dtype)
  return context


def mesh_axis_names(axes: Any) -> tuple[str, ...]:
  """A PartitionSpec entry (a mesh axis name, a tuple of them, or None) as a tuple."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shards(axes: Any) -> int:
  """How many shards the current mesh's `axes` (a PartitionSpec entry) split an array
  axis into; 1 without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape[axis] for axis in mesh_axis_names(axes))


def _sharded_flash(query: Array, key: Array, value: Array, masks: AttentionMasks, dtype: Any,
                   mesh_axes: tuple[Any, Any] | None) -> Array:
  """`flash_attention` on each shard: XLA cannot partition a Pallas call itself (it
  would gather the batch), so under a mesh it runs in `shard_map` over the batch
  and head axes. The position bias is not split over the batch; shard_map's
  transpose sums its gradient over the batch shards."""
  qseg, kseg = masks.query_segments, masks.key_segments
  if qseg is None or kseg is None:
    qseg = kseg = None

  def run(query, key, value, position, key_mask, qseg, kseg):
    return flash_attention(query, key, value, position, key_mask, qseg, kseg,
                           causal=masks.causal, dtype=dtype)

  args = (query, key, value, masks.position, masks.key_mask, qseg, kseg)
  if mesh_axes is None or jax.sharding.get_abstract_mesh().empty:
    return run(*args)
  batch, heads = mesh_axes
  P = jax.sharding.PartitionSpec
  per_token, rows = P(batch, None, heads, None), P(batch, None)
  position_spec = None if masks.position is None else P(None, heads, None, None)
  segment_spec = None if qseg is None else rows
  in_specs = (per_token, per_token, per_token, position_spec, rows, segment_spec, segment_spec)
  return jax.shard_map(run, in_specs=in_specs, out_specs=per_token, check_vma=False)(*args)


def key_mask_bias(query_len: int, key_mask: Array, query_segments: Array | None = None,
                  key_segments: Array | None = None) -> Array:
  """Additive mask bias, float32 [batch, 1, query_len, key_len].

  Only keys are masked (as Hugging Face does), so padded query rows still
  produce finite values; losses ignore those rows.
  """
  allowed = jnp.broadcast_to(key_mask[:, None, :], (key_mask.shape[0], query_len, key_mask.shape[1]))
  if query_segments is not None and key_segments is not None:
    allowed = allowed & (query_segments[:, :, None] == key_segments[:, None, :])
  return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)[:, None]
