"""The layers of the T5 model as Flax linen modules, each exact against Hugging Face's.

Dense (bias-free, float32-accumulated), RMSNorm (T5's scale-only layer norm),
RelativePositionBias (T5's bucketed relative positions), Attention (with its
key/value cache for incremental decoding and its `AttentionTap`) and FeedForward
(ReLU or gated). `t5.py` assembles them into blocks, stacks and the model;
the arithmetic they share is in `ops.py`.

Every parameter carries logical axis names (t5x style: "embed", "mlp", "heads",
"kv", "relpos_buckets") and the main activations carry logical constraints, so
`train/partitioning.py` maps them onto any mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from miniend_jax.model.config import T5Config
from miniend_jax.model.ops import (AttentionMasks, attend, attention_implementation,
                                   by_offset_to_matrix, matmul, offset_buckets)

Array = jax.Array


@flax.struct.dataclass
class AttentionTap:
  """Projections of one attention layer, before the head split.

  query: [batch, query_len, num_heads * d_kv]
  key:   [batch, key_len, num_heads * d_kv]
  value: [batch, key_len, num_heads * d_kv]
  """

  query: Array
  key: Array
  value: Array


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Dense(nn.Module):
  """Bias-free projection contracting the trailing `in_dims` axes of the input.

  kernel: [*in_shape, *out_shape] with logical axes `kernel_axes`.
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  init_std: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  out_dtype: Any = None  # default: dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", nn.initializers.normal(self.init_std),
                    self.in_shape + self.out_shape, self.kernel_axes, self.param_dtype)
    return matmul(x.astype(self.dtype), kernel.astype(self.dtype), len(self.in_shape),
                  self.out_dtype)


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                   self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each relative-position bucket, shared by all layers of a stack."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_len: int, key_len: int) -> Array:
    """Returns the bias, float32 [1, heads, query_len, key_len]."""
    cfg = self.config
    table = _param(self, "rel_embedding",
                   nn.initializers.normal(cfg.d_model ** -0.5),
                   (cfg.num_heads, cfg.relative_attention_num_buckets),
                   ("heads", "relpos_buckets"), jnp.dtype(cfg.param_dtype))
    # The bias depends on the offset key - query alone: gather the few offsets'
    # values, then spread them over the matrix (`by_offset_to_matrix`: no padded
    # [query * key, heads] gather on TPU). The same values as a gather per pair.
    buckets = offset_buckets(
        query_len, key_len, bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    by_offset = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=1)
    return by_offset_to_matrix(by_offset, query_len, key_len)[None]


class Attention(nn.Module):
  """Multi-head attention without score scaling (T5 folds it into the query init)."""

  config: T5Config
  deterministic: bool = True
  return_tap: bool = False
  # Incremental decoding: keys and values of past positions live in the "cache"
  # collection ([batch, max_len, heads, d_kv]); each call appends one position.
  decode: bool = False

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array | AttentionMasks):
    """Attends `inputs_q` [batch, q_len, d_model] over `inputs_kv` [batch, kv_len, d_model].

    bias: additive float32 [batch or 1, heads, q_len, kv_len] (positions and masks),
      or their parts (`AttentionMasks`, for the fused kernel); in decode mode
      [batch or 1, heads, 1, max_len].
    Returns (output [batch, q_len, d_model], AttentionTap or None).
    """
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    heads_shape = (cfg.num_heads, cfg.d_kv)

    def projection(name, std):
      return Dense((cfg.d_model,), heads_shape, ("embed", "heads", "kv"), std,
                   dtype, param_dtype, name=name)

    query = projection("query", (cfg.d_model * cfg.d_kv) ** -0.5)(inputs_q)
    key = projection("key", cfg.d_model ** -0.5)(inputs_kv)
    value = projection("value", cfg.d_model ** -0.5)(inputs_kv)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))
    if self.decode:
      key, value = self._update_cache(key, value)

    implementation = attention_implementation(
        cfg, dropout=not self.deterministic and cfg.dropout_rate > 0, decode=self.decode)
    dropout = lambda w: nn.Dropout(cfg.dropout_rate)(w, deterministic=self.deterministic)
    context = attend(query, key, value, bias, implementation, dtype, dropout,
                     logical_mesh_axes("batch", "heads") if implementation == "pallas" else None)
    out = Dense(heads_shape, (cfg.d_model,), ("heads", "kv", "embed"),
                cfg.inner_dim ** -0.5, dtype, param_dtype, name="out")(context)

    tap = None
    if self.return_tap:
      join = lambda t: t.reshape(t.shape[:2] + (cfg.inner_dim,))
      tap = AttentionTap(join(query), join(key), join(value))
    return out, tap

  def _update_cache(self, key: Array, value: Array) -> tuple[Array, Array]:
    """Writes this step's key/value [batch, 1, heads, d_kv] at the cache index and
    returns the whole cache [batch, max_len, heads, d_kv]. The first (initialising)
    call, made with the full max_len, only allocates the cache."""
    initialised = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialised:
      return key, value
    position = (0, index.value, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, position)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, position)
    index.value = index.value + 1
    return cached_key.value, cached_value.value


def logical_mesh_axes(*names: str) -> tuple:
  """The mesh axes that split each logical axis in `names` under the current mesh
  and rules (per name: a mesh axis name, a tuple of them, or None; all None
  without a mesh)."""
  if jax.sharding.get_abstract_mesh().empty:
    return (None,) * len(names)
  return tuple(nn.logical_to_mesh_axes(names))


class FeedForward(nn.Module):
  """T5 MLP: wi -> activation (gated for v1.1) -> dropout -> wo."""

  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    wi = functools.partial(Dense, (cfg.d_model,), (cfg.d_ff,), ("embed", "mlp"),
                           cfg.d_model ** -0.5, dtype, param_dtype)
    if cfg.is_gated:
      h = cfg.activation(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
    else:
      h = cfg.activation(wi(name="wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return Dense((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), cfg.d_ff ** -0.5,
                 dtype, param_dtype, name="wo")(h)
