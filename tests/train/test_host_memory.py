"""keep_freed_memory: freed blocks are reused, not faulted in again from the kernel
(the tests run on Linux with glibc, where it must take effect)."""

import os
import subprocess
import sys
import textwrap

import pytest

from miniend_jax.train import host_memory

pytestmark = pytest.mark.lean

_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    if sys.argv[1] == "keep":
        from miniend_jax.train import host_memory
        assert host_memory.keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    counts = []
    for _ in range(4):  # 64 MB in 1 MB buffers made and freed, as XLA's CPU runtime does per step
        before = faults()
        blocks = [np.ones(128 << 10) for _ in range(64)]
        del blocks
        counts.append(faults() - before)
    print(min(counts[1:]))
    """)


def _faults_of_a_repeated_buffer(mode: str) -> int:
  # No MALLOC_* variables (they would switch keep_freed_memory off); the repository on
  # the path, as the lean leg runs it uninstalled.
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True, capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": repo})
  return int(out.stdout.split()[-1])


def test_freed_buffers_are_reused_without_page_faults():
  default, kept = _faults_of_a_repeated_buffer("default"), _faults_of_a_repeated_buffer("keep")
  assert default > 10_000, default  # 64 MB in 4 KB pages, given back and faulted in again
  assert kept < default / 20, (kept, default)
  assert host_memory.keep_freed_memory()  # idempotent
