"""Multi-host start-up decisions, device peak FLOP/s, host rows of a global batch."""

import jax
import pytest

from miniend_jax.train import partitioning, steps


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"MINIEND_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, None),
    ({"MINIEND_DISTRIBUTED": "1"}, "forced by MINIEND_DISTRIBUTED"),
    ({"SLURM_NTASKS": "4"}, "Slurm"),
    ({"SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
])
def test_cluster_detection(monkeypatch, env, expected):
  for name in ("MINIEND_DISTRIBUTED", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert partitioning.detect_cluster() == expected  # this machine has no TPU chips


def test_no_cluster_no_distributed_runtime(monkeypatch):
  for name in partitioning.DISTRIBUTED_ENV + ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert not partitioning.maybe_initialize_distributed()
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kind, flops", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("cpu", None), ("TPU v7x", None)])
def test_peak_flops_by_device_kind(kind, flops):
  assert steps.device_peak_flops(kind) == flops


@pytest.mark.parametrize("mesh_config, rows", [
    (partitioning.MeshConfig(data=8), [(0, 16)]),
    (partitioning.MeshConfig(data=2, fsdp=2, model=2), [(0, 16)]),
    (partitioning.MeshConfig(data=1, model=8), [(0, 16)]),
])
def test_one_host_holds_every_row(mesh_config, rows):
  mesh = partitioning.make_mesh(mesh_config)
  assert partitioning.host_batch_rows(mesh, 16) == rows
  assert partitioning.rows_by_process(mesh, 16) == {0: rows}
