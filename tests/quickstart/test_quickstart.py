"""`miniend quickstart` end to end on a tiny setting: stages, resume, table, CSV, plots."""

import contextlib
import csv
import io
import json
import math
import os

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


def _check_results(result, workdir):
  rows = result["rows"]
  assert [r["model"] for r in rows] == ["teacher", "scratch", "miniend_d"]
  teacher, *students = rows
  for row in rows:
    assert math.isfinite(row["heldout_sc_loss"]) and 0 < row["heldout_sc_loss"] < 20
    assert 0 <= row["pydoc_summary/rougeLsum"] <= 100
    assert 0 <= row["pydoc_topic/accuracy"] <= 100
    assert row["fwd_examples_per_s"] > 0
  assert teacher["speedup_measured"] == pytest.approx(1.0)
  assert teacher["speedup_flops"] == pytest.approx(1.0)
  for student in students:
    assert student["params"] < teacher["params"]
    assert student["speedup_flops"] > 1.5  # 1L-32H vs the 2L-64H teacher
    assert student["speedup_measured"] > 0
    assert student["shape"] == "1L-32H"
  # The held-out loss is the teacher's / student's own pretraining / distillation eval.
  summary = json.load(open(os.path.join(workdir, "distill", "miniend_d", "summary.json")))
  assert rows[2]["heldout_sc_loss"] == pytest.approx(summary["eval"]["eval/loss"])
  assert summary["step"] == TINY["steps"]
  scores = json.load(open(os.path.join(workdir, "finetune", "scratch", "pydoc_topic", "eval",
                                       "pydoc_topic.json")))
  assert rows[1]["pydoc_topic/accuracy"] == pytest.approx(scores["pydoc_topic"]["accuracy"])

  # Markdown and CSV.
  table = result["table"]
  assert table.splitlines()[0].startswith("| model | params | speed-up (measured)")
  assert "held-out SC loss" in table and "pydoc_summary rougeLsum" in table
  assert len(table.splitlines()) == 2 + 3
  markdown = open(result["files"]["markdown"]).read()
  assert table in markdown
  with open(result["files"]["csv"], newline="") as f:
    csv_rows = list(csv.DictReader(f))
  assert [r["model"] for r in csv_rows] == ["teacher", "scratch", "miniend_d"]
  assert float(csv_rows[2]["heldout_sc_loss"]) == pytest.approx(rows[2]["heldout_sc_loss"])
  for key in ("params", "speedup_measured", "speedup_flops", "pydoc_summary/rouge1",
              "pydoc_summary/rougeLsum", "pydoc_topic/accuracy", "grad_norm_encoder_max"):
    assert key in csv_rows[0], key

  # Plots.
  for name in ("loss_curves", "grad_norms", "scores"):
    assert result["files"][name] == os.path.join(workdir, f"{name}.png")
    assert_real_png(result["files"][name])


def test_quickstart_runs_resumes_and_reports(tmp_path, compilation_cache_dir):
  del compilation_cache_dir  # only its side effect
  workdir = str(tmp_path / "qs")

  # 1. Interrupted right after the first student finished distilling.
  def interrupt(name, status):
    if name == "distill scratch" and status == "ran":
      raise _Interrupted()

  with pytest.raises(_Interrupted):
    quickstart.run(workdir, verbose=False, on_stage=interrupt, **TINY)
  assert quickstart.run_finished(os.path.join(workdir, "teacher"), TINY["teacher_steps"])
  assert quickstart.run_finished(os.path.join(workdir, "distill", "scratch"), TINY["steps"])
  assert not os.path.exists(os.path.join(workdir, "distill", "miniend_d", "summary.json"))
  before = _mtimes(workdir)

  # 2. The re-run skips what is finished and does the rest.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    result = quickstart.run(workdir, **TINY)
  status = {name: s for name, s, _ in result["stages"]}
  assert status["data"] == "skipped"
  assert status["teacher"] == "skipped"
  assert status["distill scratch"] == "skipped"
  assert status["distill miniend_d"] == "ran"
  for model in ("teacher", "scratch", "miniend_d"):
    for task in ("pydoc_summary", "pydoc_topic"):
      assert status[f"finetune {model} on {task}"] == "ran"
      assert status[f"evaluate {model} on {task}"] == "ran"
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
  os.remove(os.path.join(workdir, "finetune", "miniend_d", "pydoc_topic", "eval",
                         "pydoc_topic.json"))
  fourth = quickstart.run(workdir, verbose=False, **TINY)
  ran = [name for name, s, _ in fourth["stages"] if s == "ran"]
  assert ran == ["evaluate miniend_d on pydoc_topic"]
  assert fourth["rows"][2]["pydoc_topic/accuracy"] == pytest.approx(
      result["rows"][2]["pydoc_topic/accuracy"])

  # 5. Other settings on the same directory stop with a clear error, before any training.
  settled = _mtimes(workdir)
  with pytest.raises(quickstart.StageMismatchError, match=r"steps: 4 -> 5"):
    quickstart.run(workdir, verbose=False, **{**TINY, "steps": 5})
  assert _mtimes(workdir) == settled
  assert quickstart.run_finished(os.path.join(workdir, "distill", "scratch"), TINY["steps"])


def test_settings_and_flags():
  s = quickstart.make_settings("tiny")
  assert s.paths == quickstart.DEFAULT_PATHS
  assert set(("scratch", "kd_logits", "minilm", "implicit", "miniend_d", "miniend_e")) <= set(
      s.paths)
  assert s.tasks == ("pydoc_summary", "pydoc_topic")
  small = quickstart.make_settings("small", steps=7)
  assert small.steps == 7 and small.teacher_preset == "t5-v1_1-mini"
  with pytest.raises(ValueError, match="Unknown path"):
    quickstart.make_settings("tiny", paths=["scratch", "nope"])
  with pytest.raises(ValueError, match="Unknown quickstart size"):
    quickstart.make_settings("huge")
  with pytest.raises(ValueError, match="positive integer"):
    quickstart.make_settings("tiny", steps=0)

  import argparse  # pylint: disable=import-outside-toplevel
  parser = quickstart.add_arguments(argparse.ArgumentParser())
  args = parser.parse_args(["--workdir", "W", "--paths", "scratch,miniend_e", "--steps", "9",
                            "--size", "small", "--no_finetune_teacher"])
  assert args.workdir == "W" and args.paths == ["scratch", "miniend_e"] and args.steps == 9
  assert args.size == "small" and args.no_finetune_teacher
  assert parser.parse_args([]).workdir == quickstart.DEFAULT_WORKDIR
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
       "--finetune_steps", "2", "--batch_size", "8", "--inputs_length", "32",
       "--targets_length", "8", "--eval_examples", "8", "--no_compilation_cache"])
  assert quickstart.run_from_args(args) == 1
  assert len(calls) == 2
