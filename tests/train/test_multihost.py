"""The whole run loop as a pod runs it: `miniend distill` in 2 JAX processes x 4 CPU devices.

The runs read 2 logical data shards, evaluate periodically until the
validation split runs out (at different steps on the two hosts: the shards
are uneven), and checkpoint asynchronously. They must:
- equal the same run in 1 process x 8 devices (same global batches, same updates,
  same evaluation), whichever steps ran on two processes;
- stop together, exit 0 and save the same step when SIGTERM reaches one host;
- resume exactly, also on another number of processes: one run goes 1 -> 2 -> 1
  (a 1-process checkpoint resumed on 2 hosts, stopped by SIGTERM, finished on 1).

A fresh start on 2 hosts is in test_a_model_replica_across_both_processes here
(distill) and in test_corpus_cli's killed run (pretrain, data-parallel: every
step's loss against 1 process); one 2-host run less here saves a pair of process
start-ups and process 1's compiles (JAX writes the persistent cache from process
0 only, and on CPU process 1's cache keys differ, so it compiles every program).

The 1-process runs are `cli.main` in this process (1 process x 8 devices, no
distributed runtime: what a 1-process `miniend` is), so only the runs that are
about several processes pay a subprocess start-up. Every run compiles through
the session's compilation cache (tests/conftest.py), which the subprocesses
inherit.
"""

import glob
import json
import os
import shutil
import textwrap

import numpy as np
import pytest

from miniend_jax import cli
from miniend_jax.train import checkpoints, loop, partitioning, state as state_lib, writers
from tests.train import loop_testing, multihost_testing as mh

# Checkpoints every SAVE_EVERY steps and an evaluation at EVAL_EVERY (and one at the
# end): the two-host stretch of a resumed run starts mid-run, evaluates, and is
# stopped several steps before the end.
STEPS, SAVE_EVERY, EVAL_EVERY = 12, 4, 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir):
  directory = str(tmp_path_factory.mktemp("hf_teacher"))
  mh.write_tiny_teacher(directory, data_dir)
  return directory


def _run_here(command, data_dir):
  """`miniend COMMAND` as 1 process x 8 devices: in this process."""
  assert cli.main([*command, f"--gin.TrainConfig.data_dir='{data_dir}'"]) == 0


def _distill(workdir, teacher, num_steps, *extra):
  # pydoc_topic: a validation split of ~150 short examples, read to its end.
  return ["distill", "--workdir", workdir, "--teacher", teacher, "--student_shape", "1L-32H",
          "--recipe", "miniend_d", "--num_steps", str(num_steps), "--task", "pydoc_topic",
          *mh.TINY_FLAGS, f"--gin.TrainConfig.eval_every={EVAL_EVERY}",
          "--gin.TrainConfig.eval_batches=1000",
          f"--gin.CheckpointConfig.save_interval_steps={SAVE_EVERY}", *extra]


