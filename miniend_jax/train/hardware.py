"""The one table of accelerator specifications: what a chip can do, from its data sheet.

MFU logging (`steps.device_peak_flops`, by the `device_kind` JAX reports) and the
planner (`plan.parse_topology`, by the names TPU VMs are created with) read the
same rows, in the manner of MaxText's accelerator spec map. Which accelerators
this machine has is another question (`accelerators.py`, from sysfs).

Figures are per chip (one JAX device, with v4 / v5p in megacore mode): dense
bf16 FLOP/s, HBM bytes, and HBM bandwidth in bytes/s (the roofline's memory
side, `xla_cost.Roofline`).

Imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  Attributes:
    name: short name ("v4", "H100", "cpu").
    device_kinds: what `jax.Device.device_kind` reports for it; TPU kinds match
      exactly ("TPU v5" is v5p, "TPU v5 lite" v5e), GPU kinds by prefix
      ("NVIDIA H100 80GB HBM3" is "NVIDIA H100"), the longest prefix winning.
    peak_flops: dense bf16 FLOP/s (None: no data-sheet figure, e.g. CPUs).
    hbm_bytes: HBM (device memory) per chip.
    hbm_bandwidth: HBM bandwidth per chip, bytes/s.
  """

  name: str
  device_kinds: tuple[str, ...]
  peak_flops: float | None
  hbm_bytes: int | None
  hbm_bandwidth: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuGeneration(Chip):
  """A TPU generation: a chip plus how its slices are named and described to libtpu.

  Attributes:
    aliases: other prefixes users write ("v5litepod").
    dims: torus dimensions (3 for v4 / v5p, 2 for v5e / v6e).
    cores_in_name: how many units of a slice name's count one chip is (2 where
      the name counts TensorCores: v4-64 is 32 chips).
    chip_config: libtpu's chip config ("megacore": one JAX device per chip).
  """

  aliases: tuple[str, ...] = ()
  dims: int
  cores_in_name: int
  chip_config: str = "default"


# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e), "key chip specifications": peak bf16 compute, HBM capacity and bandwidth.
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    # v4: 275 TFLOP/s, 32 GiB HBM2, 1200 GB/s.
    "v4": TpuGeneration(name="v4", device_kinds=("TPU v4",), peak_flops=275e12,
                        hbm_bytes=32 * GiB, hbm_bandwidth=1200e9, dims=3, cores_in_name=2,
                        chip_config="megacore"),
    # v5e: 197 TFLOP/s, 16 GB HBM2, 819 GB/s.
    "v5e": TpuGeneration(name="v5e", device_kinds=("TPU v5 lite", "TPU v5e"), peak_flops=197e12,
                         hbm_bytes=16 * GiB, hbm_bandwidth=819e9,
                         aliases=("v5litepod", "v5lite"), dims=2, cores_in_name=1),
    # v5p: 459 TFLOP/s, 95 GB HBM2e, 2765 GB/s.
    "v5p": TpuGeneration(name="v5p", device_kinds=("TPU v5", "TPU v5p"), peak_flops=459e12,
                         hbm_bytes=95 * GiB, hbm_bandwidth=2765e9, dims=3, cores_in_name=2,
                         chip_config="megacore"),
    # v6e (Trillium): 918 TFLOP/s, 32 GB HBM, 1638 GB/s.
    "v6e": TpuGeneration(name="v6e", device_kinds=("TPU v6 lite", "TPU v6e"), peak_flops=918e12,
                         hbm_bytes=32 * GiB, hbm_bandwidth=1638e9,
                         aliases=("v6", "trillium"), dims=2, cores_in_name=1),
}

# NVIDIA data sheets (SXM parts), dense (not 2:4 sparse) BF16 Tensor Core FLOP/s.
OTHER_CHIPS: tuple[Chip, ...] = (
    # H100 SXM data sheet: 989 TFLOP/s, 80 GB HBM3, 3.35 TB/s.
    Chip("H100", ("NVIDIA H100",), 989e12, 80 * 10 ** 9, 3.35e12),
    # H200 data sheet: 989 TFLOP/s, 141 GB HBM3e, 4.8 TB/s.
    Chip("H200", ("NVIDIA H200",), 989e12, 141 * 10 ** 9, 4.8e12),
    # A100 data sheet: 312 TFLOP/s; 40 GB HBM2 at 1,555 GB/s, 80 GB HBM2e at 2,039 GB/s.
    Chip("A100", ("NVIDIA A100",), 312e12, 40 * 10 ** 9, 1.555e12),
    Chip("A100-80GB", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB"), 312e12, 80 * 10 ** 9,
         2.039e12),
    # CPUs: no data-sheet peak (benchmarks/distill_step.py measures a matmul instead).
    Chip("cpu", ("cpu",), None, None, None),
)

CHIPS: tuple[Chip, ...] = tuple(TPU_GENERATIONS.values()) + OTHER_CHIPS


def chip_for_device_kind(device_kind: str) -> Chip | None:
  """The table's chip for a `jax.Device.device_kind`, or None when unknown.

  TPU kinds match exactly; GPU kinds by their longest known prefix.
  """
  for chip in CHIPS:
    if device_kind in chip.device_kinds:
      return chip
  prefixes = [(kind, chip) for chip in OTHER_CHIPS for kind in chip.device_kinds
              if kind.startswith("NVIDIA") and device_kind.startswith(kind)]
  return max(prefixes, key=lambda item: len(item[0]))[1] if prefixes else None


def peak_flops_by_device_kind() -> dict[str, float]:
  """{device_kind: dense bf16 FLOP/s} of every kind in the table with a peak."""
  return {kind: chip.peak_flops for chip in CHIPS if chip.peak_flops
          for kind in chip.device_kinds}
