"""The model, the losses, the step and the benchmarks run without the data stack.

GPU machines (and anyone benchmarking) may have JAX, Flax, optax and orbax but
no TensorFlow, seqio or clu. In a process where those cannot be imported, the
core modules import and `benchmarks/distill_step.py` runs a tiny step.
"""

import os
import subprocess
import sys

from tests.xla_testing import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROGRAM = r"""
import importlib.abc, runpy, sys

BLOCKED = ("tensorflow", "seqio", "tensorflow_text", "tensorflow_datasets", "clu")


class Blocked(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, Blocked())
import miniend_jax.model.config, miniend_jax.model.t5, miniend_jax.model.hf  # noqa
import miniend_jax.model.presets, miniend_jax.model.student  # noqa
import miniend_jax.distill.losses, miniend_jax.distill.recipe  # noqa
import miniend_jax.train.steps, miniend_jax.train.state, miniend_jax.train.partitioning  # noqa
import miniend_jax.train.decoding, miniend_jax.train.program  # noqa
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.argv = ["distill_step.py", "--teacher", "t5-v1_1-tiny", "--student", "1L-32H",
            "--batch", "2", "--inputs", "16", "--targets", "8", "--steps", "1", "--impl", "jax"]
runpy.run_path("benchmarks/distill_step.py", run_name="__main__")
"""


def test_core_and_benchmark_run_without_tensorflow_seqio_or_clu():
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _PROGRAM], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '"impl": "jax"' in proc.stdout and '"step_s"' in proc.stdout, proc.stdout[-2000:]
