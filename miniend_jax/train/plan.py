"""Pod plans from a laptop: compile a run's step for a TPU slice this machine does not have.

libtpu (the `plan` extra: `pip install 'miniend_jax[plan]'`) describes any TPU
topology on a CPU-only host (`jax.experimental.topologies`). The run's own step
(`program.build_step_program`: the function, shardings and donation the run
loop jits) is built on that topology's abstract devices, lowered on abstract
(shape + sharding) inputs and compiled ahead of time by the TPU compiler, which
reports what one chip needs:

    miniend plan --gin_file gin_configs/runs/paper_t5_11b_6L768H.gin --topology v4-64

(the command's flags, gin settings and printing are in `cli/plan.py`).

`plan_program` / `plan_lowered` return a `PlanReport`: per-chip argument,
output, alias, temporary and generated-code bytes against the chip's HBM,
XLA's FLOPs and bytes accessed per step (loops counted by their trip counts,
`xla_cost.step_cost`) beside the analytic FLOPs (the MFU numerator), the
roofline step time per chip they imply (max(FLOPs / peak, bytes / HBM
bandwidth), with its MFU and which side binds), libtpu's own estimate when it
is positive, the compile time, the step time and tokens/s at 100% and 50% of
peak, and for a run that does not fit, by how much and which settings would
help. Chip figures come from the one hardware table (`hardware.py`).

Topology names are the ones TPU VMs are created with: `v4-64`, `v5p-128`
(v4 and v5p count TensorCores, two per chip: v4-64 has 32 chips), `v5e-256` or
`v5litepod-256`, `v6e-64` (chips); or a topology as libtpu names it
(`v4:2x4x4`, `v5e:16x16`).

Imports neither seqio nor TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from miniend_jax.train import accelerators, hardware, xla_cost

GiB = hardware.GiB

# Environment libtpu reads on a TPU VM (normally from the VM's metadata). On
# another host it warns once per variable and probes for them unless set; any
# value does for compiling (the topology comes from `get_topology_desc`).
# libtpu also takes /tmp/libtpu_lockfile, which any process with libtpu installed
# holds once JAX has probed for TPUs; compiling touches no chip, so plans ignore it.
_LIBTPU_QUIET_ENV = {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_HOSTNAMES": "localhost",
                     "TPU_WORKER_ID": "0", "TPU_SKIP_MDS_QUERY": "1",
                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
LIBTPU_PIN = "libtpu==0.0.42.1"  # what jax[tpu]==0.10.2 installs; pyproject's `plan` extra


class PlanError(ValueError):
  """A plan that cannot be made: an unknown topology, a bad config, libtpu missing."""


# ----------------------------------------------------------------------------
# TPU generations and topologies.


# The TPU rows of the one hardware table (names kept for users and tests).
TpuGeneration = hardware.TpuGeneration
GENERATIONS: dict[str, TpuGeneration] = hardware.TPU_GENERATIONS


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its name, libtpu's description of it, and what one chip has."""

  name: str  # as TPU VMs are named, e.g. "v4-64"
  generation: TpuGeneration
  topology_name: str  # libtpu's, e.g. "v4:2x4x4"
  chips_per_host_bounds: tuple[int, int, int]

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.topology_name.split(":")[1].split("x"))

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def hbm_bytes(self) -> int:
    return self.generation.hbm_bytes

  @property
  def peak_flops(self) -> float:
    return self.generation.peak_flops

  @property
  def hbm_bandwidth(self) -> float:
    return self.generation.hbm_bandwidth


