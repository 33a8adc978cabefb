"""The whole run loop as a pod runs it: `miniend distill` in 2 JAX processes x 4 CPU devices.

The runs read 2 logical data shards, evaluate periodically until the
validation split runs out (at different steps on the two hosts: the shards
are uneven), and checkpoint asynchronously. They must:
- equal the same run in 1 process x 8 devices (same global batches, same updates,
  same evaluation), whichever steps ran on two processes;
- stop together, exit 0 and save the same step when SIGTERM reaches one host;
- resume exactly, also on another number of processes (2 -> 1 and 1 -> 2).

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

# Checkpoints every SAVE_EVERY steps and evaluations every EVAL_EVERY (2 during
# the run, 1 at its end): a resume starts mid-run and is evaluated again.
STEPS, SAVE_EVERY, EVAL_EVERY = 12, 4, 4


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


def _stop_one_host(workdir, teacher, data_dir):
  """Starts an endless run on 2 hosts, sends SIGTERM to the last; returns the saved step."""
  procs = mh.launch(2, _distill(workdir, teacher, 100000, "--gin.TrainConfig.data_shards=2"),
                    data_dir=data_dir)
  mh.signal_after_first_log(procs, workdir)
  outputs = mh.wait(procs)  # every process exits 0
  summary = _summary(workdir)
  assert summary["preempted"] and 0 < summary["step"] < STEPS, summary
  assert checkpoints.latest_step(os.path.join(workdir, "checkpoints")) == summary["step"]
  # The signalled host says so; the other stopped with it, at the same step.
  assert "SIGTERM received" in outputs[-1] and "SIGTERM received" not in outputs[0]
  return summary["step"]


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

  # A fresh start on two hosts; SIGTERM reaches one of them; resume on one host
  # (2 -> 1). data_shards is not given again: the run keeps the checkpoint's.
  two_to_one = str(tmp_path / "two_to_one")
  _stop_one_host(two_to_one, teacher, data_dir)
  _run_here(_distill(two_to_one, teacher, STEPS), data_dir)
  assert _summary(two_to_one)["step"] == STEPS
  mh.assert_params_close(loop_testing.final_params(reference),
                         loop_testing.final_params(two_to_one))

  # And the reverse (1 -> 2): the single host's run as it stood after its first
  # mid-run checkpoint (the later steps removed), resumed on two hosts.
  one_to_two = str(tmp_path / "one_to_two")
  shutil.copytree(reference, one_to_two)
  for step in range(SAVE_EVERY + 1, STEPS + 1):
    shutil.rmtree(os.path.join(one_to_two, "checkpoints", str(step)), ignore_errors=True)
  assert checkpoints.latest_step(os.path.join(one_to_two, "checkpoints")) == SAVE_EVERY
  outputs = mh.run(2, _distill(one_to_two, teacher, STEPS), data_dir=data_dir)
  assert all(f"Resumed from step {SAVE_EVERY} " in out for out in outputs)
  assert _summary(one_to_two)["step"] == STEPS
  mh.assert_params_close(loop_testing.final_params(reference),
                         loop_testing.final_params(one_to_two))
  # Two hosts evaluated to the end of their uneven shards: the one-host figures.
  assert _summary(one_to_two)["eval"] == pytest.approx(summary["eval"], rel=1e-5)


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
