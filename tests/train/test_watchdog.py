"""The watchdog ends a run whose input read never returns, with every thread's stack."""

import os
import textwrap

import pytest

from miniend_jax.train import watchdog
from tests.train import loop_testing, multihost_testing as mh


def test_timeout_follows_the_recent_step_time_within_its_limits():
  config = watchdog.WatchdogConfig(step_time_factor=20, min_seconds=60, max_seconds=3600)
  assert config.timeout(None) == 60  # only the first (compiling) step has finished
  assert config.timeout(1.0) == 60
  assert config.timeout(10.0) == 200
  assert config.timeout(1000.0) == 3600
  assert watchdog.WatchdogConfig(step_time_factor=0, max_seconds=5).timeout(1.0) == 5
  assert not watchdog.WatchdogConfig(step_time_factor=0).enabled
  with pytest.raises(ValueError, match="max_seconds > 0"):
    watchdog.WatchdogConfig(max_seconds=0)


def test_a_stalled_input_read_ends_the_run_with_the_stacks(tmp_path, tmp_path_factory):
  """The task's source yields a few hundred texts, then opens a FIFO that nobody
  writes: a read that never returns, as a stalled GCS read. Steps run, then none
  finishes; the watchdog must end the process (status 4) after its limit, having
  written every thread's stack (the stuck read's frame among them)."""
  data_dir = loop_testing.shared_data_dir(tmp_path_factory)
  fifo = str(tmp_path / "next_file")
  os.mkfifo(fifo)
  workdir = str(tmp_path / "run")
  code = textwrap.dedent(f"""
      import seqio, tensorflow as tf
      from miniend_jax.data import tasks
      from miniend_jax.train import checkpoints, loop, state, watchdog

      def texts(split, shuffle_files, seed=None):
        def read_then_stall():
          for i in range(400):
            yield {{"text": f"document {{i}} of a corpus whose next file never arrives"}}
          with open({fifo!r}) as never_written:  # blocks: no writer ever opens it
            yield {{"text": never_written.read()}}
        return tf.data.Dataset.from_generator(
            read_then_stall, output_signature={{"text": tf.TensorSpec((), tf.string)}})

      _, vocabulary = loop.task_vocabulary("pydoc_span_corruption", {data_dir!r})
      tasks.add_to_registry(seqio.Task(
          "stalling_text", source=seqio.FunctionDataSource(texts, splits=["train"]),
          output_features=tasks.output_features(vocabulary),
          preprocessors=tasks.span_corruption_preprocessors("text"), shuffle_buffer_size=16))
      loop.train("pretrain", {workdir!r}, train_config=loop.TrainConfig(
          task="stalling_text", num_steps=100000, data_dir={data_dir!r}, inputs_length=32,
          targets_length=8, batch_size=8, log_every=2),
          model=loop.ModelSetup(preset="t5-v1_1-tiny"),
          # loop_testing's optimizer: the train step other tests compile, a cache hit.
          optimizer=state.OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
          checkpoint=checkpoints.CheckpointConfig(save_interval_steps=100000),
          watchdog=watchdog.WatchdogConfig(step_time_factor=20, min_seconds=3), progress=False)
      """)
  procs = mh.launch(1, [], data_dir=None, python=["-c", code])
  try:
    out = procs[0].communicate(timeout=300)[0]
  finally:
    mh.kill_all(procs)
  assert procs[0].returncode == watchdog.EXIT_HUNG, out[-4000:]
  line = out.strip().splitlines()[-1]
  assert line.startswith("miniend: no training step finished for ") and "hung" in line, line
  assert "Thread 0x" in out and "read_then_stall" in out  # the stuck read's stack
  metrics = os.path.join(workdir, "logs", "train_metrics.jsonl")
  assert os.path.getsize(metrics) > 0  # steps ran before the stall