def _torus_shape(chips: int, dims: int) -> tuple[int, ...] | None:
  """The slice shape TPU VMs of `chips` chips have (power-of-two sizes), or None."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if chips < math.prod(shape) or chips & (chips - 1):
    return None
  while math.prod(shape) < chips:
    # Double the last of the smallest dimensions, keeping the shape sorted:
    # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... and 1x1, 1x2, 2x2, 2x4, 4x4, ...
    smallest = min(shape)
    shape[max(i for i, d in enumerate(shape) if d == smallest)] *= 2
    shape.sort()
  return tuple(shape)


def _generation(prefix: str, original: str) -> TpuGeneration:
  for gen in GENERATIONS.values():
    if prefix == gen.name or prefix in gen.aliases:
      return gen
  known = ", ".join(f"{g.name}-N" for g in GENERATIONS.values())
  raise PlanError(f"Unknown TPU topology {original!r}: the generation {prefix!r} is not one of "
                  f"{known} (or v5litepod-N), nor a libtpu name such as v4:2x4x4.")


def parse_topology(name: str) -> Topology:
  """`v4-64`, `v5e-256`, `v5litepod-256`, `v5p-128`, `v6e-64`, or `v4:2x4x4` -> Topology.

  Raises:
    PlanError: naming what is wrong and what is accepted.
  """
  text = name.strip().lower()
  explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
  if explicit:
    gen = _generation(explicit.group(1), name)
    shape = tuple(int(d) for d in explicit.group(2).split("x"))
    if len(shape) != gen.dims or 0 in shape:
      raise PlanError(f"TPU topology {name!r}: {gen.name} slices have {gen.dims} dimensions, "
                      f"e.g. {gen.name}:{'x'.join(['2'] * gen.dims)}.")
    chips = math.prod(shape)
    user_name = f"{gen.name}-{chips * gen.cores_in_name}"
  else:
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match:
      raise PlanError(f"TPU topology {name!r} is not of the form GENERATION-SIZE (v4-64, "
                      "v5e-256, v5litepod-256, v5p-128, v6e-64) nor a libtpu name (v4:2x4x4).")
    gen = _generation(match.group(1), name)
    count = int(match.group(2))
    chips, remainder = divmod(count, gen.cores_in_name)
    shape = None if remainder else _torus_shape(chips, gen.dims)
    if shape is None:
      sizes = [_n * gen.cores_in_name for _n in (1, 4, 8, 16, 32, 64)
               if _torus_shape(_n, gen.dims)]
      raise PlanError(
          f"TPU topology {name!r}: no {gen.name} slice has that size here. Sizes are powers of "
          f"two, e.g. {', '.join(f'{gen.name}-{s}' for s in sizes)}"
          + (f" ({gen.name} names count TensorCores, 2 per chip)" if gen.cores_in_name > 1
             else "")
          + f"; other shapes by their libtpu name, e.g. {gen.name}:"
          + "x".join(["4"] * gen.dims) + ".")
    user_name = f"{gen.name}-{count}"
  bounds = tuple(min(2, d) for d in shape[:2]) + (1,)
  return Topology(user_name, gen, f"{gen.name}:{'x'.join(map(str, shape))}", bounds)


def quiet_libtpu() -> None:
  """Sets the TPU VM variables libtpu otherwise warns about (unless already set), on a
  host without TPU chips only: on a TPU VM libtpu reads the real ones. What it sets is
  listed in `accelerators.SET_FOR_COMPILING`, so that a later run in this process (or
  its children) does not take this host for a TPU VM."""
  if accelerators.tpu_chips():
    return
  set_here = [key for key in _LIBTPU_QUIET_ENV if key not in os.environ]
  for key in set_here:
    os.environ[key] = _LIBTPU_QUIET_ENV[key]
  if set_here:
    already = [k for k in os.environ.get(accelerators.SET_FOR_COMPILING, "").split(",") if k]
    os.environ[accelerators.SET_FOR_COMPILING] = ",".join(
        already + [f"{key}={_LIBTPU_QUIET_ENV[key]}" for key in set_here])


@functools.lru_cache(maxsize=None)
def _topology_devices(topology_name: str, chip_config: str, bounds: tuple[int, ...],
                      slices: int) -> tuple:
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  quiet_libtpu()
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology_name, chip_config_name=chip_config,
        chips_per_host_bounds=bounds, num_slices=slices)
  except RuntimeError as e:
    if "not installed" in str(e):
      raise PlanError(
          f"Planning for TPUs needs libtpu: pip install 'miniend_jax[plan]' (that is "
          f"{LIBTPU_PIN}, the version jax {jax.__version__} pins).") from e
    raise
  return tuple(desc.devices)


def topology_devices(name: str | Topology, slices: int = 1) -> list:
  """Abstract (compile-only) devices of `slices` slices of topology `name`.

  A mesh over them (`partitioning.make_mesh(config, devices)`) shards abstract
  arrays that `jax.jit(...).lower(...).compile()` compiles for that TPU.
  """
  topology = parse_topology(name) if isinstance(name, str) else name
  if not isinstance(slices, int) or slices < 1:
    raise PlanError(f"--slices must be a positive integer, got {slices!r}.")
  return list(_topology_devices(topology.topology_name, topology.generation.chip_config,
                                topology.chips_per_host_bounds, slices))


# ----------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass(frozen=True)
class Knob:
  """A setting that would lower the memory one chip needs."""

  binding: str  # the gin binding to change, e.g. "MeshConfig.fsdp = 16"
  why: str


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded (abstract or concrete) arrays:
  the largest per-device shard of each leaf, summed. Padding of TPU layouts is
  not counted (see `PlanReport.argument_bytes`, XLA's own figure)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
      shape, dtype = data.shape, data.dtype
    total += math.prod(shape) * np.dtype(dtype).itemsize
  return total


@dataclasses.dataclass
class PlanReport:
  """What one chip needs for one step, per XLA's TPU compiler, and what it implies.

  Memory figures are per chip, from `compiled.memory_analysis()` (TPU layouts
  included); when the step does not fit, the compiler refuses it and only its
  total (`bytes_per_chip`) and `xla_message` are known. `expected` holds the
  per-chip bytes of each argument group computed from the abstract inputs'
  shardings (no layout padding).
  """

  topology: str
  topology_name: str
  slices: int
  chips: int
  hbm_per_chip_bytes: int
  peak_flops_per_chip: float
  hbm_bandwidth_per_chip: float  # bytes/s
  fits: bool
  bytes_per_chip: int
  compile_s: float
  lower_s: float
  analytic_flops: float
  tokens_per_step: int
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  generated_code_bytes: int | None = None
  # XLA's cost analysis, each loop counted as often as it runs (`xla_cost.step_cost`).
  xla_flops: float | None = None  # per step, all chips
  xla_bytes_accessed: float | None = None  # per step, per chip
  xla_flops_counted_once: float | None = None  # XLA's own (loop bodies once), all chips
  xla_bytes_counted_once: float | None = None  # the same, per chip
  xla_optimal_seconds: float | None = None  # libtpu's estimate as reported
  xla_loops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # A loop whose trip count the HLO does not show is counted once: the XLA figures
  # (and the roofline step time) are then lower bounds.
  xla_counts_loops_once: bool = False
  xla_hbm_limit_bytes: int | None = None  # the usable HBM the compiler reported
  xla_message: str | None = None
  expected: dict[str, int] = dataclasses.field(default_factory=dict)
  mesh: dict[str, int] = dataclasses.field(default_factory=dict)
  knobs: list[Knob] = dataclasses.field(default_factory=list)
  title: str = ""

  @property
  def headroom_bytes(self) -> int:
    return self.hbm_per_chip_bytes - self.bytes_per_chip

  @property
  def excess_bytes(self) -> int:
    return max(0, -self.headroom_bytes) if self.fits else max(
        1, self.bytes_per_chip - (self.xla_hbm_limit_bytes or self.hbm_per_chip_bytes))

  def step_s(self, mfu: float) -> float:
    """Step time if the analytic FLOPs ran at `mfu` of every chip's peak."""
    return self.analytic_flops / (mfu * self.peak_flops_per_chip * self.chips)

  def tokens_per_s(self, mfu: float) -> float:
    return self.tokens_per_step / self.step_s(mfu)

  @property
  def roofline(self) -> xla_cost.Roofline | None:
    """One chip's step at its peak FLOP/s or HBM bandwidth, whichever binds, from
    XLA's counts; None when the compiler gave none (a step that does not fit)."""
    if self.xla_flops is None or self.xla_bytes_accessed is None:
      return None
    return xla_cost.Roofline(self.xla_flops / self.chips, self.xla_bytes_accessed,
                             self.peak_flops_per_chip, self.hbm_bandwidth_per_chip)

  @property
  def roofline_mfu(self) -> float | None:
    """The MFU the roofline step time implies: model FLOPs per chip / (step * peak).

    The model FLOPs are the analytic count, but never more than XLA counts in the
    program: the analytic count has the teacher's whole forward, and XLA drops
    what a recipe never reads (e.g. the teacher's decoder and upper encoder layers
    for an encoder-relation recipe), so a compute-bound step would otherwise show
    an MFU above 100%. Capped so, a compute-bound step whose analytic count is
    the higher one reads 100%: the roofline's bound, not a measurement."""
    roofline = self.roofline
    if roofline is None:
      return None
    return roofline.mfu(min(self.analytic_flops, self.xla_flops) / self.chips)

  @property
  def compiler_step_s(self) -> float | None:
    """libtpu's own step-time estimate, when it is credible: positive (it has been
    seen negative for whole training steps, and counts loop bodies once) and not
    below the roofline's compute bound (no step runs its FLOPs faster than peak;
    +0.025 s was seen for an 11B step whose FLOPs take 0.124 s at peak)."""
    seconds = self.xla_optimal_seconds
    if seconds is None or seconds <= 0:
      return None
    roofline = self.roofline
    return None if roofline is not None and seconds < roofline.compute_s else seconds

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["knobs"] = [dataclasses.asdict(k) for k in self.knobs]
    roofline = self.roofline
    if roofline is not None:
      out.update(roofline_step_s=roofline.step_s, roofline_compute_s=roofline.compute_s,
                 roofline_memory_s=roofline.memory_s, roofline_bound=roofline.bound,
                 roofline_mfu=self.roofline_mfu,
                 roofline_tokens_per_s=self.tokens_per_step / roofline.step_s)
    out.update(compiler_step_s=self.compiler_step_s,
               headroom_bytes=self.headroom_bytes, excess_bytes=self.excess_bytes,
               step_s_at_100pct_mfu=self.step_s(1.0), step_s_at_50pct_mfu=self.step_s(0.5),
               tokens_per_s_at_100pct_mfu=self.tokens_per_s(1.0),
               tokens_per_s_at_50pct_mfu=self.tokens_per_s(0.5))
    return out

  def verdict(self) -> str:
    if self.fits:
      return (f"FITS: {_gib(self.bytes_per_chip)} of {_gib(self.hbm_per_chip_bytes)} HBM per "
              f"chip ({self.bytes_per_chip / self.hbm_per_chip_bytes:.0%}), headroom "
              f"{_gib(self.headroom_bytes)}.")
    limit = self.xla_hbm_limit_bytes or self.hbm_per_chip_bytes
    text = (f"DOES NOT FIT: one chip needs {_gib(self.bytes_per_chip)} of "
            f"{_gib(limit)} usable HBM, {_gib(self.excess_bytes)} too much.")
    if self.knobs:
      text += " What would help:\n" + "\n".join(f"  - {k.binding}: {k.why}" for k in self.knobs)
    return text

  def _loop_lines(self) -> list[str]:
    if not self.xla_loops:
      return []
    trips = collections.Counter(loop["trip_count"] for loop in self.xla_loops
                                if loop["trip_count"] is not None)
    counted = ", ".join(f"{n} loop{'s' * (n > 1)} of {t}" for t, n in sorted(trips.items()))
    line = (f"XLA counts a loop body once; {trips.total()} of {len(self.xla_loops)} loops "
            f"recounted by trip count ({counted or 'none'})")
    if self.xla_counts_loops_once:
      line += "; the others' trip counts are unknown: XLA's figures are lower bounds"
    return [line]

  def _roofline_lines(self) -> list[str]:
    roofline = self.roofline
    if roofline is None:
      return []
    lower = " (a lower bound)" if self.xla_counts_loops_once else ""
    optimal = self.xla_optimal_seconds
    compiler = (_seconds(self.compiler_step_s) if self.compiler_step_s is not None else
                "none" if optimal is None else "not positive, not used" if optimal <= 0 else
                f"{_seconds(optimal)}, below the compute bound, not used")
    return [f"roofline per chip{lower}: compute {_seconds(roofline.compute_s)} "
            f"({roofline.flops:.3e} FLOP), memory {_seconds(roofline.memory_s)} "
            f"({roofline.bytes_accessed / 1e9:.3g} GB accessed): step "
            f"{_seconds(roofline.step_s)}, {roofline.bound}-bound, MFU {self.roofline_mfu:.0%}, "
            f"{self.tokens_per_step / roofline.step_s:,.0f} tokens/s",
            f"libtpu's own step estimate (optimal_seconds): {compiler}"]

  def table(self) -> str:
    """The report as a readable table."""
    lines = [self.title] if self.title else []
    lines.append(f"topology {self.topology} ({self.topology_name}) x {self.slices} slice(s): "
                 f"{self.chips} chips, {_gib(self.hbm_per_chip_bytes)} HBM and "
                 f"{self.peak_flops_per_chip / 1e12:.0f} TFLOP/s (bf16) and "
                 f"{self.hbm_bandwidth_per_chip / 1e9:,.0f} GB/s HBM bandwidth per chip")
    if self.mesh:
      lines.append("mesh " + " ".join(f"{k}={v}" for k, v in self.mesh.items()))
    width = 44
    lines.append(f"{'per chip':<{width}}{'bytes':>12}")
    rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
            ("aliased (donated)", None if self.alias_bytes is None else -self.alias_bytes),
            ("temporaries", self.temp_bytes), ("generated code", self.generated_code_bytes)]
    for label, value in rows:
      if value is not None:
        lines.append(f"  {label:<{width - 2}}{_gib(value):>12}")
    for label, value in self.expected.items():
      lines.append(f"    {label + ' (from shardings)':<{width - 4}}{_gib(value):>12}")
    lines.append(f"  {'total':<{width - 2}}{_gib(self.bytes_per_chip):>12}   of "
                 f"{_gib(self.hbm_per_chip_bytes)} HBM")
    flops = f"analytic {self.analytic_flops:.3e}"
    if self.xla_flops is not None:
      flops = f"XLA {self.xla_flops:.3e}, " + flops
      if self.analytic_flops:
        flops += f"; XLA / analytic {self.xla_flops / self.analytic_flops:.2f}"
    lines.append(f"FLOPs per step: {flops}")
    lines.extend(self._loop_lines())
    lines.append(f"compile: lower {self.lower_s:.1f} s, compile {self.compile_s:.1f} s")
    lines.append(f"step at 100% / 50% of peak: {self.step_s(1.0):.3f} s / {self.step_s(0.5):.3f} s"
                 f" = {self.tokens_per_s(1.0):,.0f} / {self.tokens_per_s(0.5):,.0f} tokens/s "
                 f"({self.tokens_per_step:,} tokens per step)")
    lines.extend(self._roofline_lines())
    lines.append(self.verdict())
    return "\n".join(lines)


