"""Seeds to numbers: mean / std against numpy, the "better than scratch" rule, the table."""

import math

import numpy as np
import pytest

from miniend_jax.cli import plots
from miniend_jax.quickstart import results, stats

# Handmade per-seed numbers: three seeds of three paths.
SCRATCH_LOSS = [4.0, 4.2, 4.1]      # mean 4.1, std 0.1
FAR_BETTER_LOSS = [3.5, 3.6, 3.4]   # mean 3.5, std 0.1: 0.6 below, spread 0.2 -> better
NEAR_LOSS = [3.95, 4.05, 3.9]       # mean 3.967: 0.133 below, spread 0.1 + 0.076 -> tie
SCRATCH_ACC = [20.0, 30.0, 25.0]    # mean 25, std 5
HIGH_ACC = [40.0, 41.0, 42.0]       # mean 41, std 1: 16 above, spread 6 -> better
LOW_ACC = [10.0, 12.0, 11.0]        # mean 11, std 1: 14 below, spread 6 -> worse


def test_spread_matches_numpy():
  for values in (SCRATCH_LOSS, FAR_BETTER_LOSS, NEAR_LOSS, [1.0, 2.0], [0.1, 0.7, 0.2, 0.9]):
    sp = stats.spread(values)
    assert sp.n == len(values)
    assert sp.mean == pytest.approx(np.mean(values), abs=1e-12)
    assert sp.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
  # Missing and non-finite values are left out; one value has no spread; none has no mean.
  sp = stats.spread([1.0, float("nan"), None, 3.0, float("inf")])
  assert (sp.mean, sp.n) == (2.0, 2) and sp.std == pytest.approx(np.std([1, 3], ddof=1))
  assert stats.spread([5.0]).n == 1 and math.isnan(stats.spread([5.0]).std)
  assert stats.spread([]).n == 0 and math.isnan(stats.spread([]).mean)


def test_better_only_beyond_the_spread():
  scratch = stats.spread(SCRATCH_LOSS)
  assert stats.compare(stats.spread(FAR_BETTER_LOSS), scratch, higher_is_better=False) == "better"
  assert stats.compare(stats.spread(NEAR_LOSS), scratch, higher_is_better=False) == "tie"
  # The rule: |mean difference| > std_path + std_scratch (numpy, ddof=1), on the better side.
  for path, verdict in ((FAR_BETTER_LOSS, "better"), (NEAR_LOSS, "tie")):
    gain = np.mean(SCRATCH_LOSS) - np.mean(path)
    margin = np.std(path, ddof=1) + np.std(SCRATCH_LOSS, ddof=1)
    assert (gain > margin) == (verdict == "better")
  scratch_acc = stats.spread(SCRATCH_ACC)
  assert stats.compare(stats.spread(HIGH_ACC), scratch_acc, higher_is_better=True) == "better"
  assert stats.compare(stats.spread(LOW_ACC), scratch_acc, higher_is_better=True) == "worse"
  # The same numbers read as a loss swap the verdicts.
  assert stats.compare(stats.spread(HIGH_ACC), scratch_acc, higher_is_better=False) == "worse"
  # A difference just inside the summed spread is a tie, just outside it is not.
  base = stats.Spread(10.0, 1.0, 3)
  assert stats.compare(stats.Spread(12.0, 1.0, 3), base, True) == "tie"
  assert stats.compare(stats.Spread(12.01, 1.0, 3), base, True) == "better"
  # One seed on either side: no spread, no verdict (however large the difference).
  assert stats.compare(stats.spread([1.0]), scratch, higher_is_better=False) == "n/a"
  assert stats.compare(stats.spread(FAR_BETTER_LOSS), stats.spread([9.0]), False) == "n/a"


def test_direction_of_metrics():
  assert stats.direction("heldout_sc_loss") is False
  assert stats.direction("pydoc_topic/val_loss") is False
  assert stats.direction("eval_loss") is False
  assert stats.direction("pydoc_topic/accuracy") is True
  assert stats.direction("pydoc_summary/rougeLsum") is True
  assert stats.direction("heldout_sc_token_accuracy") is True
  assert stats.direction("grad_norm_encoder_max") is None
  assert stats.direction("steps_per_s") is None


