"""The T5 model's parameters as host-side pytrees: initialisation, shapes, logical
axes, and the scan layout.

`init_params` draws them, `param_shapes` / `param_logical_axes` describe them
without allocating, and `stack_layer_params` / `unstack_layer_params` convert a
tree between the unrolled layout (`layers_0` .. `layers_{n-1}`, the checkpoints')
and the `scan_layers` one (one `layers` subtree with a leading [n] axis): pure
tree transforms, checked against the config, that keep numpy leaves numpy.
`stacking.py` does that relayout on the devices instead (under jit, in the
target's shardings, layer counts from the trees) for loaders and checkpoints;
`layouts.py` is about how stored tensors hold a parameter, not about trees.
"""

from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miniend_jax.model.config import T5Config
from miniend_jax.model.t5 import STACKED_LAYERS, T5, dummy_inputs

Array = jax.Array


def init_params(config: T5Config, rng: Array) -> dict:
  """Randomly initialised parameters (unboxed arrays, `param_dtype`)."""
  boxed = T5(config).init(rng, *dummy_inputs())["params"]
  return nn.meta.unbox(boxed)


def param_logical_axes(config: T5Config) -> dict:
  """Logical axis names of every parameter: a pytree of `jax.sharding.PartitionSpec`
  with logical names, shaped like the parameters. Computes no values."""
  return nn.get_partition_spec(_abstract_params(config))


def param_shapes(config: T5Config) -> dict:
  """`jax.ShapeDtypeStruct` of every parameter, without allocating them."""
  return nn.meta.unbox(_abstract_params(config))


@functools.lru_cache(maxsize=32)
def _abstract_params(config: T5Config) -> dict:
  """The boxed (logically named) abstract parameter tree of `config`.

  Cached: tracing the model's initialiser takes ~0.25 s even for tiny models, and a
  run asks for the shapes and axes of the same configs several times (loading,
  sharding, checkpoint targets), a sweep or the quickstart in every stage. Callers
  get new trees (`unbox` / `get_partition_spec` rebuild the containers), so the
  cached one is never handed out to be mutated.
  """
  return jax.eval_shape(lambda: T5(config).init(jax.random.key(0), *dummy_inputs())["params"])


def _layer_stacks(config: T5Config) -> tuple[tuple[str, int], ...]:
  return (("encoder", config.num_layers), ("decoder", config.num_decoder_layers))


def _stack_leaves(leaves):
  xp = jnp if any(isinstance(x, jax.Array) for x in leaves) else np
  return xp.stack([xp.asarray(x) for x in leaves])


def stack_layer_params(params: Mapping, config: T5Config) -> dict:
  """Unrolled parameters (`layers_0` .. `layers_{n-1}` per stack, the Hugging Face
  import's and checkpoints' layout) -> the `scan_layers` layout (one `layers`
  subtree per stack, each leaf with a leading [n] axis).

  Pure: returns a new tree (numpy leaves stay numpy, jax arrays stay jax arrays);
  a stack already stacked is returned as it is.

  Raises:
    ValueError: naming a stack whose layers do not match `config`.
  """
  out = dict(params)
  for stack, num in _layer_stacks(config):
    sub = dict(params[stack])
    if STACKED_LAYERS in sub:
      continue
    names = [f"layers_{i}" for i in range(num)]
    missing = [n for n in names if n not in sub]
    extra = sorted(k for k in sub if k.startswith("layers_") and k not in names)
    if missing or extra:
      raise ValueError(f"stack_layer_params: the {stack} should have layers_0..layers_{num - 1} "
                       f"for this config; missing {missing}, unexpected {extra}.")
    layers = [sub.pop(n) for n in names]
    sub[STACKED_LAYERS] = jax.tree.map(lambda *leaves: _stack_leaves(leaves), *layers)
    out[stack] = sub
  return out


def unstack_layer_params(params: Mapping, config: T5Config) -> dict:
  """The inverse of `stack_layer_params`: the `scan_layers` layout -> `layers_i`
  subtrees. Pure; a stack already unrolled is returned as it is.

  Raises:
    ValueError: when a stacked leaf's leading axis is not the stack's layer count.
  """
  out = dict(params)
  for stack, num in _layer_stacks(config):
    sub = dict(params[stack])
    if STACKED_LAYERS not in sub:
      continue
    stacked = sub.pop(STACKED_LAYERS)
    for leaf in jax.tree.leaves(stacked):
      if leaf.shape[:1] != (num,):
        raise ValueError(f"unstack_layer_params: the {stack}'s stacked parameters have a "
                         f"leading axis of {leaf.shape[:1]}, but the config has {num} layers.")
    for i in range(num):
      sub[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    out[stack] = sub
  return out
