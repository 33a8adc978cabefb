"""Shared fixtures of the data tests: the pydoc corpus and its vocabulary.

Harvesting and training the vocabulary take a few seconds, so they happen
once per test session in a temporary directory. The tasks are re-registered
before every test, since other test packages may register the same names
with their own vocabulary or directory.
"""

import pytest
import seqio

from miniend_jax.data import local_corpus
from miniend_jax.data import tasks


@pytest.fixture(scope="session")
def _pydoc_cache(tmp_path_factory):
  work_dir = tmp_path_factory.mktemp("pydoc_work")
  return local_corpus.setup_pydoc_tasks(str(work_dir))


@pytest.fixture(scope="session")
def pydoc_vocab(_pydoc_cache):
  """The SentencePiece vocabulary trained on the harvested corpus."""
  return _pydoc_cache[0]


@pytest.fixture(scope="session")
def pydoc_data_dir(_pydoc_cache):
  """The directory harvest_pydoc_corpus wrote."""
  return _pydoc_cache[1]


@pytest.fixture(autouse=True)
def pydoc_setup(pydoc_vocab, pydoc_data_dir):
  """(vocabulary, data_dir), with the pydoc tasks registered for them."""
  local_corpus.register_pydoc_tasks(pydoc_vocab, pydoc_data_dir)
  return pydoc_vocab, pydoc_data_dir


@pytest.fixture
def fresh_tfds_builders():
  """Forgets TFDS builders seqio memoised, e.g. ones built under a mock."""
  memo = seqio.utils.LazyTfdsLoader._MEMOIZED_BUILDERS  # pylint: disable=protected-access
  memo.clear()
  yield
  memo.clear()


@pytest.fixture
def tfds_tasks(pydoc_vocab, fresh_tfds_builders):
  """TFDS tasks registered with the (offline) pydoc vocabulary."""
  del fresh_tfds_builders
  tasks.register_tfds_tasks(pydoc_vocab)
  yield pydoc_vocab
  tasks.register_tfds_tasks()
