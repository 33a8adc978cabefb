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
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from miniend_jax.model.layers import logical_mesh_axes
from miniend_jax.model.ops import mesh_shards
from miniend_jax.train import accelerators

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
    ("layers", None),  # the stacked axis of scanned layers (ModelSetup.scan_layers)
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape: within a slice (ICI) and across slices (DCN).

  `data`, `fsdp` and `model` divide the devices of one slice (a size of -1
  takes all devices the other axes leave). `dcn_data` and `dcn_fsdp` divide the
  slices of a multi-slice job (MaxText's dcn_*_parallelism): data parallelism
  across slices only needs a gradient all-reduce per step over the slower
  data-centre network, so it is the usual choice. The mesh's "data" axis then
  has data * dcn_data devices and "fsdp" fsdp * dcn_fsdp; the model axis never
  crosses slices.
  """

  data: int = -1
  fsdp: int = 1
  model: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  logical_axis_rules: tuple = DEFAULT_LOGICAL_AXIS_RULES

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, model) sizes within one slice of `num_devices` devices."""
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

  def dcn_shape(self) -> tuple[int, int, int]:
    """The (data, fsdp, model) sizes across slices."""
    for name in ("dcn_data", "dcn_fsdp"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MeshConfig.{name}={value!r} must be a positive integer.")
    return (self.dcn_data, self.dcn_fsdp, 1)


def num_slices(devices: Sequence[jax.Device]) -> int:
  """How many slices (TPU pod slices joined over DCN) the devices form; 1 off TPU."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh over `devices` (default: all devices).

  Devices of several slices get a hybrid mesh: `config.shape` within each slice,
  `config.dcn_shape` across them (data parallel across all slices when the dcn_*
  sizes are left at 1). `devices` may be abstract TPU devices of a
  topology (`jax.experimental.topologies`), which is how `miniend plan` builds
  the mesh of a pod it does not have.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  dcn = config.dcn_shape()
  if dcn == (1, 1, 1) and slices > 1:
    dcn = (slices, 1, 1)  # unset: data parallelism across slices, the usual choice
  if int(np.prod(dcn)) != slices:
    raise ValueError(
        f"MeshConfig dcn_data={config.dcn_data} x dcn_fsdp={config.dcn_fsdp} = "
        f"{int(np.prod(dcn))} slices, but the devices form {slices} slice(s). Set the dcn_* "
        "sizes so their product is the number of slices (1 for a single slice).")
  ici = config.shape(len(devices) // slices)
  # Auto axes: XLA's propagation decides intermediate layouts from the logical
  # constraints (t5x / MaxText practice) instead of sharding-in-types.
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                allow_split_physical_axes=True)
  elif devices[0].platform == "tpu":
    # Orders devices along the physical torus (ICI rings).
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_sharding(logical_specs, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a [batch, length] input array: batch over the data-parallel axes."""
  return logical_to_sharding(PartitionSpec("batch", "length"), mesh, rules)


def host_batch_rows(mesh: Mesh, global_batch_size: int,
                    rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> list[tuple[int, int]]:
  """The rows of a global [global_batch_size, ...] batch that this process's devices hold.

  Returns sorted, merged [start, stop) ranges. They follow the devices'
  data-parallel coordinates in the mesh, not the process index: when a model
  replica spans several processes (a "model" axis across hosts), those
  processes hold the same rows, so they must read the same examples.
  """
  index_map = batch_sharding(mesh, rules).addressable_devices_indices_map((global_batch_size, 1))
  return _merge_ranges(_row_range(index[0], global_batch_size) for index in index_map.values())


def rows_by_process(mesh: Mesh, global_batch_size: int,
                    rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> dict[int, list[tuple[int, int]]]:
  """`host_batch_rows` of every process, computed on any one of them."""
  index_map = batch_sharding(mesh, rules).devices_indices_map((global_batch_size, 1))
  ranges: dict[int, list] = {}
  for device, index in index_map.items():
    ranges.setdefault(device.process_index, []).append(_row_range(index[0], global_batch_size))
  return {p: _merge_ranges(r) for p, r in sorted(ranges.items())}


def _row_range(row_slice: slice, size: int) -> tuple[int, int]:
  start, stop, _ = row_slice.indices(size)
  return start, stop


def _merge_ranges(ranges) -> list[tuple[int, int]]:
  merged: list[list[int]] = []
  for start, stop in sorted(set(ranges)):
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], stop)
    else:
      merged.append([start, stop])
  return [(a, b) for a, b in merged]


def host_local_to_global(batch, mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES, *,
                         global_batch_size: int | None = None):
  """Turns this host's rows of a global batch (numpy [local_rows, ...]) into global jax.Arrays.

  Args:
    batch: a pytree of numpy arrays holding the rows `host_batch_rows(mesh,
      global_batch_size)` names, concatenated in that order.
    global_batch_size: the global batch; None means the processes' rows are
      contiguous blocks in process order (the global batch is their
      concatenation), as on meshes whose model axis stays within a host.
  Returns:
    The global batch, sharded over the data-parallel axes.
  """
  sharding = batch_sharding(mesh, rules)
  if global_batch_size is None:
    def to_global(x):
      x = np.asarray(x)
      spec = PartitionSpec(*(sharding.spec[:1] + (None,) * (x.ndim - 1)))
      return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
    return jax.tree.map(to_global, batch)

  ranges = host_batch_rows(mesh, global_batch_size, rules)
  offsets, offset = [], 0
  for start, stop in ranges:
    offsets.append((start, stop, offset))
    offset += stop - start

  def local_rows(row_slice: slice) -> slice:
    start, stop = _row_range(row_slice, global_batch_size)
    for range_start, range_stop, local_offset in offsets:
      if range_start <= start and stop <= range_stop:
        return slice(local_offset + start - range_start, local_offset + stop - range_start)
    raise AssertionError(f"rows {start}:{stop} are not on this host")  # cannot happen

  def to_global(x):
    x = np.asarray(x)
    if x.shape[0] != offset:
      raise ValueError(f"This host holds {offset} rows of the global batch of "
                       f"{global_batch_size}, but was given {x.shape[0]}.")
    spec = PartitionSpec(*(sharding.spec[:1] + (None,) * (x.ndim - 1)))
    return jax.make_array_from_callback(
        (global_batch_size,) + x.shape[1:], NamedSharding(mesh, spec),
        lambda index: x[(local_rows(index[0]),) + tuple(index[1:])])

  return jax.tree.map(to_global, batch)


# ----------------------------------------------------------------------------
# Multi-process start-up.

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detect_cluster() -> str | None:
  """Names the multi-process environment this process runs in, or None.

  Cloud TPU VMs are recognised by their TPU chips on the PCI bus
  (`accelerators.tpu_chips`, as JAX's own detection does; JAX then reads the
  slice's coordinator and worker list from the TPU metadata); Slurm and Open MPI
  by their task counts. MINIEND_DISTRIBUTED=0 turns detection off, =1 forces
  JAX's own cluster auto-detection.
  """
  forced = os.environ.get("MINIEND_DISTRIBUTED", "").strip().lower()
  if forced in ("0", "false", "off"):
    return None
  if forced in ("1", "true", "on"):
    return "forced by MINIEND_DISTRIBUTED"
  if accelerators.tpu_chips():
    return "Cloud TPU VM"
  for name, variable in (("Slurm", "SLURM_NTASKS"), ("Open MPI", "OMPI_COMM_WORLD_SIZE")):
    if int(os.environ.get(variable, "1") or 1) > 1:
      return name
  return None


class TpuUnavailableError(RuntimeError):
  """This is a Cloud TPU VM, but JAX cannot use its TPU."""


def require_tpu_on_tpu_vm() -> None:
  """Refuses to go on where this is a Cloud TPU VM (`accelerators.tpu_vm_evidence`)
  but JAX runs on another platform.

  A TPU held by another process, or the lock file of a killed run, makes JAX fall
  back to the CPU with a warning: the run would train there, orders of magnitude
  slower, without anyone noticing. Asking for the CPU on purpose (JAX_PLATFORMS=cpu,
  or `jax_platforms` set without "tpu") is respected.

  Raises:
    TpuUnavailableError: with JAX's reason and what to do.
  """
  evidence = accelerators.tpu_vm_evidence()
  asked = jax.config.jax_platforms
  if evidence is None or (asked and "tpu" not in asked.split(",")):
    return
  reason = ""
  try:
    if jax.default_backend() == "tpu":
      return
    jax.devices("tpu")  # raises with the reason the TPU backend did not start
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  raise TpuUnavailableError(
      f"This machine is a Cloud TPU VM ({evidence}) but JAX cannot use its TPU"
      f"{' (' + reason.rstrip('.') + ')' if reason else ''}, and a run on its CPU would be "
      "orders of magnitude slower. Stop what holds the TPU (tpu_scripts/launch.sh --restart "
      "does; by hand: sudo lsof -w /dev/accel* /dev/vfio/* lists it, kill it, wait until it "
      "has exited), remove /tmp/libtpu_lockfile, and start again; or set JAX_PLATFORMS=cpu "
      "to run on the CPU on purpose")


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when this job has several processes, then
  makes sure a Cloud TPU VM runs on its TPU (`require_tpu_on_tpu_vm`).

  Explicit settings (arguments, else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
  and JAX_PROCESS_ID) are used as given; otherwise a detected cluster (a Cloud
  TPU VM, Slurm, Open MPI: `detect_cluster`) is initialised with
  `jax.distributed.initialize()` and no arguments, so JAX finds the
  coordinator itself. Idempotent: later calls (sweeps run several jobs in one
  process) return True without initialising again.

  Returns:
    Whether the distributed runtime is (now) initialised.
  Raises:
    RuntimeError: a multi-process job asked for after JAX already ran a
      computation (it must be the first JAX call).
    TpuUnavailableError: a Cloud TPU VM whose TPU JAX cannot use.
  """
  started = _initialize_distributed(coordinator_address, num_processes, process_id)
  require_tpu_on_tpu_vm()
  return started


def _initialize_distributed(coordinator_address, num_processes, process_id) -> bool:
  """maybe_initialize_distributed without the TPU check."""
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  if explicit:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    where = f"coordinator {coordinator_address}, {num_processes} processes"
  else:
    cluster = detect_cluster()
    if cluster is None:
      return False
    kwargs, where = {}, cluster
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    raise RuntimeError(
        f"Cannot start JAX's distributed runtime ({where}): {e} Start the run in a fresh "
        "process (in a notebook, restart the runtime) so it is the first JAX call.") from e
  except ValueError as e:
    raise ValueError(
        f"Cannot start JAX's distributed runtime ({where}): {e} Set JAX_COORDINATOR_ADDRESS "
        "(host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.") from e
  return True


def batch_shards() -> int:
  """How many ways the current mesh and logical-axis rules split the "batch"
  axis (1 outside `mesh_context`): global rows over rows per device."""
  return mesh_shards(logical_mesh_axes("batch")[0])


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """Makes `mesh` current and `rules` the logical-axis rules, so the model's
  `nn.with_logical_constraint` calls become real sharding constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield mesh
