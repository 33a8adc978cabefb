"""Profiling: a pod's trace comes from process 0 alone."""

import jax
import jax.numpy as jnp

from miniend_jax.train import profiling


def test_only_process_zero_traces(tmp_path):
  double = jax.jit(lambda x: x * 2)
  for process in (1, 0):
    profiler = profiling.Profiler((2, 3), str(tmp_path / f"process{process}"),
                                  process_index=process)
    for step in range(5):
      profiler.before(step)
      out = double(jnp.ones(4))
      profiler.after(step, out)
    profiler.close()
  assert not (tmp_path / "process1").exists()
  assert len(list((tmp_path / "process0").rglob("*.xplane.pb"))) == 1  # steps 2-3: one trace
