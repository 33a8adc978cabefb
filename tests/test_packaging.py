"""The package outside its clone: a wheel, installed in a fresh virtual environment.

The wheel must carry the gin files (`--gin_file gin_configs/...` and their own
`include` lines resolve from any directory) and a working `miniend` command.
The new environment borrows the test environment's dependencies through a
.pth line (installing TensorFlow and JAX again would take minutes), which adds
their directory to sys.path without running its .pth files, so this clone's
editable install stays out of it: `miniend_jax` comes from the wheel.
"""

import os
import subprocess
import sys
import sysconfig

from tests.train import loop_testing, multihost_testing
from tests.xla_testing import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command, **kwargs):
  proc = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
  assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-3000:])
  return proc


def test_a_wheel_installed_elsewhere_runs_a_distillation_with_shipped_gin_files(
    tmp_path, tmp_path_factory):
  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(wheels), ROOT])
  (wheel,) = [str(p) for p in wheels.glob("miniend_jax-*.whl")]

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # Outside the clone and without PYTHONPATH, which may name one (a worktree run): its
  # egg-info would pass for an installed copy and its package would hide the wheel's.
  outside = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  venv = tmp_path / "venv"
  # No pip of its own (ensurepip takes seconds): this environment's pip installs into it.
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  python = str(venv / "bin" / "python")
  site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
              ).stdout.strip()
  with open(os.path.join(site, "test_dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "-q", wheel], cwd=elsewhere, env=outside)

  where = _run([python, "-c", "import miniend_jax; print(miniend_jax.__file__)"],
               cwd=elsewhere, env=outside).stdout.strip()
  assert where.startswith(site), where  # the wheel's copy, not this clone

  data_dir = loop_testing.shared_data_dir(tmp_path_factory)
  teacher = str(tmp_path / "teacher")
  multihost_testing.write_tiny_teacher(teacher, data_dir)
  env = dict(outside, XLA_FLAGS=xla_flags(1))
  proc = _run([str(venv / "bin" / "miniend"), "distill",
               "--gin_file", "gin_configs/runs/quickstart_distill.gin",
               "--teacher", teacher, "--student_shape", "1L-32H", "--workdir", "run",
               "--num_steps", "2", f"--data_dir={data_dir}", "--no_progress",
               "--gin.TrainConfig.batch_size=4", "--gin.TrainConfig.inputs_length=32",
               "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.eval_batches=1",
               "--gin.OptimizerConfig.warmup_steps=1"],
              cwd=elsewhere, env=env)
  assert '"step": 2' in proc.stdout
  config = (elsewhere / "run" / "distill_config.gin").read_text()
  assert "TrainConfig.inputs_length = 32" in config and "Recipe" in config
