"""`miniend quickstart` end to end on a tiny setting: stages, resume, seeds, table, CSV, plots."""

import contextlib
import csv
import io
import json
import math
import os

import numpy as np
import pytest

from miniend_jax import quickstart
from tests.quickstart.conftest import TINY, assert_real_png


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


def test_quickstart_runs_resumes_and_reports(tmp_path, compilation_cache_dir):
  del compilation_cache_dir  # only its side effect
  workdir = str(tmp_path / "qs")

  # 1. Interrupted right after the first student finished distilling.
  def interrupt(name, status):
    if name == "distill scratch seed 0" and status == "ran":
      raise _Interrupted()

  with pytest.raises(_Interrupted):
    quickstart.run(workdir, verbose=False, on_stage=interrupt, **TINY)
  assert quickstart.run_finished(os.path.join(workdir, "teacher"), TINY["teacher_steps"])
  assert quickstart.run_finished(os.path.join(workdir, "distill", "scratch", "seed0"),
                                 TINY["steps"])
  assert not os.path.exists(os.path.join(workdir, "distill", "miniend_d", "seed0",
                                         "summary.json"))
  before = _mtimes(workdir)

  # 2. The re-run skips what is finished and does the rest.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = quickstart.run(workdir, **TINY)
  status = {name: s for name, s, _ in result["stages"]}
  assert status["data"] == "skipped"
  assert status["teacher"] == "skipped"
  assert status["distill scratch seed 0"] == "skipped"
  assert status["distill miniend_d seed 0"] == "ran"
  for model in ("teacher", "scratch", "miniend_d"):
    for task in ("pydoc_summary", "pydoc_topic"):
      assert status[f"finetune {model} seed 0 on {task}"] == "ran"
      assert status[f"evaluate {model} seed 0 on {task}"] == "ran"
  assert status["speed"] == "ran"
  after = _mtimes(workdir)
  for path, mtime in before.items():
    assert after[path] == mtime, f"{path} was rewritten"
  printed = out.getvalue()
  assert result["table"] in printed
  assert "finished in" in printed
  _check_results(result, workdir)

  # 3. A third run does nothing but report, with the same numbers.
  third = quickstart.run(workdir, verbose=False, **TINY)
  assert {s for _, s, _ in third["stages"]} == {"skipped"}
  assert _mtimes(workdir) == after
  assert third["table"] == result["table"]

  # 4. A lost result is redone alone.
  os.remove(os.path.join(workdir, "finetune", "miniend_d", "seed0", "pydoc_topic", "eval",
                         "pydoc_topic.json"))
  fourth = quickstart.run(workdir, verbose=False, **TINY)
  ran = [name for name, s, _ in fourth["stages"] if s == "ran"]
  assert ran == ["evaluate miniend_d seed 0 on pydoc_topic"]
  assert fourth["rows"][2]["pydoc_topic/accuracy"] == pytest.approx(
      result["rows"][2]["pydoc_topic/accuracy"])
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