def _losses(workdir):
  return [r["loss"] for r in writers.read_jsonl(os.path.join(workdir, "logs",
                                                             "train_metrics.jsonl"))
          if "loss" in r]


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def test_two_processes_equal_one_and_resume_across_host_counts(tmp_path, teacher, data_dir):
  reference = str(tmp_path / "one_process")
  _run_here(_distill(reference, teacher, STEPS, "--gin.TrainConfig.data_shards=2"), data_dir)
  summary = _summary(reference)
  assert summary["step"] == STEPS and summary["eval"]["eval/tokens"] > 0

  # `miniend evaluate` decodes on both hosts' devices; the primary scores: same results.
  scores = {}
  for processes in (1, 2):
    out_dir = str(tmp_path / f"evaluate{processes}")
    command = ["evaluate", "--workdir", out_dir, "--checkpoint_dir",
               os.path.join(reference, "checkpoints"), "--gin.evaluate.batch_size=16",
               "--gin.evaluate.inputs_length=32", "--gin.evaluate.targets_length=8",
               "--gin.evaluate.max_decode_length=4", f"--gin.evaluate.data_dir='{data_dir}'"]
    if processes == 1:
      _run_here(command, data_dir)
    else:
      mh.run(processes, command, data_dir=data_dir)
    with open(os.path.join(out_dir, "eval", "pydoc_topic.json")) as f:
      scores[processes] = json.load(f)
  assert scores[2] == scores[1] and "accuracy" in scores[1]["pydoc_topic"]

  # 1 -> 2: the single host's run as it stood after its first mid-run checkpoint (the
  # later steps removed), resumed on two hosts without an end (data_shards is not
  # given again: the run keeps the checkpoint's). Once both evaluated at step
  # EVAL_EVERY, SIGTERM reaches one of them: they stop together, exit 0 and save.
  resumed = str(tmp_path / "one_to_two_to_one")
  shutil.copytree(reference, resumed)
  for step in range(SAVE_EVERY + 1, STEPS + 1):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)), ignore_errors=True)
  assert checkpoints.latest_step(os.path.join(resumed, "checkpoints")) == SAVE_EVERY
  procs = mh.launch(2, _distill(resumed, teacher, 100000), data_dir=data_dir)
  try:
    head = mh.signal_when_logged(procs, f"Evaluated at step {EVAL_EVERY} ", target=-1)
    outputs = mh.wait(procs)  # every process exits 0
  finally:
    mh.kill_all(procs)
  outputs[-1] = head + outputs[-1]
  assert all(f"Resumed from step {SAVE_EVERY} " in out for out in outputs)
  stopped = _summary(resumed)
  assert stopped["preempted"] and EVAL_EVERY < stopped["step"] < STEPS, stopped
  assert checkpoints.latest_step(os.path.join(resumed, "checkpoints")) == stopped["step"]
  # The signalled host says so; the other stopped with it, at the same step.
  assert "SIGTERM received" in outputs[-1] and "SIGTERM received" not in outputs[0]
  # Two hosts evaluated to the end of their uneven shards: the one-host figures (the
  # reference's later rows were dropped when the two hosts resumed at SAVE_EVERY).
  evals = [r for r in writers.read_jsonl(os.path.join(resumed, "logs", "train_metrics.jsonl"))
           if "eval/loss" in r and r["step"] == EVAL_EVERY]
  expected = [r for r in writers.read_jsonl(os.path.join(reference, "logs",
                                                         "train_metrics.jsonl"))
              if "eval/loss" in r and r["step"] == EVAL_EVERY]
  assert len(evals) == len(expected) == 1 and expected[0]["eval/tokens"] > 0
  assert evals[0] == pytest.approx(expected[0], rel=1e-5)

  # 2 -> 1: the two hosts' checkpoint resumed on one host, to the end. Equal to the
  # reference: the updates on two hosts (steps SAVE_EVERY+1..) and after were the same.
  _run_here(_distill(resumed, teacher, STEPS), data_dir)
  assert _summary(resumed)["step"] == STEPS
  assert _summary(resumed)["eval"] == pytest.approx(summary["eval"], rel=1e-5)
  mh.assert_params_close(loop_testing.final_params(reference),
                         loop_testing.final_params(resumed))


def test_a_model_replica_across_both_processes(tmp_path, data_dir, capfd):
  """model=8: every device holds a slice of every layer, so both hosts hold the same
  batch rows and must read the same examples (one logical shard, read by both)."""
  teacher = str(tmp_path / "teacher8")
  mh.write_tiny_teacher(teacher, data_dir, num_heads=8, d_kv=8)
  runs = {}
  for processes in (1, 2):
    workdir = str(tmp_path / f"model8_{processes}")
    command = [
        "distill", "--workdir", workdir, "--teacher", teacher, "--student_shape", "1L-32H",
        "--gin.ModelSetup.overrides={'num_heads': 8, 'd_kv': 4}", "--num_steps", "6",
        *mh.TINY_FLAGS, "--gin.MeshConfig.data=1", "--gin.MeshConfig.model=8",
        "--gin.ModelSetup.teacher_dtype='float32'"]
    if processes == 1:
      capfd.readouterr()
      _run_here(command, data_dir)
      outputs = [capfd.readouterr().err]
    else:
      outputs = mh.run(processes, command, data_dir=data_dir)
    assert all("'model': 8" in out and "this host reads [0]" in out for out in outputs)
    runs[processes] = workdir
  # Tensor-parallel partial sums are reduced in another order across processes
  # than within one; with a bf16 teacher that is bf16 round-off in its outputs,
  # hence a float32 teacher here. Other examples would change every loss.
  np.testing.assert_allclose(_losses(runs[2]), _losses(runs[1]), rtol=1e-5)
  mh.assert_params_close(loop_testing.final_params(runs[1]), loop_testing.final_params(runs[2]))


