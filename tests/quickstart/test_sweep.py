"""`miniend sweep`: grid parsing, run names, seeds, flags. The interrupted sweep resumed is in
test_quickstart.py, where it distils from the quickstart test's teacher with its programs."""

import numpy as np
import pytest

from miniend_jax.cli import sweep


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


def test_seed_axis_and_summary_on_handmade_numbers():
  grid = sweep.with_seeds({"train.recipe": ["'scratch'", "'miniend_d'", "'minilm'"],
                           "ModelSetup.student_shape": ["'2L-64H'"]}, 3)
  assert grid["TrainConfig.seed"] == ["0", "1", "2"] and list(grid)[-1] == "TrainConfig.seed"
  assert sweep.with_seeds({"a": ["1"]}, 1) == {"a": ["1"]}
  with pytest.raises(sweep.SweepError, match="both choose seeds"):
    sweep.with_seeds({"TrainConfig.seed": ["1", "2"]}, 2)
  with pytest.raises(sweep.SweepError):
    sweep.with_seeds({}, 0)
  baseline = sweep.default_baseline(grid)
  assert baseline == {"train.recipe": "'scratch'"}
  assert sweep.default_baseline({"train.recipe": ["'kd_logits'"]}) is None
  names = sweep.run_names(sweep.grid_points(grid))
  assert names[:3] == ["recipe=scratch__student_shape=2L-64H__seed=0",
                       "recipe=scratch__student_shape=2L-64H__seed=1",
                       "recipe=scratch__student_shape=2L-64H__seed=2"]
  losses = {"scratch": [4.0, 4.2, 4.1], "miniend_d": [3.5, 3.6, 3.4], "minilm": [4.6, 4.5, 4.7]}
  rows = [{"run": f"r{recipe}{seed}", "recipe": recipe, "student_shape": "2L-64H",
           "seed": str(seed), "state": "done", "step": 3, "eval_loss": loss,
           "grad_norm_encoder": 1.0 + seed}
          for recipe, values in losses.items() for seed, loss in enumerate(values)]
  summary = sweep.summarize(rows, grid, baseline)
  assert [r["recipe"] for r in summary] == ["scratch", "miniend_d", "minilm"]
  for row in summary:
    values = losses[row["recipe"]]
    assert row["seeds"] == 3 and row["student_shape"] == "2L-64H" and "seed" not in row
    assert row["eval_loss"] == pytest.approx(np.mean(values))
    assert row["eval_loss/std"] == pytest.approx(np.std(values, ddof=1))
    assert "step/std" not in row and "grad_norm_encoder/vs_baseline" not in row
  assert [r.get("eval_loss/vs_baseline") for r in summary] == [None, "better", "worse"]
  table = sweep.format_summary(summary, grid)
  assert table.splitlines()[0].startswith("| recipe | student_shape | seeds | eval_loss |")
  assert "| miniend_d | 2L-64H | 3 | 3.5 ± 0.1 ▲ |" in table
  assert sweep.summarize(rows, {"train.recipe": ["'scratch'"]}) == []  # no seed axis


def test_sweep_flags_and_max_runs(tmp_path):
  import argparse  # pylint: disable=import-outside-toplevel
  parser = sweep.add_arguments(argparse.ArgumentParser())
  args = parser.parse_args(["--workdir", str(tmp_path), "--sweep", "train.recipe=a,b",
                            "--gin_file", "x.gin", "--max_runs", "1", "--teacher", "T",
                            "--seeds", "3", "--baseline", "train.recipe=a"])
  assert args.sweep == ["train.recipe=a,b"] and args.max_runs == 1 and args.mode == "distill"
  assert args.seeds == 3 and args.baseline == "train.recipe=a"
  assert parser.parse_args(["--workdir", "W"]).seeds == 1
  # A baseline that is not a point of the grid, or --seeds with a swept seed, stops early.
  for flags in (["--sweep", "train.recipe=a,b", "--baseline", "train.recipe=c"],
                ["--sweep", "TrainConfig.seed=1,2", "--seeds", "2"],
                ["--baseline", "recipe"]):
    assert sweep.run_from_args(parser.parse_args(["--workdir", str(tmp_path / "v")] + flags),
                               []) == 2
  assert not (tmp_path / "v").exists()
  # A configuration error is reported before anything runs.
  bad = parser.parse_args(["--workdir", str(tmp_path / "w"),
                           "--sweep", "TrainConfig.no_such_field=1,2"])
  assert sweep.run_from_args(bad, []) == 2
  assert not (tmp_path / "w" / "no_such_field=1").exists()
