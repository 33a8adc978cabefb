"""Runs the real `miniend` command as several JAX processes over loopback.

Each process gets 8 / N fake CPU devices and the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID variables a cluster would set, so the run
goes through the same start-up, data sharding, collectives and checkpointing
as a pod; N = 1 is the single-host reference (8 devices, no distributed
runtime).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from miniend_jax.data import vocab as vocab_lib
from miniend_jax.model import hf, presets, t5
from miniend_jax.train import loop
from tests.xla_testing import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny, fast settings; constant learning rate so a run's length does not change
# its schedule (a stopped run is resumed with another --num_steps). Gradients
# summed over processes (gloo) and within one differ by float round-off, which
# Adam's default eps turns into updates of up to ~lr where a gradient is ~0;
# eps=1e-3 keeps such updates as small as the round-off.
TINY_FLAGS = ["--no_progress", "--gin.TrainConfig.inputs_length=32",
              "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.batch_size=8",
              "--gin.TrainConfig.log_every=2", "--gin.OptimizerConfig.learning_rate=3e-3",
              "--gin.OptimizerConfig.warmup_steps=0", "--gin.OptimizerConfig.eps=1e-3"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, command: list[str], *, data_dir: str | None,
           cache_dir: str | None = None, python: list[str] | None = None
           ) -> list[subprocess.Popen]:
  """Starts `python -m miniend_jax COMMAND...` as `num_processes` processes.

  `cache_dir`: a persistent compilation cache the runs share (the programs of
  runs with the same process count are the same); None keeps the one the
  environment names (tests/conftest.py's session cache, so programs other
  tests compiled are reused). `python`: other
  interpreter arguments instead of `-m miniend_jax` (e.g. ["-c", code]); the
  process index is then argv[1].
  """
  port = free_port()
  procs = []
  for index in range(num_processes):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8 // num_processes),
               TF_CPP_MIN_LOG_LEVEL="2")
    if cache_dir:
      env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
      env.pop(name, None)
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(index))
    argv = ([*python, str(index), *command] if python else
            ["-m", "miniend_jax", *command, f"--gin.TrainConfig.data_dir='{data_dir}'"])
    procs.append(subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Waits for every process; asserts each exited 0; returns their outputs."""
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for index, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {index} exited {p.returncode}:\n{out[-4000:]}"
  return outputs


def run(num_processes: int, command: list[str], **kwargs) -> list[str]:
  return wait(launch(num_processes, command, **kwargs))


def signal_when_logged(procs: list[subprocess.Popen], text: str, target: int = -1,
                       signum: int = signal.SIGTERM, timeout: float = 300) -> str:
  """Sends `signum` to `procs[target]` as soon as its output has a line holding `text`;
  returns the output read so far (`wait` returns the rest)."""
  proc, lines = procs[target], []
  deadline = time.time() + timeout
  while not lines or text not in lines[-1]:
    line = proc.stdout.readline()
    assert line, f"exited ({proc.wait()}) before logging {text!r}:\n{''.join(lines)[-4000:]}"
    assert time.time() < deadline, f"never logged {text!r}"
    lines.append(line)
  proc.send_signal(signum)
  return "".join(lines)


def kill_all(procs: list[subprocess.Popen]) -> None:
  """Ends the processes still running (a test that failed mid-way leaves none behind)."""
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.communicate()


def write_tiny_teacher(directory: str, data_dir: str, **overrides) -> t5.T5Config:
  """A random t5-v1_1-tiny-shaped Hugging Face checkpoint with the pydoc vocabulary."""
  _, vocabulary = loop.task_vocabulary("pydoc_span_corruption", data_dir)
  config = presets.get_model_config(
      "t5-v1_1-tiny", vocab_size=vocab_lib.padded_vocab_size(vocabulary), **overrides)
  hf.save_hf(config, t5.init_params(config, jax.random.key(7)), directory)
  return config


def assert_params_close(a, b, rtol=1e-4, atol=1e-5) -> None:
  """Equal up to float round-off (other examples would move weights by ~lr per step)."""
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert flat_a.keys() == flat_b.keys() and flat_a
  for key in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[key]), np.asarray(flat_a[key]), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(key))
