"""The `fake` fixture: a stand-in gcloud, a private HOME, played workers (stand_in.Fake)."""

import pytest

from tests.tpu.stand_in import Fake


@pytest.fixture
def fake(tmp_path):
  fake = Fake(tmp_path)
  yield fake
  assert fake.stop_workers() == [], "processes outlived the played runs on the workers"