def test_checkpoint_queries_join_no_barrier(tmp_path):
  """Hosts look at a checkpoint directory at different times (one may see the
  directory another just made): a query must stay on its host, or it pairs
  with another host's barrier and the run dies (seen: a fresh 2-host run,
  where one host's `latest_step` met the other's CheckpointManager barrier)."""
  ckpt_dir = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(ckpt_dir)
  ckpt.save(3, {"w": np.ones(2, np.float32)}, force=True)
  ckpt.close()
  code = textwrap.dedent(f"""
      import sys
      from jax.experimental import multihost_utils
      from miniend_jax.train import checkpoints, partitioning
      partitioning.maybe_initialize_distributed()
      if sys.argv[1] == "0":  # only host 0 looks
        assert checkpoints.latest_step({ckpt_dir!r}) == 3
        assert checkpoints.load_metadata({ckpt_dir!r})["step"] == 3
      multihost_utils.sync_global_devices("after the queries")
      sys.stdout.write(f"done {{sys.argv[1]}}\\n")  # one write: print() may make several
      sys.stdout.flush()
      """)
  outputs = mh.wait(mh.launch(2, [], data_dir=None, python=["-c", code]), timeout=300)
  # Not "done 0\n": the runtime's threads log to the same pipe and may split a line.
  for index, out in enumerate(outputs):
    assert f"done {index}" in out, f"process {index} never got past the barrier:\n{out[-3000:]}"


def test_hosts_agree_on_the_step_to_restore_and_a_sigterm_while_loading(tmp_path, data_dir):
  """Process 1 cannot read the newest step: its data position there is damaged, a
  file process 0 never reads (each host reads its own shards' positions). Both must
  restore the older step, the newest every host read (a host falling back alone
  mixes two steps' states, then hangs). Process 1 also gets SIGTERM while the run
  loads (JAX's distributed runtime has its own SIGTERM handler, which used to
  swallow it): both stop before the first step, exit 0, keep both steps on disk."""
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # Steps 2 and 4 with 2 data shards (one per host below), in this process: the
  # settings of the command line below.
  loop.train("pretrain", workdir, train_config=loop.TrainConfig(
      num_steps=4, data_dir=data_dir, inputs_length=32, targets_length=8, batch_size=8,
      log_every=2, data_shards=2), model=loop.ModelSetup(preset="t5-v1_1-tiny"),
      optimizer=state_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=0, eps=1e-3),
      checkpoint=checkpoints.CheckpointConfig(save_interval_steps=2),
      mesh=partitioning.MeshConfig(), progress=False)
  damaged = glob.glob(os.path.join(ckpt_dir, "4", checkpoints.DATA_ITERATOR,
                                   "shard00001-of-00002.data-*"))
  assert damaged
  for path in damaged:
    with open(path, "wb") as f:
      f.write(b"not a checkpoint")
  procs = mh.launch(2, ["pretrain", "--workdir", workdir, "--preset", "t5-v1_1-tiny",
                        "--num_steps", "6", *mh.TINY_FLAGS, "--gin.TrainConfig.data_shards=2",
                        "--gin.CheckpointConfig.save_interval_steps=2"],
                    data_dir=data_dir)
  try:
    head = mh.signal_when_logged(procs, "Run checked", target=1)
    outputs = mh.wait(procs, timeout=240)
  finally:
    mh.kill_all(procs)
  outputs[1] = head + outputs[1]
  assert all("Resumed from step 2 " in out for out in outputs), outputs
  assert "Skipping unreadable checkpoint: Checkpoint step 4" in outputs[1]
  assert "step 4 of" in outputs[0] and "not on process(es) [1]" in outputs[0]
  # The signal came while loading, and nothing ran after it.
  assert outputs[1].index("SIGTERM received") < outputs[1].index("Resumed from step 2 ")
  summary = _summary(workdir)
  assert summary["preempted"] and summary["step"] == 2, summary
  assert max(r["step"] for r in writers.read_jsonl(
      os.path.join(workdir, "logs", "train_metrics.jsonl"))) == 2
  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as reader:
    assert reader.all_steps() == [2, 4]  # the damaged step is kept, nothing new saved
