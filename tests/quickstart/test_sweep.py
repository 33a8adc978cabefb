"""`miniend sweep`: grid parsing, run names, and an interrupted sweep resumed."""

import csv
import json
import os

import pytest

from miniend_jax import quickstart, sweep
from tests.quickstart.conftest import assert_real_png


def test_parse_sweep_values_and_names():
  assert sweep.split_values("a,b,[1, 2],'x,y',@F(),(1,2)") == [
      "a", "b", "[1, 2]", "'x,y'", "@F()", "(1,2)"]
  with pytest.raises(sweep.SweepError, match="Unbalanced"):
    sweep.split_values("[1,2")
  with pytest.raises(sweep.SweepError, match="Empty value"):
    sweep.split_values("a,,b")
  grid = sweep.parse_sweep(["train.recipe=scratch,'miniend_d'",
                            "ModelSetup.student_shape=1L-32H,2L-64H",
                            "miniend_e_interpolated/LinearRamp.end_step=0,1000"])
  assert grid == {"train.recipe": ["'scratch'", "'miniend_d'"],
                  "ModelSetup.student_shape": ["'1L-32H'", "'2L-64H'"],
                  "miniend_e_interpolated/LinearRamp.end_step": ["0", "1000"]}
  points = sweep.grid_points(grid)
  assert len(points) == 8
  assert points[0] == {"train.recipe": "'scratch'", "ModelSetup.student_shape": "'1L-32H'",
                       "miniend_e_interpolated/LinearRamp.end_step": "0"}
  names = sweep.run_names(points)
  assert names[0] == "recipe=scratch__student_shape=1L-32H__end_step=0"
  assert len(set(names)) == 8
  # Colliding short names fall back to the full binding names.
  clash = sweep.run_names(sweep.grid_points({"a/Term.weight": ["1"], "b/Term.weight": ["2"]}))
  assert clash == ["a_Term.weight=1__b_Term.weight=2"]
  for bad in (["train.recipe"], ["=a,b"], ["x=1", "x=2"], ["x=1,1"]):
    with pytest.raises(sweep.SweepError):
      sweep.parse_sweep(bad)


def test_swept_schedule_reaches_the_recipe():
  from miniend_jax.distill import recipe as recipe_lib  # pylint: disable=import-outside-toplevel
  grid = sweep.parse_sweep(["miniend_e_interpolated/LinearRamp.end_step=0,2500"])
  point = sweep.grid_points(grid)[1]
  sweep._configure(["gin_configs/recipes/miniend_e_interpolated.gin"],  # pylint: disable=protected-access
                   sweep._point_bindings(point))  # pylint: disable=protected-access
  recipe = recipe_lib.recipe_from_gin()
  assert recipe.name == "miniend_e_interpolated"
  assert {t.interpolation.end_step for t in recipe.terms} == {2500}


class _Interrupted(Exception):
  pass


def test_interrupted_sweep_reruns_only_missing_runs(tmp_path, compilation_cache_dir):
  del compilation_cache_dir
  from miniend_jax.train import checkpoints, loop, state as state_lib  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "sweep"
  teacher = str(tmp_path / "teacher")
  loop.train("pretrain", teacher,
             train_config=loop.TrainConfig(num_steps=2, batch_size=8, inputs_length=32,
                                           targets_length=8, eval_batches=1, log_every=1,
                                           data_dir=str(workdir)),
             model=loop.ModelSetup(preset="t5-v1_1-tiny"),
             optimizer=state_lib.OptimizerConfig(learning_rate=1e-3),
             checkpoint=checkpoints.CheckpointConfig(max_to_keep=1), progress=False)
  gin_files = ["gin_configs/runs/quickstart_distill.gin"]
  bindings = [f"ModelSetup.teacher = {teacher!r}", "TrainConfig.num_steps = 3",
              "TrainConfig.batch_size = 8", "TrainConfig.inputs_length = 32",
              "TrainConfig.targets_length = 8", "TrainConfig.eval_every = 0",
              "TrainConfig.eval_batches = 1", "TrainConfig.log_every = 1",
              "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.total_steps = 3"]
  grid = {"train.recipe": ["scratch", "miniend_d"]}
  first = workdir / "recipe=scratch"
  second = workdir / "recipe=miniend_d"

  def stop_after_first(record):
    if record.name == "recipe=scratch":
      raise _Interrupted()

  with pytest.raises(_Interrupted):
    sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, verbose=False,
                    after_run=stop_after_first)
  assert json.load(open(first / "summary.json"))["step"] == 3
  assert not (second / "summary.json").exists()
  assert json.load(open(first / "sweep_point.json"))["settings"]["point"] == {
      "train.recipe": "'scratch'"}
  assert "train.recipe = 'scratch'" in (first / "distill_config.gin").read_text()
  first_mtime = os.path.getmtime(first / "summary.json")

  started = []
  result = sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, verbose=False,
                           before_run=lambda record: started.append(record.name))
  assert started == ["recipe=miniend_d"]
  assert [r["status"] for r in result["runs"]] == ["skipped", "ran"]
  assert os.path.getmtime(first / "summary.json") == first_mtime
  summary = json.load(open(second / "summary.json"))
  assert summary["step"] == 3
  assert "loss/decoder_cross" in summary["train"]  # the miniend_d recipe really ran

  # One table (Markdown + CSV) and one plot for the whole grid.
  with open(result["files"]["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["recipe"], r["state"], r["step"]) for r in rows] == [
      ("recipe=scratch", "scratch", "done", "3"), ("recipe=miniend_d", "miniend_d", "done", "3")]
  assert all(float(r["eval_loss"]) > 0 and float(r["grad_norm_encoder"]) > 0 for r in rows)
  markdown = open(result["files"]["markdown"]).read()
  assert "| recipe=miniend_d | miniend_d | done | 3 |" in markdown
  assert_real_png(result["files"]["plot"])
  assert sweep.collect(str(workdir))[1]["run"] == "recipe=miniend_d"

  # Nothing is left to do.
  again = []
  third = sweep.run_sweep(str(workdir), gin_files, grid, bindings=bindings, verbose=False,
                          before_run=lambda record: again.append(record.name))
  assert again == [] and [r["status"] for r in third["runs"]] == ["skipped", "skipped"]

  # The same directory with other settings is refused before anything runs, not
  # skipped as if its runs had been made with them.
  with pytest.raises(quickstart.StageMismatchError, match="num_steps = 4"):
    sweep.run_sweep(str(workdir), gin_files, grid, verbose=False,
                    bindings=bindings[:1] + ["TrainConfig.num_steps = 4"] + bindings[2:],
                    before_run=lambda record: again.append(record.name))
  assert again == []


def test_sweep_flags_and_max_runs(tmp_path):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = sweep.add_arguments(argparse.ArgumentParser())
  args = parser.parse_args(["--workdir", str(tmp_path), "--sweep", "train.recipe=a,b",
                            "--gin_file", "x.gin", "--max_runs", "1", "--teacher", "T"])
  assert args.sweep == ["train.recipe=a,b"] and args.max_runs == 1 and args.mode == "distill"
  # A configuration error is reported before anything runs.
  bad = parser.parse_args(["--workdir", str(tmp_path / "w"),
                           "--sweep", "TrainConfig.no_such_field=1,2"])
  assert sweep.run_from_args(bad, []) == 2
  assert not (tmp_path / "w" / "no_such_field=1").exists()
