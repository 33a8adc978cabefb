"""`miniend quickstart` end to end on a tiny setting: stages, resume, seeds, table, CSV, plots;
the notebook run on CPU from this clone; a sweep interrupted and resumed.

The three end-to-end tests share one quickstart work directory (`interrupted`, module-scoped)
and the session's compilation cache: the notebook resumes the quickstart's directory, as it
does from a clone, and the sweep distils from its teacher with the quickstart's own settings,
so every program they run is compiled once in this file.
"""

import base64
import contextlib
import csv
import io
import json
import math
import os

import nbclient
import nbformat
import numpy as np
import pytest

from miniend_jax import quickstart
from miniend_jax.cli import sweep
from tests.quickstart.conftest import TINY, assert_real_png
from tests.quickstart.conftest import NOTEBOOK, NOTEBOOK_TINY, ROOT


class _Interrupted(Exception):
  pass


def _mtimes(workdir):
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name in ("summary.json",) or (os.path.basename(root) == "eval" and
                                       name.endswith(".json")):
        path = os.path.join(root, name)
        out[path] = os.path.getmtime(path)
  return out


def _eval(workdir, model, seed, task):
  path = os.path.join(workdir, "finetune", model, f"seed{seed}", task, "eval", f"{task}.json")
  return json.load(open(path))[task]


def _check_results(result, workdir):
  rows = result["rows"]
  assert [r["model"] for r in rows] == ["teacher", "scratch", "miniend_d"]
  teacher, *students = rows
  for row in rows:
    assert row["seeds"] == 1
    assert math.isfinite(row["heldout_sc_loss"]) and 0 < row["heldout_sc_loss"] < 20
    assert 0 <= row["pydoc_summary/rougeLsum"] <= 100
    assert 0 <= row["pydoc_topic/accuracy"] <= 100
    assert math.isnan(row["pydoc_topic/accuracy/std"])  # one seed: no spread
    assert row["fwd_examples_per_s"] > 0
  assert teacher["speedup_measured"] == pytest.approx(1.0)
  assert teacher["speedup_flops"] == pytest.approx(1.0)
  for student in students:
    assert student["params"] < teacher["params"]
    assert student["speedup_flops"] > 1.5  # 1L-32H vs the 2L-64H teacher
    assert student["speedup_measured"] > 0
    assert student["shape"] == "1L-32H"
  # The held-out loss is the teacher's / student's own pretraining / distillation eval.
  summary = json.load(open(os.path.join(workdir, "distill", "miniend_d", "seed0",
                                        "summary.json")))
  assert rows[2]["heldout_sc_loss"] == pytest.approx(summary["eval"]["eval/loss"])
  assert summary["step"] == TINY["steps"]
  assert rows[1]["pydoc_topic/accuracy"] == pytest.approx(
      _eval(workdir, "scratch", 0, "pydoc_topic")["accuracy"])
  assert [(r["model"], r["seed"]) for r in result["per_seed"]] == [
      ("teacher", 0), ("scratch", 0), ("miniend_d", 0)]

  # Markdown and CSV.
  table = result["table"]
  assert table.splitlines()[0].startswith("| model | seeds | params | speed-up (measured)")
  assert "held-out SC loss" in table and "pydoc_summary rougeLsum (n=8)" in table
  assert "pydoc_topic accuracy (n=8)" in table
  assert len(table.splitlines()) == 2 + 3
  markdown = open(result["files"]["markdown"]).read()
  assert table in markdown and "sum of the two standard deviations" in markdown
  with open(result["files"]["csv"], newline="") as f:
    csv_rows = list(csv.DictReader(f))
  assert [r["model"] for r in csv_rows] == ["teacher", "scratch", "miniend_d"]
  assert float(csv_rows[2]["heldout_sc_loss"]) == pytest.approx(rows[2]["heldout_sc_loss"])
  for key in ("params", "speedup_measured", "speedup_flops", "pydoc_summary/rouge1",
              "pydoc_summary/rougeLsum", "pydoc_topic/accuracy", "pydoc_topic/accuracy/std",
              "grad_norm_encoder_max", "seeds"):
    assert key in csv_rows[0], key
  with open(result["files"]["per_seed_csv"], newline="") as f:
    assert [(r["model"], r["seed"]) for r in csv.DictReader(f)] == [
        ("teacher", "0"), ("scratch", "0"), ("miniend_d", "0")]

  # Plots.
  for name in ("loss_curves", "grad_norms", "scores"):
    assert result["files"][name] == os.path.join(workdir, f"{name}.png")
    assert_real_png(result["files"][name])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, compilation_cache_dir):
  """A TINY quickstart directory interrupted right after the first student finished
  distilling: the corpus, the teacher and distill/scratch/seed0 are done, nothing else.

  The quickstart test resumes it; the sweep test only reads its teacher and corpus, which no
  later run rewrites (the quickstart test checks that), so the two may run in either order.
  """
  del compilation_cache_dir  # only its side effect
  workdir = str(tmp_path_factory.mktemp("qs"))

  def interrupt(name, status):
    if name == "distill scratch seed 0" and status == "ran":
      raise _Interrupted()

  with pytest.raises(_Interrupted):
    quickstart.run(workdir, verbose=False, on_stage=interrupt, **TINY)
  return workdir


