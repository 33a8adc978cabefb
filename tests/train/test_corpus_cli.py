"""`miniend pretrain --train_files` on json.gz files, as users have C4: a SIGKILL
mid-file resumes at exactly the next example (on another host count too), and
a corrupt record stops the run with one line, exit 3, the last checkpoint kept.

Four launches in all (one of them 2 processes): an uninterrupted reference, a
run killed mid-file, its resume on 2 processes, and a run over a corrupt file.
"""

import gzip
import json
import os
import signal
import time

import pytest

from miniend_jax.train import checkpoints, writers
from tests.train import loop_testing, multihost_testing as mh

STEPS = 24


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return loop_testing.shared_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """4 train files (2 logical shards: 2 files each) and 1 validation file, as allenai/c4
  names them; ~1500 documents a file, so that a run's position is mid-file."""
  root = tmp_path_factory.mktemp("c4") / "en"
  root.mkdir()
  for split, files in (("train", 4), ("validation", 1)):
    for k in range(files):
      lines = [json.dumps({"text": f"Document {k}-{i} of {split}: the quick brown fox "
                                   f"{'jumps over ' * (i % 5 + 1)}the lazy dog {i % 13}.",
                           "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"})
               for i in range(1500)]
      (root / f"c4-{split}.{k:05d}-of-{files:05d}.json.gz").write_bytes(
          gzip.compress(("\n".join(lines) + "\n").encode()))
  return str(root)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("compilation_cache"))


def _pretrain(workdir, data_dir, train_files, validation_files, num_steps=STEPS):
  vocabulary = os.path.join(data_dir, "pydoc", "vocab_3000", "spiece.model")
  return ["pretrain", "--workdir", workdir, "--preset", "t5-v1_1-tiny",
          "--train_files", train_files, "--validation_files", validation_files,
          "--vocabulary", vocabulary, "--num_steps", str(num_steps), *mh.TINY_FLAGS,
          "--gin.TrainConfig.data_shards=2", "--gin.TrainConfig.eval_batches=1",
          "--gin.CheckpointConfig.save_interval_steps=2"]


def _losses(workdir):
  rows = writers.read_jsonl(os.path.join(workdir, "logs", "train_metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_mid_file_resumes_exactly_also_on_two_processes(tmp_path, corpus, data_dir,
                                                                 cache_dir):
  train, validation = f"{corpus}/c4-train.*.json.gz", f"{corpus}/c4-validation.*.json.gz"
  kwargs = dict(data_dir=data_dir, cache_dir=cache_dir)
  reference = str(tmp_path / "reference")
  mh.run(1, _pretrain(reference, data_dir, train, validation), **kwargs)

  killed = str(tmp_path / "killed")
  procs = mh.launch(1, _pretrain(killed, data_dir, train, validation, num_steps=10000), **kwargs)
  deadline = time.time() + 300
  while checkpoints.latest_step(os.path.join(killed, "checkpoints")) is None:
    assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()[0][-3000:]
    time.sleep(0.05)
  procs[0].send_signal(signal.SIGKILL)
  procs[0].wait()
  saved = checkpoints.latest_step(os.path.join(killed, "checkpoints"))
  assert 0 < saved < STEPS
  outputs = mh.run(2, _pretrain(killed, data_dir, train, validation), **kwargs)
  assert all(f"Resumed from step {saved}" in out for out in outputs)
  # The same examples after the resume: the same losses and weights (up to the
  # round-off of 2 processes against 1; other examples would move them by ~lr).
  expected, got = _losses(reference), _losses(killed)
  assert got.keys() == expected.keys() and max(got) == STEPS
  for step in got:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  mh.assert_params_close(mh.final_params(reference), mh.final_params(killed))


def test_a_corrupt_record_stops_with_one_line_and_exit_3(tmp_path, corpus, data_dir, cache_dir):
  bad = tmp_path / "bad"
  bad.mkdir()
  for k in range(2):
    with gzip.open(f"{corpus}/c4-train.{k:05d}-of-00004.json.gz", "rt") as f:
      lines = f.read().splitlines()
    if k == 1:  # past the start-up check (first records) and the first checkpoints
      lines[1399] = '{"text": "cut off'
    (bad / f"part-{k}.json.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
  workdir = str(tmp_path / "run")
  procs = mh.launch(1, _pretrain(workdir, data_dir, str(bad / "*.json.gz"),
                                 f"{corpus}/c4-validation.*.json.gz", num_steps=10000),
                    data_dir=data_dir, cache_dir=cache_dir)
  out = procs[0].communicate(timeout=600)[0]
  assert procs[0].returncode == 3, out[-3000:]
  errors = [line for line in out.splitlines() if line.startswith("miniend: ")]
  assert len(errors) == 1 and f"{bad}/part-1.json.gz:1400: is not valid JSON" in errors[0], out
  # Nothing after the last good checkpoint: the steps saved all restore.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  latest = checkpoints.latest_step(ckpt_dir)
  assert latest is not None
  assert checkpoints.load_params_from_checkpoint(ckpt_dir)
