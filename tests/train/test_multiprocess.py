"""Two local processes with 4 CPU devices each equal one process with 8 devices."""

import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, num_processes):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.train.multiprocess_worker", "--out", str(out),
       "--num_processes", str(num_processes), "--process_id", str(i), "--port", str(port)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  for p in procs:
    out_text, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out_text[-4000:]


def test_two_processes_equal_one(tmp_path):
  _launch(tmp_path / "one.npz", 1)
  _launch(tmp_path / "two.npz", 2)
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert sorted(one.files) == sorted(two.files) and len(one.files) > 10
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-5)
  assert one["losses"][-1] != one["losses"][0]
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
