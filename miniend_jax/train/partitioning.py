"""Device mesh, logical-axis rules and shardings (t5x-style).

Parameters and activations carry logical axis names ("batch", "embed", "heads",
...). A rules table maps each logical name to mesh axes; rules are tried in
order and a mesh axis is never used twice in one array, so ("batch", ("data",
"fsdp")) followed by ("embed", "fsdp") shards parameters' embed dimension over
fsdp while activations keep fsdp for the batch.

Three mesh axes:
  data  - pure data parallelism (parameters replicated);
  fsdp  - data parallelism with parameters and optimizer state sharded (ZeRO-3);
  model - tensor parallelism over heads, mlp and vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape. A size of -1 takes all devices the other axes leave."""

  data: int = -1
  fsdp: int = 1
  model: int = 1
  logical_axis_rules: tuple = DEFAULT_LOGICAL_AXIS_RULES

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.model]
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1 (inferred), got {sizes}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {sizes}.")
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"MeshConfig {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not "
            f"divisible by the fixed axes' product {known}.")
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(
          f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
          f"but {num_devices} are available. Set the sizes so their product is {num_devices} "
          "(or use -1 for one axis).")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  # Auto axes: XLA's propagation decides intermediate layouts from the logical
  # constraints (t5x / MaxText practice) instead of sharding-in-types.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    # Lets JAX order devices for the physical topology (TPU ICI rings).
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_sharding(logical_specs, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a [batch, length] input array: batch over the data-parallel axes."""
  return logical_to_sharding(PartitionSpec("batch", "length"), mesh, rules)


def host_local_to_global(batch, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """Turns each host's slice of the global batch (numpy [local_batch, ...]) into global jax.Arrays.

  Each process passes only its own rows; the global batch is their concatenation
  in process order.
  """
  sharding = batch_sharding(mesh, rules)

  def to_global(x):
    x = np.asarray(x)
    spec = PartitionSpec(*(sharding.spec[:1] + (None,) * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

  return jax.tree.map(to_global, batch)


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when several processes run this job.

  On TPU VM pods JAX discovers the coordinator itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns whether
  it initialised.
  """
  num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if num_processes <= 1 and not on_tpu_pod:
    return False
  if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=num_processes,
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  return True


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """Makes `mesh` current and `rules` the logical-axis rules, so the model's
  `nn.with_logical_constraint` calls become real sharding constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield mesh
