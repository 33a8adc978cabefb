"""`miniend` from the command line: distill -> finetune -> evaluate -> export, preemption, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from miniend_jax import cli
from miniend_jax.model import hf
from miniend_jax.model.t5 import T5
from miniend_jax.train import checkpoints, writers
from tests.train import loop_testing, multihost_testing as mh
from tests.xla_testing import xla_flags

TINY_FLAGS = ["--no_progress", "--gin.TrainConfig.inputs_length=32",
              "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.batch_size=8",
              "--gin.TrainConfig.log_every=2", "--gin.TrainConfig.eval_batches=2",
              "--gin.CheckpointConfig.save_interval_steps=2"]


def miniend_process(*args, data_dir):
  """`python -m miniend_jax ARGS` as a real process (its output piped, text)."""
  command = [sys.executable, "-m", "miniend_jax", *args,
             f"--gin.TrainConfig.data_dir='{data_dir}'"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def miniend_here(*args, data_dir):
  """`miniend ARGS` in this process: the entry point the script calls, without a
  process start-up's ~10 s of imports; asserts it exits 0."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()  # a fresh command, as from a shell
  assert cli.main([*args, f"--gin.TrainConfig.data_dir='{data_dir}'"]) == 0


def test_distill_finetune_evaluate_export_from_the_command_line(tmp_path, data_dir, capsys):
  # A umT5-shaped family (a relative-position table per layer) all the way: the
  # student and the finetuned model inherit it, decoding reads each layer's own
  # table, and the export is a UMT5ForConditionalGeneration. Plain T5 chains run
  # in test_loop, test_multihost and the quickstart. The commands run in this
  # process (`cli.main`, as the `miniend` script calls it; test_packaging runs the
  # installed script, and the Ctrl-C test below a real process).
  # The teacher: a random umT5-shaped Hugging Face checkpoint, as users download one.
  teacher = str(tmp_path / "teacher")
  mh.write_tiny_teacher(teacher, data_dir, relative_bias_per_layer=True)
  student = str(tmp_path / "student")
  miniend_here("distill", "--workdir", student, "--teacher", teacher, "--student_shape",
               "1L-32H", "--recipe", "miniend_e", "--num_steps", "2", *TINY_FLAGS,
               data_dir=data_dir)
  assert checkpoints.latest_step(os.path.join(student, "checkpoints")) == 2
  assert json.load(open(os.path.join(student, "summary.json")))["step"] == 2
  assert "loss/encoder_self" in open(os.path.join(student, "logs", "train_metrics.jsonl")).read()

  finetuned = str(tmp_path / "finetuned")
  miniend_here("finetune", "--workdir", finetuned, "--init_from", student, "--task",
               "pydoc_topic", "--num_steps", "2", *TINY_FLAGS, data_dir=data_dir)

  capsys.readouterr()
  miniend_here("evaluate", "--workdir", finetuned, "--gin.evaluate.num_examples=8",
               "--gin.evaluate.inputs_length=32", "--gin.evaluate.targets_length=8",
               f"--gin.evaluate.data_dir='{data_dir}'", data_dir=data_dir)
  results = json.load(open(os.path.join(finetuned, "eval", "pydoc_topic.json")))
  assert 0.0 <= results["pydoc_topic"]["accuracy"] <= 100.0
  assert "accuracy" in capsys.readouterr().out

  exported = str(tmp_path / "hf")
  miniend_here("export", "--workdir", finetuned, "--out_dir", exported, data_dir=data_dir)
  model = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
  assert type(model).__name__ == "UMT5ForConditionalGeneration"
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  ids = tokenizer(["topic: Return the absolute value of a number."], return_tensors="pt")
  config = checkpoints.load_model_config(os.path.join(finetuned, "checkpoints"))
  params = checkpoints.load_params_from_checkpoint(os.path.join(finetuned, "checkpoints"))
  assert config.relative_bias_per_layer and "relpos_bias" in params["decoder"]["layers_0"]
  dec = np.zeros((1, 3), np.int32)
  ours = T5(config).apply({"params": params}, jnp.asarray(ids["input_ids"].numpy(), jnp.int32),
                          jnp.asarray(dec)).logits
  with torch.no_grad():
    theirs = model(**ids, decoder_input_ids=torch.as_tensor(dec, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_distill_from_a_byt5_shaped_teacher_on_its_own_bytes(tmp_path, data_dir):
  """A ByT5-shaped Hugging Face teacher (bytes, 384 ids, a deep encoder over a
  shallow decoder) distilled on the pydoc corpus re-tokenised with the teacher's own
  vocabulary (`--vocabulary teacher`): ByT5 span corruption, and an export that
  transformers loads with ByT5's tokenizer and our logits."""
  from miniend_jax.data import preprocessors, tasks  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.config import T5Config  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.t5 import init_params  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  teacher = str(tmp_path / "byt5_teacher")
  config = T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=3,
                    num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, dropout_rate=0.0)
  hf.save_hf(config, init_params(config, jax.random.key(0)), teacher)
  transformers.ByT5Tokenizer().save_pretrained(teacher)
  lengths = tasks.span_corruption_feature_lengths(
      64, mean_noise_span_length=preprocessors.BYT5_MEAN_NOISE_SPAN_LENGTH)
  student = str(tmp_path / "student")
  flags = [f for f in TINY_FLAGS if "_length=" not in f] + [
      f"--gin.TrainConfig.inputs_length={lengths['inputs']}",
      f"--gin.TrainConfig.targets_length={lengths['targets']}"]
  miniend_here("distill", "--workdir", student, "--teacher", teacher, "--vocabulary", "teacher",
               "--student_shape", "1L-32H", "--recipe", "kd_logits", "--num_steps", "2", *flags,
               data_dir=data_dir)
  metadata = checkpoints.load_metadata(os.path.join(student, "checkpoints"))["run"]
  assert metadata["task"] == "pydoc_span_corruption.byt5" and metadata["vocabulary"] == "byt5"
  assert checkpoints.load_model_config(os.path.join(student, "checkpoints")).vocab_size == 384

  exported = str(tmp_path / "hf")
  loop.export(student, exported)  # what `miniend export` runs (the umT5 test runs the CLI)
  model = transformers.AutoModelForSeq2SeqLM.from_pretrained(exported).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  assert type(model).__name__ == "T5ForConditionalGeneration"
  assert type(tokenizer).__name__ == "ByT5Tokenizer"
  ids = tokenizer(["Grüße: return the absolute value."], return_tensors="pt")
  params = checkpoints.load_params_from_checkpoint(os.path.join(student, "checkpoints"))
  student_config = checkpoints.load_model_config(os.path.join(student, "checkpoints"))
  dec = np.zeros((1, 3), np.int32)
  ours = T5(student_config.replace(dtype="float32")).apply(
      {"params": params}, jnp.asarray(ids["input_ids"].numpy(), jnp.int32), jnp.asarray(dec)).logits
  with torch.no_grad():
    theirs = model(**ids, decoder_input_ids=torch.as_tensor(dec, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)
  # 'teacher' needs a checkpoint directory holding the tokenizer files.
  with pytest.raises(ValueError, match="not a checkpoint directory"):
    loop.named_vocabulary("teacher", "t5-v1_1-small")


def test_ctrl_c_saves_the_step_and_the_same_command_resumes_exactly(tmp_path, data_dir):
  workdir = str(tmp_path / "interrupted")
  # The settings of loop_testing.run (constant learning rate after a 2-step warm-up,
  # so the run's length does not change its schedule).
  flags = ["pretrain", "--workdir", workdir, "--preset", "t5-v1_1-tiny", *TINY_FLAGS,
           "--gin.OptimizerConfig.learning_rate=3e-3", "--gin.OptimizerConfig.warmup_steps=2",
           "--gin.CheckpointConfig.async_save=False"]
  proc = miniend_process(*flags, "--num_steps", "100000", data_dir=data_dir)
  metrics = os.path.join(workdir, "logs", "train_metrics.jsonl")
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "the run never logged a step"
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  assert "Run the same command again to resume" in out
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  stopped = summary["step"]
  assert summary["preempted"] and summary["stopped_by"] == "SIGINT" and 0 < stopped < 100000
  assert checkpoints.latest_step(os.path.join(workdir, "checkpoints")) == stopped
  # Rows of steps after the saved one, as a crash between a log and a save leaves them.
  with open(metrics, "a") as f:
    for step in (stopped + 1, stopped + 2):
      f.write(json.dumps({"step": step, "loss": 123.0}) + "\n")
  # The same command with a closer end resumes at the saved step (in this process:
  # the resume is about the work directory, not the process) ...
  total = stopped + 3
  miniend_here(*flags, "--num_steps", str(total), data_dir=data_dir)
  assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == total
  # ... exactly: equal to an uninterrupted run of the same settings.
  straight = str(tmp_path / "straight")
  loop_testing.run("pretrain", straight, data_dir, num_steps=total, save_every=total)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               loop_testing.final_params(workdir), loop_testing.final_params(straight))
  # Metrics rows logged before the interruption past the saved step are not repeated.
  rows = [r for r in writers.read_jsonl(metrics) if "loss" in r]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) and steps[-1] == total
  assert all(r["loss"] != 123.0 for r in rows)


def test_bad_gin_bindings_fail_with_a_clear_message(tmp_path, capsys):
  code = cli.main(["pretrain", "--workdir", str(tmp_path), "--gin.TrainConfig.num_stepz=3"])
  assert code == 2
  err = capsys.readouterr().err
  assert "--gin.TrainConfig.num_stepz=3" in err and "doesn't have a parameter" in err
  assert cli.main(["pretrain", "--workdir", str(tmp_path), "--gin_file", "nope.gin"]) == 2
  assert "gin file 'nope.gin' not found" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
