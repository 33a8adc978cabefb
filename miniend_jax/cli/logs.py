"""Quiet logs: our INFO lines and the library warnings that matter, unless --verbose.

TensorFlow, XLA, libtpu and orbax print start-up chatter, from Python loggers
and from C++ straight to the process's stderr; `configure_logging` filters the
former and `load_libraries_quietly` imports the libraries under a filter of the
latter. On a machine without an accelerator JAX is kept to the CPU (its probing
of TPU and GPU plugins is slow and noisy there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

# Library lines that say nothing a user can act on (shown with --verbose).
_NOISE = re.compile("|".join((
    r"Given directory is read only", r"Metadata file does not exist",
    r"CheckpointManagerOptions\.read_only=True", r"Consider passing None for sequence_length",
    r"\[process=\d+\]", r"Finished asynchronous save", r"Skipping merge of OCDBT",
    r"Resetting cache at", r"Unable to initialize backend",
)))


# What TensorFlow, XLA and libtpu print from C++ before any logging is set up.
_NATIVE_NOISE = re.compile("|".join((
    r"All log messages before absl::InitializeLog", r"oneDNN custom operations",
    r"Could not find cuda drivers", r"failed call to cuInit", r"cpu_feature_guard",
    r"This TensorFlow binary is optimized", r"TF-TRT Warning", r"Unable to register cu",
    r"computation placer already registered", r"could not determine TPU",
    r"Failed to find host bounds", r"Logging before InitGoogle", r"unexpected worker hostname",
    r"Source Location Trace", r"libtpu_init_utils", r"^\s*$",
)))


@contextlib.contextmanager
def _native_stderr_filtered():
  """Runs the body with the process's stderr (fd 2, where C++ libraries write) going
  to a temporary file, then passes on the lines that are not known noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        if not _NATIVE_NOISE.search(line):
          print(line, file=sys.stderr)


def load_libraries_quietly(command: str | None) -> None:
  """Imports TensorFlow and starts JAX's backend under the stderr filter, so their
  start-up chatter stays out of the way (--verbose shows it)."""
  if command in (None, "models", "plan"):
    return
  with _native_stderr_filtered():
    import miniend_jax.data  # pylint: disable=import-outside-toplevel,unused-import  (TensorFlow)
    if not os.environ.get("JAX_COORDINATOR_ADDRESS") and not _has_accelerator():
      import jax  # pylint: disable=import-outside-toplevel
      jax.devices()  # a multi-process job must start its runtime first: not here


class _DropNoise(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not _NOISE.search(record.getMessage())


def configure_logging(verbose: bool) -> None:
  """Our INFO lines; libraries' warnings that matter; everything with --verbose."""
  if not verbose:
    # Before TensorFlow or JAX load: TF's C++ start-up lines (oneDNN, CUDA probing)
    # and, on a machine with no accelerator, the probing of TPU/GPU plugins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _choose_jax_platforms()
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(message)s", force=True)
  if not verbose:
    for name in ("absl", "jax", "orbax", "tensorflow", "seqio", "etils"):
      logger = logging.getLogger(name)
      logger.setLevel(logging.WARNING)
      logger.addFilter(_DropNoise())
    logging.getLogger().handlers[0].addFilter(_DropNoise())


def _has_accelerator() -> bool:
  """Whether this machine has TPU chips (or is a Cloud TPU VM by its runtime's
  variables) or NVIDIA GPUs, read without importing JAX."""
  from miniend_jax.train import accelerators  # pylint: disable=import-outside-toplevel
  return accelerators.has_accelerator()


def _choose_jax_platforms() -> None:
  """JAX_PLATFORMS=cpu on machines with no accelerator (JAX's probing of TPU and GPU
  plugins is slow and noisy there). Never on a Cloud TPU VM: there a TPU that JAX cannot
  use (held by another process) is an error, not a run on the CPU
  (`partitioning.require_tpu_on_tpu_vm`)."""
  if "JAX_PLATFORMS" not in os.environ and not _has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"