def _run_notebook(workdir, monkeypatch):
  """Runs notebooks/quickstart.ipynb top to bottom in a Jupyter kernel on the CPU, from this
  clone, in its test mode on `workdir`; checks its cells' outputs and returns their text."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with monkeypatch.context() as env:
    env.delenv("MINIEND_NOTEBOOK_SKIP_INSTALL", raising=False)
    env.delenv("MINIEND_REPO", raising=False)
    env.setenv("MINIEND_NOTEBOOK_TEST", "1")
    env.setenv("MINIEND_NOTEBOOK_WORKDIR", workdir)
    env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # as this module's tests
    env.setenv("JAX_PLATFORMS", "cpu")
    env.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The kernel starts in the clone's notebooks/ folder, as Jupyter opened from a clone does.
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "already installed" in text and "skipping pip install" in text
  assert "CPU device(s)" in text
  pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) == 3
  for png in pngs:
    assert base64.b64decode(png.data["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
  tables = [o.data["text/markdown"] for o in outputs
            if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(tables) == 1 and "| teacher (t5-v1_1-tiny) |" in tables[0]
  assert "| miniend_d (1L-32H) |" in tables[0]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert [r["model"] for r in results["rows"]] == ["teacher", "miniend_d"]
  assert 0 <= results["rows"][1]["pydoc_topic/accuracy"] <= 100
  for key, value in NOTEBOOK_TINY.items():
    assert results["settings"][key] == (list(value) if isinstance(value, tuple) else value), key
  for name in ("loss_curves", "grad_norms", "scores"):
    assert os.path.getsize(os.path.join(workdir, f"{name}.png")) > 10_000
  return text


def test_quickstart_and_notebook_run_resume_and_report(interrupted, monkeypatch):
  workdir = interrupted

  # 1. Interrupted right after the first student finished distilling (the fixture).
  assert quickstart.run_finished(os.path.join(workdir, "teacher"), TINY["teacher_steps"])
  assert quickstart.run_finished(os.path.join(workdir, "distill", "scratch", "seed0"),
                                 TINY["steps"])
  assert not os.path.exists(os.path.join(workdir, "distill", "miniend_d", "seed0",
                                         "summary.json"))
  first = _mtimes(workdir)

  # 2. The notebook, run top to bottom on the CPU from this clone, resumes the directory (as
  # it resumes `make quickstart`'s from a clone): it reuses the corpus and the teacher and
  # trains, scores and times only what its own (smaller) setting adds.
  printed = _run_notebook(workdir, monkeypatch)
  assert "[quickstart] finished earlier, skipped: data, teacher\n" in printed
  for stage in ("distill miniend_d seed 0", "finetune miniend_d seed 0 on pydoc_topic",
                "evaluate miniend_d seed 0 on pydoc_topic", "speed"):
    assert f"[quickstart] {stage}: done in" in printed, stage
  assert "distill scratch" not in printed  # not a path of the notebook's setting
  before = _mtimes(workdir)
  for path, mtime in first.items():
    assert before[path] == mtime, f"{path} was rewritten by the notebook"

  # 3. The re-run skips what is finished (by either) and does the rest.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = quickstart.run(workdir, **TINY)
  status = {name: s for name, s, _ in result["stages"]}
  done_by_notebook = ("distill miniend_d seed 0", "finetune miniend_d seed 0 on pydoc_topic",
                      "evaluate miniend_d seed 0 on pydoc_topic", "speed")
  for stage in ("data", "teacher", "distill scratch seed 0") + done_by_notebook:
    assert status[stage] == "skipped", stage
  for model in ("teacher", "scratch", "miniend_d"):
    for task in ("pydoc_summary", "pydoc_topic"):
      if model != "miniend_d" or task != "pydoc_topic":
        assert status[f"finetune {model} seed 0 on {task}"] == "ran"
        assert status[f"evaluate {model} seed 0 on {task}"] == "ran"
  after = _mtimes(workdir)
  for path, mtime in before.items():
    assert after[path] == mtime, f"{path} was rewritten"
  printed = out.getvalue()
  assert result["table"] in printed
  assert "finished in" in printed
  _check_results(result, workdir)

  # 4. A lost result is redone alone, and the report has the same numbers.
  lost = os.path.join(workdir, "finetune", "miniend_d", "seed0", "pydoc_topic", "eval",
                      "pydoc_topic.json")
  os.remove(lost)
  fourth = quickstart.run(workdir, verbose=False, **TINY)
  ran = [name for name, s, _ in fourth["stages"] if s == "ran"]
  assert ran == ["evaluate miniend_d seed 0 on pydoc_topic"]
  assert {path: mtime for path, mtime in _mtimes(workdir).items() if path != lost} == {
      path: mtime for path, mtime in after.items() if path != lost}
  assert fourth["rows"][2]["pydoc_topic/accuracy"] == pytest.approx(
      result["rows"][2]["pydoc_topic/accuracy"])
  assert fourth["table"] == result["table"]
  settled = _mtimes(workdir)

  # 5. A second seed (one task, no teacher finetuning, to keep it short) trains only
  # the new seed's runs, and the table aggregates both seeds.
  more = {**TINY, "seeds": 2, "tasks": ("pydoc_topic",), "finetune_teacher": False}
  fifth = quickstart.run(workdir, verbose=False, **more)
  ran = [name for name, s, _ in fifth["stages"] if s == "ran"]
  assert ran == ["distill scratch seed 1", "distill miniend_d seed 1",
                 "finetune scratch seed 1 on pydoc_topic", "evaluate scratch seed 1 on pydoc_topic",
                 "finetune miniend_d seed 1 on pydoc_topic",
                 "evaluate miniend_d seed 1 on pydoc_topic"]
  for path, mtime in settled.items():
    assert os.path.getmtime(path) == mtime, f"{path} was rewritten"
  # Same seed, same initialisation and batches: the first step's span-corruption loss (of
  # the initial weights on the first batch) is the same for both paths, another seed's not.
  def first_loss(path, seed):
    log = os.path.join(workdir, "distill", path, f"seed{seed}", "logs", "train_metrics.jsonl")
    return json.loads(open(log).readline())["loss/span_corruption"]
  assert first_loss("scratch", 1) == pytest.approx(first_loss("miniend_d", 1), rel=1e-5)
  assert first_loss("scratch", 0) == pytest.approx(first_loss("miniend_d", 0), rel=1e-5)
  assert first_loss("scratch", 0) != pytest.approx(first_loss("scratch", 1), rel=1e-5)
  by = {r["model"]: r for r in fifth["rows"]}
  assert list(by) == ["teacher", "scratch", "miniend_d"] and by["teacher"]["seeds"] == 1
  assert math.isnan(by["teacher"]["pydoc_topic/accuracy"])  # not finetuned this time
  for model in ("scratch", "miniend_d"):
    accuracies = [_eval(workdir, model, seed, "pydoc_topic")["accuracy"] for seed in (0, 1)]
    assert by[model]["seeds"] == 2
    assert by[model]["pydoc_topic/accuracy"] == pytest.approx(np.mean(accuracies))
    assert by[model]["pydoc_topic/accuracy/std"] == pytest.approx(np.std(accuracies, ddof=1))
  assert by["miniend_d"]["heldout_sc_loss/vs_baseline"] in ("better", "worse", "tie")
  assert "±" in fifth["table"] and "seeds: 2 (0, 1)" in fifth["notes"][0]
  assert json.load(open(fifth["files"]["json"]))["settings"]["seed_values"] == [0, 1]
  assert_real_png(fifth["files"]["scores"])

  # 6. Other settings on the same directory stop with a clear error, before any training.
  settled = _mtimes(workdir)
  with pytest.raises(quickstart.StageMismatchError, match=r"steps: 4 -> 5"):
    quickstart.run(workdir, verbose=False, **{**TINY, "steps": 5})
  assert _mtimes(workdir) == settled
  assert quickstart.run_finished(os.path.join(workdir, "distill", "scratch", "seed0"),
                                 TINY["steps"])


def test_settings_and_flags():
  s = quickstart.make_settings()
  assert s.size == "cpu" and s.paths == quickstart.DEFAULT_PATHS
  # Every path of the paper's table, each its own objective.
  assert s.paths == ("scratch", "kd_logits", "minilm", "kd_logits_minilm", "miniend_d",
                     "miniend_d_nologit", "miniend_e", "miniend_e_nologit")
  assert s.seeds >= 2 and s.seed_values == (0, 1) and s.eval_examples is None
  assert s.tasks == ("pydoc_summary", "pydoc_topic")
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  shape = presets.get_student_shape(s.student_shape)
  teacher = presets.get_model_config(s.teacher_preset)
  assert shape.num_layers >= 2 and shape.num_heads >= 2  # the last layer is not layer 0
  assert teacher.num_layers > shape.num_layers and teacher.d_model > shape.d_model
  gpu = quickstart.make_settings("gpu")
  gpu_shape = presets.get_student_shape(gpu.student_shape)
  assert presets.get_model_config(gpu.teacher_preset).d_model > teacher.d_model
  assert gpu_shape.d_model > shape.d_model and gpu.seeds >= s.seeds
  for name in ("teacher_steps", "steps", "finetune_steps", "batch_size"):
    assert getattr(gpu, name) > getattr(s, name), name
  assert quickstart.make_settings("gpu", steps=7).steps == 7
  with pytest.raises(ValueError, match="Unknown path"):
    quickstart.make_settings(paths=["scratch", "nope"])
  with pytest.raises(ValueError, match="repeat an objective"):
    quickstart.make_settings(paths=["implicit", "kd_logits_minilm"])
  with pytest.raises(ValueError, match="Unknown quickstart size"):
    quickstart.make_settings("huge")
  for bad in ({"steps": 0}, {"seeds": 0}):
    with pytest.raises(ValueError, match="positive integer"):
      quickstart.make_settings(**bad)

  import argparse  # pylint: disable=import-outside-toplevel
  parser = quickstart.add_arguments(argparse.ArgumentParser())
  args = parser.parse_args(["--workdir", "W", "--paths", "scratch,miniend_e", "--steps", "9",
                            "--size", "gpu", "--seeds", "3", "--no_finetune_teacher"])
  assert args.workdir == "W" and args.paths == ["scratch", "miniend_e"] and args.steps == 9
  assert args.size == "gpu" and args.seeds == 3 and args.no_finetune_teacher
  defaults = parser.parse_args([])
  assert defaults.workdir == quickstart.DEFAULT_WORKDIR and defaults.size == "cpu"
  assert quickstart.run_from_args(args, ["TrainConfig.num_steps = 3"]) == 2
  bad = parser.parse_args(["--workdir", "W", "--paths", "nope"])
  assert quickstart.run_from_args(bad) == 2


def test_preempted_stage_stops_the_pipeline(tmp_path, monkeypatch):
  """SIGTERM inside a stage (the loop saves and returns preempted) ends the quickstart there:
  nothing is built on a half-trained model, and the CLI says how to resume."""
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_train(mode, workdir, **kwargs):
    calls.append((mode, workdir, kwargs["train_config"].num_steps))
    return {"mode": mode, "step": 1, "preempted": True, "train": {}, "eval": {}}

  monkeypatch.setattr(loop, "train", fake_train)
  workdir = tmp_path / "qs"
  with pytest.raises(quickstart.Preempted, match="run the same command again"):
    quickstart.run(str(workdir), verbose=False, compilation_cache=False, **TINY)
  assert calls == [("pretrain", str(workdir / "teacher"), TINY["teacher_steps"])]
  assert not (workdir / "distill").exists()

  import argparse  # pylint: disable=import-outside-toplevel
  args = quickstart.add_arguments(argparse.ArgumentParser()).parse_args(
      ["--workdir", str(workdir), "--paths", "scratch", "--steps", "4", "--teacher_steps", "4",
       "--teacher_preset", TINY["teacher_preset"], "--student_shape", TINY["student_shape"],
       "--finetune_steps", "2", "--batch_size", "8", "--inputs_length", "32",
       "--targets_length", "8", "--eval_examples", "8", "--seeds", "1",
       "--no_compilation_cache"])
  assert quickstart.run_from_args(args) == 1
  assert len(calls) == 2


def test_interrupted_sweep_reruns_only_missing_runs(interrupted, tmp_path):
  """A sweep of the quickstart's own distillation (quickstart_distill.gin at the TINY sizes,
  from the quickstart's teacher), interrupted after its first run, then resumed."""
  workdir = tmp_path / "sweep"
  teacher = os.path.join(interrupted, "teacher")
  gin_files = ["gin_configs/runs/quickstart_distill.gin"]
  steps = TINY["steps"]
  bindings = [f"ModelSetup.teacher = {teacher!r}", f"TrainConfig.num_steps = {steps}",
              f"ModelSetup.student_shape = {TINY['student_shape']!r}",
              "TrainConfig.data_shards = 1", f"TrainConfig.data_dir = {interrupted!r}",
              f"TrainConfig.batch_size = {TINY['batch_size']}",
              f"TrainConfig.inputs_length = {TINY['inputs_length']}",
              f"TrainConfig.targets_length = {TINY['targets_length']}",
              "TrainConfig.eval_every = 0", "TrainConfig.eval_batches = 1",
              "TrainConfig.log_every = 1", "OptimizerConfig.warmup_steps = 1",
              f"OptimizerConfig.total_steps = {steps}",
              # The session's cache (not the sweep's own): the quickstart compiled these.
              f"TrainConfig.compilation_cache_dir = {os.environ['JAX_COMPILATION_CACHE_DIR']!r}"]
  grid = {"train.recipe": ["scratch", "miniend_d"]}
  names = ["recipe=scratch__seed=0", "recipe=scratch__seed=1", "recipe=miniend_d__seed=0",
           "recipe=miniend_d__seed=1"]
  first = workdir / names[0]

  def stop_after_first(record):
    if record.name == names[0]:
      raise _Interrupted()

  with pytest.raises(_Interrupted):
    sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, seeds=2, verbose=False,
                    after_run=stop_after_first)
  assert json.load(open(first / "summary.json"))["step"] == steps
  assert not any((workdir / name / "summary.json").exists() for name in names[1:])
  assert json.load(open(first / "sweep_point.json"))["settings"]["point"] == {
      "train.recipe": "'scratch'", "TrainConfig.seed": "0"}
  config = (first / "distill_config.gin").read_text()
  assert "train.recipe = 'scratch'" in config and "TrainConfig.seed = 0" in config
  first_mtime = os.path.getmtime(first / "summary.json")

  started = []
  result = sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, seeds=2,
                           verbose=False, before_run=lambda record: started.append(record.name))
  assert started == names[1:]
  assert [r["status"] for r in result["runs"]] == ["skipped", "ran", "ran", "ran"]
  assert os.path.getmtime(first / "summary.json") == first_mtime
  summary = json.load(open(workdir / names[3] / "summary.json"))
  assert summary["step"] == steps
  assert "loss/decoder_cross" in summary["train"]  # the miniend_d recipe really ran

  # One table per run (Markdown + CSV), the seeds aggregated per point, one plot.
  with open(result["files"]["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["recipe"], r["seed"], r["state"], r["step"]) for r in rows] == [
      (name, name.split("=")[1].split("__")[0], name[-1], "done", str(steps))
      for name in names]
  assert all(float(r["eval_loss"]) > 0 and float(r["grad_norm_encoder"]) > 0 for r in rows)
  # Seeds change the data and initialisation: the two seeds of a point differ.
  assert rows[0]["eval_loss"] != rows[1]["eval_loss"]
  by_point = {r["recipe"]: r for r in result["summary"]}
  for recipe, members in (("scratch", rows[:2]), ("miniend_d", rows[2:])):
    losses = [float(r["eval_loss"]) for r in members]
    assert by_point[recipe]["seeds"] == 2
    assert by_point[recipe]["eval_loss"] == pytest.approx(np.mean(losses))
    assert by_point[recipe]["eval_loss/std"] == pytest.approx(np.std(losses, ddof=1))
  assert by_point["miniend_d"]["eval_loss/vs_baseline"] in ("better", "worse", "tie")
  with open(result["files"]["summary_csv"], newline="") as f:
    assert [r["recipe"] for r in csv.DictReader(f)] == ["scratch", "miniend_d"]
  markdown = open(result["files"]["markdown"]).read()
  assert "| scratch | 2 |" in markdown and "## Every run" in markdown
  assert f"| {names[2]} | miniend_d | 0 | done | {steps} |" in markdown
  assert_real_png(result["files"]["plot"])
  assert sweep.collect(str(workdir))[2]["run"] == names[2]

  # Nothing is left to do.
  again = []
  third = sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, seeds=2,
                          verbose=False, before_run=lambda record: again.append(record.name))
  assert again == [] and {r["status"] for r in third["runs"]} == {"skipped"}

  # The same directory with other settings is refused before anything runs, not
  # skipped as if its runs had been made with them.
  with pytest.raises(quickstart.StageMismatchError, match=f"num_steps = {steps + 1}"):
    sweep.run_sweep(str(workdir), gin_files, grid, seeds=2, verbose=False,
                    bindings=bindings[:1] + [f"TrainConfig.num_steps = {steps + 1}"]
                    + bindings[2:],
                    before_run=lambda record: again.append(record.name))
  assert again == []
