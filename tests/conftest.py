"""Test-wide settings: 8 fake CPU devices so meshes are real, quiet TensorFlow,
fast compiles (tests/xla_testing.py), one persistent XLA compilation cache for the
whole session, slow tests first."""

import os
import shutil
import tempfile

from tests import xla_testing

# Must be set before jax initialises its backend.
os.environ["XLA_FLAGS"] = xla_testing.with_fast_compile(
    os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tests compile the same tiny programs again and again, in this process,
# in the xdist workers (which inherit this environment) and in every `miniend`
# subprocess they start: one cache for all of them turns a ~7 s compile of a
# repeated train step into a read. The session's first process makes it and
# removes it at the end; tests that are about the cache set their own.
_CACHE_OWNER = "MINIEND_TEST_COMPILATION_CACHE_OWNER"
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="miniend-jax-test-cache-")
  os.environ[_CACHE_OWNER] = str(os.getpid())
# Every program, not only those compiling for over a second (the default): a `miniend`
# subprocess or a relaunched host compiles dozens of sub-second ones (initialisers,
# eval steps, shardings) that other processes compiled already (test_loop +
# test_cli_errors: 4% less CPU; the cache stays a few MB).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from miniend_jax.train import host_memory  # noqa: E402

# As `loop.train` does: the in-process step tests reuse freed host memory too.
host_memory.keep_freed_memory()

# Files by their time on an idle 2-core machine (`pytest --durations`), slowest
# first. `make test` hands whole files to the two xdist workers in this order
# (--dist loadfile --no-loadscope-reorder), so a slow file never becomes the
# tail one worker runs alone while the other idles, and module fixtures are
# built once.
_SLOW_FIRST = (
    "tests/train/test_multihost.py",
    "tests/train/test_cli.py",
    "tests/train/test_corpus_cli.py",
    "tests/train/test_loop.py",
    "tests/train/test_steps.py",
    "tests/quickstart/test_quickstart.py",
    "tests/quickstart/test_notebook.py",
    "tests/quickstart/test_sweep.py",
    "tests/test_device_check.py",
    "tests/model/test_t5_scan.py",
    "tests/model/test_model_misc.py",
    "tests/distill/test_distill_recipe.py",
    "tests/train/test_plan.py",
    "tests/train/test_cli_errors.py",
    "tests/test_packaging.py",
    "tests/train/test_teacher_loading.py",
    "tests/train/test_state.py",
    "tests/train/test_gcs_paths.py",
    "tests/train/test_decoding.py",
    "tests/model/test_t5_parity.py",
)


def pytest_collection_modifyitems(items):
  rank = {path: index for index, path in enumerate(_SLOW_FIRST)}
  def order(item):
    path = os.path.relpath(str(item.path), str(item.config.rootpath))
    return rank.get(path, len(rank))
  items.sort(key=order)  # stable: file order and test order otherwise unchanged


def pytest_unconfigure(config):
  del config
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _clear_gin():
  """Gin bindings are process-global; no test sees another's."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  yield
  gin.clear_config()
