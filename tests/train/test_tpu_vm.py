"""A Cloud TPU VM is recognised without JAX's private modules, and a run there never
trains on the CPU by accident (a TPU held by another process makes JAX fall back to it)."""

import os

import gin
import jax
import pytest

from miniend_jax import cli
from miniend_jax.train import accelerators


def write_pci(sysfs, devices):
  for i, (vendor, device) in enumerate(devices):
    d = sysfs / "bus" / "pci" / "devices" / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_tpu_chips_are_read_from_the_pci_bus(tmp_path, monkeypatch):
  monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
  monkeypatch.delenv(accelerators.SET_FOR_COMPILING, raising=False)  # a plan test's, earlier
  gvnic, nvidia = ("0x1ae0", "0x0042"), ("0x10de", "0x2330")
  write_pci(tmp_path / "v4", 4 * [("0x1ae0", "0x005e")] + [gvnic])
  write_pci(tmp_path / "gce", [gvnic])  # Google's vendor id on every Compute Engine VM
  write_pci(tmp_path / "gpu", [gvnic, nvidia])
  assert accelerators.tpu_chips(str(tmp_path / "v4")) == 4
  assert accelerators.tpu_vm_evidence(str(tmp_path / "v4")) == "4 TPU chips on its PCI bus"
  assert accelerators.tpu_chips(str(tmp_path / "gce")) == 0
  assert accelerators.tpu_vm_evidence(str(tmp_path / "gce")) is None
  assert accelerators.has_accelerator(str(tmp_path / "gpu"))
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")  # set by the TPU runtime
  assert accelerators.tpu_vm_evidence(str(tmp_path / "gce")) == "TPU_ACCELERATOR_TYPE=v5litepod-8"



def test_the_planners_variables_are_no_evidence(tmp_path, monkeypatch):
  """Planning for a TPU sets TPU_ACCELERATOR_TYPE in this process for libtpu; a run
  later in the same process (a test worker, a notebook) is still not on a TPU VM."""
  from miniend_jax.train import plan  # pylint: disable=import-outside-toplevel
  for key in [*plan._LIBTPU_QUIET_ENV, accelerators.SET_FOR_COMPILING]:  # pylint: disable=protected-access
    monkeypatch.setenv(key, "")  # so that the undo removes what quiet_libtpu sets
    monkeypatch.delenv(key)
  plan.quiet_libtpu()
  assert os.environ["TPU_ACCELERATOR_TYPE"]
  assert accelerators.tpu_vm_evidence(str(tmp_path)) is None
  # A variable the runtime set before the planner ran is still evidence.
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v6e-8")
  monkeypatch.delenv(accelerators.SET_FOR_COMPILING)
  plan.quiet_libtpu()
  assert accelerators.tpu_vm_evidence(str(tmp_path)) == "TPU_ACCELERATOR_TYPE=v6e-8"


@pytest.fixture
def on_a_tpu_vm_without_its_tpu(monkeypatch):
  """This machine as a TPU VM (by the runtime's variable) whose TPU JAX could not start
  (it has none), with JAX_PLATFORMS unset as on a fresh TPU VM."""
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v4-8")
  monkeypatch.delenv(accelerators.SET_FOR_COMPILING, raising=False)  # a plan test's, earlier
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("MINIEND_DISTRIBUTED", "0")
  asked = jax.config.jax_platforms
  jax.config.update("jax_platforms", None)
  yield
  jax.config.update("jax_platforms", asked)


def test_a_run_refuses_the_cpu_of_a_tpu_vm(tmp_path, capfd, on_a_tpu_vm_without_its_tpu):
  argv = ["convert", "--teacher", str(tmp_path / "teacher"), "--out_dir", str(tmp_path / "out")]
  capfd.readouterr()
  assert cli.main(argv) == 3
  assert "JAX_PLATFORMS" not in os.environ  # the command line did not pick the CPU for it
  err = capfd.readouterr().err
  (line,) = [ln for ln in err.splitlines() if ln.startswith("miniend: ")]
  assert "Traceback" not in err
  assert line.startswith("miniend: This machine is a Cloud TPU VM (TPU_ACCELERATOR_TYPE=v4-8) "
                         "but JAX cannot use its TPU (")
  assert "remove /tmp/libtpu_lockfile" in line and "set JAX_PLATFORMS=cpu" in line
  assert not (tmp_path / "out").exists()
  # Asking for the CPU on purpose is respected: the command goes on (to its own error).
  gin.clear_config()
  jax.config.update("jax_platforms", "cpu")
  assert cli.main(argv) == 3
  (line,) = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("miniend: ")]
  assert "Cloud TPU VM" not in line