def _seconds(value: float) -> str:
  return f"{value:.3f} s" if value >= 0.1 else f"{value * 1e3:.3g} ms"


def _gib(value: int) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
  for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(value) >= size:
      return f"{value / size:.2f} {unit}"
  return f"{value} B"


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OOM_PATTERNS = (
    # "Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G."
    re.compile(rf"Used {_SIZE} of {_SIZE} hbm", re.IGNORECASE),
    # "... required for HLO temporaries (48.00G) exceeds available HBM (15.75G)."
    re.compile(rf"\({_SIZE}\) exceeds available HBM \({_SIZE}\)", re.IGNORECASE),
)


def _parse_size(number: str, unit: str) -> int:
  return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def parse_out_of_memory(message: str) -> tuple[int, int] | None:
  """(bytes needed, usable HBM bytes) from an XLA:TPU out-of-memory error, or None."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  for pattern in _OOM_PATTERNS:
    match = pattern.search(message)
    if match:
      return (_parse_size(match.group(1), match.group(2)),
              _parse_size(match.group(3), match.group(4)))
  return None


def plan_lowered(lowered: jax.stages.Lowered, topology: Topology, *, slices: int = 1,
                 analytic_flops: float, tokens_per_step: int, lower_s: float = 0.0,
                 expected: dict[str, int] | None = None) -> PlanReport:
  """Compiles a step lowered on `topology`'s abstract devices and reports what it needs.

  Args:
    lowered: `jax.jit(step, ...).lower(*abstract_args)` with shardings over
      `topology_devices(topology, slices)`.
    analytic_flops: the step's model FLOPs (the MFU numerator, all chips).
    tokens_per_step: tokens one step consumes (for tokens/s).
    lower_s: how long lowering took (reported beside the compile time).
    expected: per-chip bytes of argument groups, for the table.

  Returns:
    A PlanReport; a step the TPU compiler rejects for memory is an answer too
    (fits=False, with the compiler's figures).

  Raises:
    jax.errors.JaxRuntimeError: any other compile failure.
  """
  chips = topology.chips * slices
  common = dict(topology=topology.name, topology_name=topology.topology_name, slices=slices,
                chips=chips, hbm_per_chip_bytes=topology.hbm_bytes,
                peak_flops_per_chip=topology.peak_flops,
                hbm_bandwidth_per_chip=topology.hbm_bandwidth, analytic_flops=float(analytic_flops),
                tokens_per_step=int(tokens_per_step), lower_s=lower_s,
                expected=dict(expected or {}))
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = parse_out_of_memory(str(e))
    if oom is None:
      raise
    return PlanReport(fits=False, bytes_per_chip=oom[0], xla_hbm_limit_bytes=oom[1],
                      compile_s=time.perf_counter() - start,
                      xla_message=str(e).strip().splitlines()[0][:500], **common)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  used = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)
  cost = xla_cost.step_cost(compiled)
  return PlanReport(
      fits=used <= topology.hbm_bytes, bytes_per_chip=int(used), compile_s=compile_s,
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      generated_code_bytes=int(memory.generated_code_size_in_bytes),
      # The per-chip program's count; SPMD runs it on every chip.
      xla_flops=cost.flops * chips, xla_bytes_accessed=cost.bytes_accessed,
      xla_flops_counted_once=cost.counted_once_flops * chips,
      xla_bytes_counted_once=cost.counted_once_bytes,
      xla_optimal_seconds=cost.optimal_seconds,
      xla_loops=[{"body": loop.body, "trip_count": loop.trip_count} for loop in cost.loops],
      xla_counts_loops_once=bool(cost.uncounted_loops),
      **common)


# ----------------------------------------------------------------------------
# Plans of a run's step program.


def plan_program(program, topology: Topology, *, slices: int = 1) -> PlanReport:
  """Lowers and compiles a `program.StepProgram` built on `topology_devices(topology,
  slices)` and reports it, with the settings that would help when it does not fit."""
  expected = {"state (params + optimizer)": shard_bytes(program.abstract_state),
              "batch": shard_bytes(program.abstract_batch)}
  if program.abstract_teacher is not None:
    expected["teacher"] = shard_bytes(program.abstract_teacher)
  start = time.perf_counter()
  lowered = program.lower()
  lower_s = time.perf_counter() - start
  report = plan_lowered(lowered, topology, slices=slices, analytic_flops=program.analytic_flops,
                        tokens_per_step=program.tokens_per_step, lower_s=lower_s,
                        expected=expected)
  report.mesh = {k: int(v) for k, v in program.mesh.shape.items()}
  if not report.fits:
    report.knobs = suggest_knobs(program, report)
  return report


def suggest_knobs(program, report: PlanReport) -> list[Knob]:
  """Settings that would lower the per-chip memory of `program`, most promising first."""
  mesh = report.mesh or {k: int(v) for k, v in program.mesh.shape.items()}
  devices = math.prod(mesh.values())
  state = report.expected.get("state (params + optimizer)", 0)
  teacher = report.expected.get("teacher", 0)
  weights = state + teacher
  activations = max(report.bytes_per_chip - weights, 0)
  knobs: list[tuple[float, Knob]] = []  # (bytes it could save, knob)
  per_slice = devices // report.slices
  fsdp = mesh.get("fsdp", 1)
  if fsdp * mesh.get("model", 1) < per_slice:
    target = per_slice // mesh.get("model", 1)
    saved = weights * (1 - fsdp / target)
    knobs.append((saved, Knob(
        f"MeshConfig.fsdp = {target}, MeshConfig.data = 1",
        f"shards the student's parameters and optimizer state ({_gib(state)} per chip now) and "
        f"the teacher ({_gib(teacher)}) over {target} chips instead of {fsdp}: about "
        f"{_gib(saved)} less per chip")))
  teacher_config = program.teacher_config
  if teacher_config is not None and np.dtype(teacher_config.param_dtype).itemsize > 2:
    knobs.append((teacher / 2, Knob(
        "ModelSetup.teacher_dtype = 'bfloat16'",
        f"halves the frozen teacher: about {_gib(teacher // 2)} less per chip")))
  student = program.student_config
  if student.remat_policy in ("none", "dots", "dots_no_batch"):
    better = "full" if student.remat_policy != "none" else "dots"
    knobs.append((activations / 2, Knob(
        f"ModelSetup.overrides = {{'remat_policy': '{better}'}}",
        f"recomputes the student's layer activations in the backward pass instead of keeping "
        f"them (temporaries are {_gib(activations)} per chip beyond the weights); "
        "'full' saves the most, 'dots' keeps the matmul outputs")))
  train = program.train
  accum = program.optimizer.grad_accum_steps
  data_parallel = mesh.get("data", 1) * mesh.get("fsdp", 1)
  if train.batch_size // 2 >= data_parallel and train.batch_size % 2 == 0:
    knobs.append((activations / 2, Knob(
        f"TrainConfig.batch_size = {train.batch_size // 2}, OptimizerConfig.grad_accum_steps "
        f"= {accum * 2}, TrainConfig.num_steps x 2",
        "halves the activations of a step while keeping the batch of each optimizer update")))
  if teacher_config is not None and mesh.get("model", 1) == 1 and per_slice >= 4:
    knobs.append((weights / 4, Knob(
        "MeshConfig.model = 4 (and MeshConfig.fsdp / data to match)",
        "tensor parallelism splits heads, feed-forward and vocabulary of both models: the "
        "teacher's activations as well as its weights")))
  return [k for _, k in sorted(knobs, key=lambda item: -item[0])]

