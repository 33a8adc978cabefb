"""Bad input on the command line: one line, a documented exit status, nothing touched.

Each case runs `miniend` (in this process, as `cli.main`) the way a user would
get it wrong and checks: exit status 2 (usage) or 3 (data / checkpoint), a
single `miniend: ...` line on stderr that says what is wrong, no traceback,
and a work directory left byte for byte as it was. A run directory made by
one command, recipe or shape is refused by another before anything compiles;
the same command resumes it.
"""

import json
import os
import shutil
import subprocess
import sys

import gin
import pytest

from miniend_jax import cli
from miniend_jax.distill import recipe as recipe_lib
from tests.train import loop_testing, multihost_testing as mh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """A random t5-v1_1-tiny-shaped Hugging Face teacher (no run needed to make one) and
  a 2-step miniend_e student distilled from it."""
  root = tmp_path_factory.mktemp("runs")
  teacher, student = str(root / "teacher"), str(root / "student")
  mh.write_tiny_teacher(teacher, data_dir)
  loop_testing.run("distill", student, data_dir, num_steps=2, teacher=teacher,
                   student_shape="1L-32H", recipe="miniend_e")
  return {"teacher": teacher, "student": student}


def _snapshot(directory) -> dict:
  """Every file under `directory` with its bytes (and modes), to compare before / after."""
  files = {}
  for base, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mode)
  return files


def _fails(capfd, argv, code, *expected, untouched=None):
  """Runs `miniend ARGV`; asserts the exit status, the one-line message, no traceback."""
  gin.clear_config()  # each call is a fresh command, as from a shell
  before = _snapshot(untouched) if untouched and os.path.isdir(untouched) else None
  capfd.readouterr()
  assert cli.main(list(argv)) == code
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("miniend: ")]
  assert len(lines) == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  for text in expected:
    assert text in lines[0], lines[0]
  if before is not None:
    assert _snapshot(untouched) == before, "the refused command changed the work directory"
  elif untouched:
    assert not os.path.exists(untouched)
  return lines[0]


def _tiny(data_dir):
  return ["--no_progress", f"--data_dir={data_dir}", "--gin.TrainConfig.inputs_length=32",
          "--gin.TrainConfig.targets_length=8", "--gin.TrainConfig.batch_size=8"]


def test_usage_errors(tmp_path, capfd, data_dir, runs):
  new = str(tmp_path / "new")
  tiny = _tiny(data_dir)
  _fails(capfd, ["pretrain", "--workdir", new, "--gin.TrainConfig.num_stepz=3"], 2,
         "num_stepz", "TrainConfig", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--gin.TrainConfig.num_steps"], 2,
         "not a gin binding", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--gin_file", "nope.gin"], 2,
         "'nope.gin' not found", untouched=new)
  bad_gin = tmp_path / "bad.gin"
  bad_gin.write_text("TrainConfig.num_steps = 3\nTrainConfig.batch_size = = 4\n")
  _fails(capfd, ["pretrain", "--workdir", new, "--gin_file", str(bad_gin)], 2,
         "bad.gin", "line 2", untouched=new)
  _fails(capfd, ["distill", "--workdir", new, "--teacher", runs["teacher"], "--recipe",
                 "miniend_x", *tiny], 2, "miniend_x", untouched=new)
  _fails(capfd, ["distill", "--workdir", new, "--teacher", runs["teacher"], "--student_shape",
                 "9L-7H", *tiny], 2, "Unknown student shape '9L-7H'", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--preset", "t5-huge", *tiny], 2,
         "Unknown model preset 't5-huge'", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--gin.OptimizerConfig.learning_rate=-1", *tiny],
         2, "learning_rate=-1", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--preset", "t5-v1_1-tiny", *tiny,
                 "--gin.TrainConfig.batch_size=6"], 2, "batch_size=6", "divide evenly",
         untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--task", "no_such_task", *tiny], 2,
         "Unknown task or mixture 'no_such_task'", untouched=new)
  _fails(capfd, ["pretrain", "--workdir", new, "--preset", "t5-v1_1-tiny", *tiny,
                 "--gin.ModelSetup.overrides={'vocab_size': 128}"], 2,
         "vocab_size=128, but the task's vocabulary has", untouched=new)
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  _fails(capfd, ["pretrain", "--workdir", str(a_file), *tiny], 2, "is a file")
  assert a_file.read_text() == "x"


