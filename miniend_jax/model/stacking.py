"""Moving parameters between the unrolled and the scanned layout, on the devices.

Checkpoints of every format hold layers one by one (`layers_0` ...); a model
with `scan_layers` keeps each stack as one `layers` subtree with a leading
[num_layers] axis. Loaders read the unrolled layout with the shardings of the
scanned one minus that axis, then stack on the devices (`relayout`), so no
host ever holds a whole stack; a scanned checkpoint restores into an unrolled
model the other way round. Layer counts come from the trees themselves.
`params.stack_layer_params` / `unstack_layer_params` are the host-side
counterparts: pure tree transforms checked against a config, numpy leaves kept.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

_STACKED = "layers"
STACKS = ("encoder", "decoder")


def is_scanned(params: Mapping) -> bool:
  """Whether a parameter tree (of arrays, shapes or metadata) holds stacked layers."""
  return _STACKED in params["encoder"]


def _num_layers(sub: Mapping) -> int:
  return sum(1 for k in sub if k.startswith("layers_"))


def _per_layer(sharding):
  if not isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))


def _stacked(sharding):
  if not isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def unrolled_shardings(shardings: Mapping, num_layers: Mapping[str, int]) -> dict:
  """The shardings of a scanned tree's params as `layers_i` subtrees (each layer
  sharded like its stacked leaf without the leading layer axis).

  Args:
    num_layers: {"encoder": n, "decoder": m}.
  """
  out = dict(shardings)
  for stack in STACKS:
    sub = dict(shardings[stack])
    per_layer = jax.tree.map(_per_layer, sub.pop(_STACKED))
    sub.update({f"layers_{i}": per_layer for i in range(num_layers[stack])})
    out[stack] = sub
  return out


def abstract_like(target: Mapping, saved: Mapping) -> Any:
  """`target` (ShapeDtypeStructs with shardings) in the layout of `saved` (a tree of
  anything with shapes): what to restore a checkpoint of the other layout into
  before `relayout` moves it to the target's."""
  if is_scanned(target) == is_scanned(saved):
    return target
  out = dict(target)
  for stack in STACKS:
    sub = dict(target[stack])
    if is_scanned(target):
      layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype,
                                                          sharding=_per_layer(s.sharding)),
                           sub.pop(_STACKED))
      sub.update({f"layers_{i}": layer for i in range(_num_layers(saved[stack]))})
    else:
      n = _num_layers(sub)
      first = sub["layers_0"]
      for i in range(n):
        del sub[f"layers_{i}"]
      sub[_STACKED] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
          (n,) + tuple(s.shape), s.dtype, sharding=_stacked(s.sharding)), first)
    out[stack] = sub
  return out


def _restack(params: Mapping, scanned: bool) -> dict:
  out = dict(params)
  for stack in STACKS:
    sub = dict(params[stack])
    if scanned:
      layers = [sub.pop(f"layers_{i}") for i in range(_num_layers(sub))]
      sub[_STACKED] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
      stacked = sub.pop(_STACKED)
      n = jax.tree.leaves(stacked)[0].shape[0]
      sub.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)})
    out[stack] = sub
  return out


def relayout(params: Any, scanned: bool, shardings=None) -> Any:
  """`params` (device arrays, either layout) in the stacked layout when `scanned`,
  else unrolled, placed in `shardings` (the target layout's) when given."""
  if is_scanned(params) == scanned:
    return params
  # One jitted function (static `scanned`), so a layout seen before is not compiled again.
  return jax.jit(_restack, static_argnums=1, out_shardings=shardings)(params, scanned)
