"""`miniend pretrain --train_files` on json.gz files, as users have C4: a SIGKILL
mid-file resumes at exactly the next example (on another host count too), and
a corrupt record stops the run with one line, exit 3, the last checkpoint kept.

Cheap by construction (each `miniend` process costs ~10 s of imports and
tf.data tracing): tiny files of short documents read 8 records at a time
through a 16-example shuffle buffer, so a few steps already cross chunk and
file boundaries; only the killed run is real processes (2, killed together);
the uninterrupted reference, the resume and the corrupt-record run are
`cli.main` in this process. All share the session's persistent compilation cache.
"""

import gzip
import json
import os
import signal
import time

import pytest

from miniend_jax import cli
from miniend_jax.train import checkpoints, writers
from tests.train import loop_testing, multihost_testing as mh

STEPS = 8
DOCUMENTS_PER_FILE = 40  # 5 chunks of 8: positions are mid-file, and runs change files


def _write_json_gz(path, lines):
  path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _documents(split, k):
  """Short documents: span corruption concatenates 128 at a time, so a few steps
  read several such batches, i.e. many chunks (and files) after a resume."""
  return [json.dumps({"text": f"{split} {k}.{i}: {'fox ' * (i % 3 + 1)}",
                      "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"})
          for i in range(DOCUMENTS_PER_FILE)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """4 train files (2 logical shards: 2 files each) and 1 validation file, as allenai/c4
  names them."""
  root = tmp_path_factory.mktemp("c4") / "en"
  root.mkdir()
  for split, files in (("train", 4), ("validation", 1)):
    for k in range(files):
      _write_json_gz(root / f"c4-{split}.{k:05d}-of-{files:05d}.json.gz", _documents(split, k))
  return str(root)


def _pretrain(workdir, data_dir, train_files, validation_files, num_steps=STEPS):
  vocabulary = os.path.join(data_dir, "pydoc", "vocab_3000", "spiece.model")
  return ["pretrain", "--workdir", workdir, "--preset", "t5-v1_1-tiny",
          "--train_files", train_files, "--validation_files", validation_files,
          "--vocabulary", vocabulary, "--num_steps", str(num_steps), *mh.TINY_FLAGS,
          "--gin.TrainConfig.data_shards=2", "--gin.TrainConfig.eval_batches=1",
          "--gin.CheckpointConfig.save_interval_steps=2",
          "--gin.span_corruption_task.shuffle_buffer_size=16",
          "--gin.span_corruption_task.chunk_records=8"]


def _main_here(argv, data_dir) -> int:
  """`miniend ARGV` in this process (on the session's compilation cache, which the
  processes `mh.launch` starts share)."""
  return cli.main([*argv, f"--gin.TrainConfig.data_dir='{data_dir}'"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, data_dir):
  """The uninterrupted run (1 process, 8 devices), the one the others are held to."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  argv = _pretrain(workdir, data_dir, f"{corpus}/c4-train.*.json.gz",
                   f"{corpus}/c4-validation.*.json.gz")
  assert _main_here(argv, data_dir) == 0
  return workdir


def _losses(workdir):
  rows = writers.read_jsonl(os.path.join(workdir, "logs", "train_metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_mid_file_resumes_exactly_also_on_one_process(tmp_path, corpus, data_dir,
                                                                reference, capfd):
  # Killed as 2 processes (each reads its own file shard), resumed as 1 (reading both).
  train, validation = f"{corpus}/c4-train.*.json.gz", f"{corpus}/c4-validation.*.json.gz"
  killed = str(tmp_path / "killed")
  procs = mh.launch(2, _pretrain(killed, data_dir, train, validation, num_steps=10000),
                    data_dir=data_dir)
  deadline, failed = time.time() + 600, None
  try:
    while checkpoints.latest_step(os.path.join(killed, "checkpoints")) is None:
      # (Reading a process's output before it ends would wait for its 10000 steps.)
      if not all(p.poll() is None for p in procs):
        failed = "a process exited before the first checkpoint"
        break
      if time.time() > deadline:
        failed = "no checkpoint within 600 s"
        break
      time.sleep(0.05)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.wait()
  assert not failed, f"{failed}:\n{procs[0].stdout.read()[-3000:]}"
  saved = checkpoints.latest_step(os.path.join(killed, "checkpoints"))
  assert 0 < saved < STEPS
  capfd.readouterr()
  assert _main_here(_pretrain(killed, data_dir, train, validation), data_dir) == 0
  assert f"Resumed from step {saved}" in capfd.readouterr().err
  # The same examples after the resume: the same losses and weights (up to the
  # round-off of 2 processes against 1; other examples would move them by ~lr).
  expected, got = _losses(reference), _losses(killed)
  assert got.keys() == expected.keys() and max(got) == STEPS
  for step in got:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  mh.assert_params_close(loop_testing.final_params(reference), loop_testing.final_params(killed))


def test_a_corrupt_record_stops_with_one_line_and_exit_3(tmp_path, corpus, data_dir, capfd):
  # 2 files for 2 shards: shard 1 reads part-1 alone, and meets its line 601 (past the
  # start-up check of the first 8 records and the first checkpoints) ~10 steps in.
  bad = tmp_path / "bad"
  bad.mkdir()
  for k in range(2):
    lines = [line for j in range(16) for line in _documents("train", k + 2 * j)]
    if k == 1:
      lines[600] = '{"text": "cut off'
    _write_json_gz(bad / f"part-{k}.json.gz", lines)
  workdir = str(tmp_path / "run")
  capfd.readouterr()
  code = _main_here(_pretrain(workdir, data_dir, str(bad / "*.json.gz"),
                              f"{corpus}/c4-validation.*.json.gz", num_steps=10000),
                    data_dir)
  err = capfd.readouterr().err
  assert code == 3, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("miniend: ")]
  assert len(errors) == 1 and f"{bad}/part-1.json.gz:601: is not valid JSON" in errors[0], err
  # Nothing after the last good checkpoint: the steps saved all restore.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpoints.latest_step(ckpt_dir) is not None
  assert checkpoints.load_params_from_checkpoint(ckpt_dir)