def test_data_and_checkpoint_errors(tmp_path, capfd, data_dir, runs):
  new = str(tmp_path / "new")
  tiny = _tiny(data_dir)
  _fails(capfd, ["distill", "--workdir", new, "--teacher", str(tmp_path / "missing"), *tiny], 3,
         "is not a checkpoint directory", untouched=new)
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  _fails(capfd, ["distill", "--workdir", new, "--teacher", str(bert), *tiny], 3,
         "model_type='bert', not a T5", untouched=new)
  _fails(capfd, ["evaluate", "--workdir", new, "--task", "pydoc_topic"], 3,
         "no checkpoint in", untouched=new)
  # A damaged checkpoint: the advice, and nothing deleted. (The student's: the same
  # command resumes it, so the run gets as far as reading it.)
  damaged = str(tmp_path / "damaged")
  shutil.copytree(runs["student"], damaged)
  for base, _, names in os.walk(os.path.join(damaged, "checkpoints", "2", "state")):
    for name in names:
      with open(os.path.join(base, name), "wb") as f:
        f.write(b"garbage")
  line = _fails(capfd, ["distill", "--workdir", damaged, "--teacher", runs["teacher"],
                        "--gin.ModelSetup.preset='t5-v1_1-tiny'", "--student_shape", "1L-32H",
                        "--recipe", "miniend_e", "--num_steps", "4", *tiny,
                        "--gin.TrainConfig.log_every=2", "--gin.TrainConfig.eval_batches=2",
                        "--gin.CheckpointConfig.save_interval_steps=2",
                        "--gin.OptimizerConfig.learning_rate=3e-3",
                        "--gin.OptimizerConfig.warmup_steps=2"], 3,
                "could not be read", "Nothing was deleted", untouched=damaged)
  assert "Event loop" not in line
  # export refuses a non-empty directory.
  occupied = tmp_path / "occupied"
  occupied.mkdir()
  (occupied / "notes.txt").write_text("mine")
  _fails(capfd, ["export", "--workdir", runs["student"], "--out_dir", str(occupied)], 2,
         "not empty", "--overwrite", untouched=str(occupied))


def test_a_directory_made_by_another_run_is_refused_and_the_same_run_resumes(
    tmp_path, capfd, data_dir, runs):
  student = str(tmp_path / "student")
  shutil.copytree(runs["student"], student)
  tiny = _tiny(data_dir)
  common = ["--workdir", student, *tiny, "--num_steps", "4"]
  _fails(capfd, ["distill", *common, "--teacher", runs["teacher"], "--student_shape", "1L-32H",
                 "--recipe", "kd_logits"], 2, "other settings", "recipe", "--allow_changes",
         untouched=student)
  _fails(capfd, ["distill", *common, "--teacher", runs["teacher"], "--student_shape", "2L-64H",
                 "--recipe", "miniend_e"], 2, "model.student_shape: '1L-32H' -> '2L-64H'",
         untouched=student)
  _fails(capfd, ["finetune", *common, "--init_from", runs["student"], "--task", "pydoc_topic"],
         2, "command: 'distill' -> 'finetune'", untouched=student)
  # The same settings, only more steps: a safe change, so it resumes.
  gin.clear_config()
  resumed = loop_testing.run("distill", student, data_dir, num_steps=3, teacher=runs["teacher"],
                             student_shape="1L-32H", recipe="miniend_e")
  assert resumed["step"] == 3
  record = json.load(open(os.path.join(student, "run.json")))
  assert record["history"][-1]["changed"] == {"train.num_steps": [2, 3]}


def test_export_overwrites_only_when_asked_and_writes_a_plain_directory(tmp_path, capfd, runs):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "generation_config.json").write_text("{}")  # a stale file from another export
  gin.clear_config()
  assert cli.main(["export", "--workdir", runs["student"], "--out_dir", str(out),
                   "--overwrite"]) == 0
  names = sorted(os.listdir(out))
  assert "generation_config.json" not in names and "model.safetensors" in names
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".hf.")]  # no leftovers
  umask = os.umask(0)
  os.umask(umask)
  for name in names:
    assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_help_and_models_answer_without_loading_jax_or_tensorflow():
  # The recipe list in --help is the library's.
  assert set(cli.RECIPE_NAMES) == set(recipe_lib.RECIPES)
  for argv in (["--help"], ["models"], ["distill", "--help"]):
    code = ("import sys\nfrom miniend_jax import cli\ntry:\n  cli.main(%r)\n"
            "except SystemExit:\n  pass\n"
            "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, argv\n" % argv)
    proc = subprocess.run([sys.executable, "-c", code.replace("argv\n", f"{argv!r}\n")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: miniend" in proc.stdout or "t5-v1_1-base" in proc.stdout
