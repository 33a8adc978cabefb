"""Which accelerators this machine has, read from the machine itself, without JAX.

The command line asks before JAX starts (JAX reads JAX_PLATFORMS when it is imported),
and a run asks whether it is on a Cloud TPU VM so that it never trains on the CPU of one
by accident (`partitioning.require_tpu_on_tpu_vm`). JAX has the same facts in a private
module (`jax._src.hardware_utils`); a private module can move or break without notice,
so they are read here from sysfs, which is public and stable.
"""

from __future__ import annotations

import glob
import os

GOOGLE_PCI_VENDOR = "0x1ae0"
NVIDIA_PCI_VENDOR = "0x10de"
# PCI device ids of Google's TPU chips (Google's vendor id also covers gVNIC network
# cards, on every Compute Engine VM: the device id tells them apart).
TPU_PCI_DEVICES = {"0x0027": "v2/v3", "0x0056": "(no public name)", "0x005e": "v4", "0x0062": "v5p",
                   "0x0063": "v5e", "0x006f": "v6e", "0x0076": "v7"}


def pci_devices(sysfs: str = "/sys") -> list[tuple[str, str]]:
  """(vendor id, device id) of every PCI device, e.g. ("0x1ae0", "0x005e"); [] without sysfs."""
  found = []
  for vendor_file in sorted(glob.glob(os.path.join(sysfs, "bus/pci/devices/*/vendor"))):
    try:
      with open(vendor_file) as f:
        vendor = f.read().strip()
      with open(os.path.join(os.path.dirname(vendor_file), "device")) as f:
        device = f.read().strip()
    except OSError:  # a device removed while listing
      continue
    found.append((vendor, device))
  return found


def tpu_chips(sysfs: str = "/sys") -> int:
  """How many TPU chips sit on this machine's PCI bus."""
  return sum(vendor == GOOGLE_PCI_VENDOR and device in TPU_PCI_DEVICES
             for vendor, device in pci_devices(sysfs))


# The TPU VM variables the planner set for compiling on a host without chips, as
# comma-separated NAME=VALUE pairs kept in the environment (so that child processes
# know too): while a variable still has that value it is no evidence of a TPU VM.
SET_FOR_COMPILING = "MINIEND_TPU_VARIABLES_SET_FOR_COMPILING"


def tpu_vm_evidence(sysfs: str = "/sys") -> str | None:
  """What says this machine is a Cloud TPU VM (its TPU chips, or the TPU runtime's
  TPU_ACCELERATOR_TYPE variable, unless the planner set it), in words; None on other
  machines."""
  chips = tpu_chips(sysfs)
  if chips:
    return f"{chips} TPU chip{'s' if chips > 1 else ''} on its PCI bus"
  accelerator_type = os.environ.get("TPU_ACCELERATOR_TYPE")
  set_for_compiling = os.environ.get(SET_FOR_COMPILING, "").split(",")
  if accelerator_type and f"TPU_ACCELERATOR_TYPE={accelerator_type}" not in set_for_compiling:
    return f"TPU_ACCELERATOR_TYPE={os.environ['TPU_ACCELERATOR_TYPE']}"
  return None


def has_accelerator(sysfs: str = "/sys") -> bool:
  """Whether this machine has TPU chips (or is a TPU VM by its runtime's variables) or
  NVIDIA GPUs: JAX then probes for them; elsewhere the CPU is all there is."""
  if tpu_vm_evidence(sysfs) or glob.glob("/dev/accel*") or glob.glob("/dev/nvidia[0-9]*"):
    return True
  return any(vendor == NVIDIA_PCI_VENDOR for vendor, _ in pci_devices(sysfs))
