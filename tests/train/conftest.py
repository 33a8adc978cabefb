"""Fixtures shared by the run tests of tests/train."""

import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The session's pydoc corpus and vocabulary, its tasks registered again for each
  module (other modules may register the same names with their own vocabulary)."""
  # Imported here: the lean tests of this folder (the Python 3.12 leg) have no TensorFlow.
  from tests.train import loop_testing  # pylint: disable=import-outside-toplevel
  return loop_testing.shared_data_dir(tmp_path_factory)