def _per_seed():
  rows = []
  for model, losses, accs in (("scratch", SCRATCH_LOSS, SCRATCH_ACC),
                              ("miniend_d", FAR_BETTER_LOSS, HIGH_ACC),
                              ("minilm", NEAR_LOSS, LOW_ACC)):
    for seed, (loss, acc) in enumerate(zip(losses, accs)):
      rows.append({"model": model, "seed": seed, "heldout_sc_loss": loss,
                   "pydoc_topic/accuracy": acc, "pydoc_topic/val_loss": 2.0 + seed,
                   "grad_norm_encoder_max": 1.0 + seed})
  rows += [{"model": "teacher", "seed": seed, "heldout_sc_loss": 3.0, "pydoc_topic/accuracy": a,
            "pydoc_topic/val_loss": 1.0} for seed, a in enumerate((50.0, 54.0, 52.0))]
  return rows


def test_model_rows_aggregate_seeds():
  info = {"teacher": {"kind": "teacher", "shape": "T", "params": 100},
          **{m: {"kind": "student", "shape": "S", "params": 10}
             for m in ("scratch", "miniend_d", "minilm")}}
  rows = results.model_rows(_per_seed(), info)
  by = {r["model"]: r for r in rows}
  assert [r["model"] for r in rows] == ["scratch", "miniend_d", "minilm", "teacher"]
  for model, losses, accs in (("scratch", SCRATCH_LOSS, SCRATCH_ACC),
                              ("miniend_d", FAR_BETTER_LOSS, HIGH_ACC),
                              ("minilm", NEAR_LOSS, LOW_ACC)):
    row = by[model]
    assert row["seeds"] == 3 and row["params"] == 10 and row["kind"] == "student"
    assert row["heldout_sc_loss"] == pytest.approx(np.mean(losses))
    assert row["heldout_sc_loss/std"] == pytest.approx(np.std(losses, ddof=1))
    assert row["pydoc_topic/accuracy"] == pytest.approx(np.mean(accs))
    assert row["pydoc_topic/accuracy/std"] == pytest.approx(np.std(accs, ddof=1))
    assert row["pydoc_topic/val_loss/n"] == 3
  assert by["miniend_d"]["heldout_sc_loss/vs_baseline"] == "better"
  assert by["miniend_d"]["pydoc_topic/accuracy/vs_baseline"] == "better"
  assert by["minilm"]["heldout_sc_loss/vs_baseline"] == "tie"
  assert by["minilm"]["pydoc_topic/accuracy/vs_baseline"] == "worse"
  assert by["minilm"]["pydoc_topic/val_loss/vs_baseline"] == "tie"  # equal numbers
  assert "grad_norm_encoder_max/vs_baseline" not in by["minilm"]  # no direction
  assert "heldout_sc_loss/vs_baseline" not in by["scratch"]  # the baseline itself
  assert "heldout_sc_loss/vs_baseline" not in by["teacher"]  # a reference, not compared
  assert by["teacher"]["pydoc_topic/accuracy/std"] == pytest.approx(2.0)

  table = results.format_table(rows, ["pydoc_topic"], {"pydoc_topic": 150})
  lines = table.splitlines()
  assert "pydoc_topic accuracy (n=150)" in lines[0] and "pydoc_topic val loss |" in lines[0]
  assert lines[2].startswith("| scratch (S) | 3 | 10 |")
  assert "| 3.500 ± 0.100 ▲ |" in lines[3] and "| 41.00 ± 1.00 ▲ |" in lines[3]
  assert "| 11.00 ± 1.00 ▼ |" in lines[4] and "▲" not in lines[4]
  summary = results.verdict_summary(rows, ["pydoc_topic"])
  assert summary == [
      "miniend_d: better than scratch on held-out SC loss, pydoc_topic accuracy",
      "minilm: worse than scratch on pydoc_topic accuracy"]
  # One seed: means only, no marks.
  single = results.model_rows([r for r in _per_seed() if r["seed"] == 0], info)
  text = results.format_table(single, ["pydoc_topic"])
  assert "±" not in text and "▲" not in text and "▼" not in text


def test_mean_curves_against_numpy():
  runs = [{"loss": [(0, 1.0), (10, 0.5), (20, 0.4)], "only_a": [(0, 1.0)]},
          {"loss": [(0, 3.0), (10, 0.7)]},
          {"loss": [(0, 2.0), (10, 0.9), (20, 0.2)]}]
  mean, std = plots.mean_curves(runs)
  assert [s for s, _ in mean["loss"]] == [0, 10]  # the steps every run logged
  assert [v for _, v in mean["loss"]] == pytest.approx([2.0, 0.7])
  assert [v for _, v in std["loss"]] == pytest.approx(
      [np.std([1, 3, 2], ddof=1), np.std([0.5, 0.7, 0.9], ddof=1)])
  assert mean["only_a"] == [(0, 1.0)] and "only_a" not in std
