"""Shared pieces of the quickstart / sweep / notebook tests.

TINY is the setting the tests (and the notebook's test mode) run: the smallest
teacher and student, two paths, one seed, a few steps, short sequences (they
check the mechanics, not the results). All of them share one persistent XLA
compilation cache per test session, so a program compiled by one test (or by
the notebook's kernel) is read from disk by the next.
"""

import os

import pytest

TINY = dict(size="cpu", teacher_preset="t5-v1_1-tiny", student_shape="1L-32H",
            paths=("scratch", "miniend_d"), seeds=1, teacher_steps=4, steps=4,
            finetune_steps=2, batch_size=8, inputs_length=32, targets_length=8,
            eval_examples=8)


@pytest.fixture(scope="session")
def _session_cache_path(tmp_path_factory) -> str:
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own base temp directory; their parent is per session.
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  path = os.path.join(str(root), "miniend_jax_cache")
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture
def compilation_cache_dir(_session_cache_path):
  """A persistent compilation cache shared by the session's tests, on for one test only."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  from miniend_jax import quickstart  # pylint: disable=import-outside-toplevel
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  enabled = quickstart.enable_compilation_cache(_session_cache_path)
  yield _session_cache_path
  if enabled:  # leave the other tests of this process as they were
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    compilation_cache.reset_cache()


def assert_real_png(path: str, min_width: int = 500, min_height: int = 250) -> None:
  """`path` is a PNG that opens, is big enough and is not a blank canvas."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  assert os.path.getsize(path) > 10_000, f"{path} is suspiciously small"
  with Image.open(path) as image:
    assert image.format == "PNG"
    width, height = image.size
    assert width >= min_width and height >= min_height, (path, image.size)
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.std() > 10, f"{path} looks blank"
  colors = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
  assert len(colors) > 20, f"{path} has only {len(colors)} colours"
