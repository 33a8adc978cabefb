"""scripts/collect_glue_table.py / miniend_jax.cli.report: the paper's GLUE table."""

import json
import os
import subprocess
import sys

import pytest

from miniend_jax.cli import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FULL = {
    "glue_sst2": {"accuracy": 90.0},
    "glue_mrpc": {"f1": 88.0, "accuracy": 84.0},
    "glue_stsb": {"pearson_corrcoef": 86.0, "spearman_corrcoef": 85.0},
    "glue_qqp": {"f1": 87.0, "accuracy": 90.0},
    "glue_mnli_matched": {"accuracy": 80.0},
    "glue_mnli_mismatched": {"accuracy": 81.0},
    "glue_qnli": {"accuracy": 88.0},
    "glue_rte": {"accuracy": 70.0},
}


def _write(root, model, task, metrics, run=None):
  directory = os.path.join(root, model, run or task, "eval")
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{task}.json"), "w") as f:
    json.dump({task: metrics}, f)


def test_collect_glue_table(tmp_path):
  root = str(tmp_path)
  for task, metrics in FULL.items():
    run = "glue_mnli" if task.startswith("glue_mnli") else task
    _write(root, "student_miniend_d", task, metrics, run)
  # A second model with MNLI scored only through glue_mnli (matched) and no RTE yet.
  for task, metrics in FULL.items():
    if task in ("glue_rte", "glue_mnli_matched"):
      continue
    _write(root, "student_scratch", task, {k: v - 1 for k, v in metrics.items()})
  _write(root, "student_scratch", "glue_mnli", {"accuracy": 79.5})
  os.makedirs(os.path.join(root, "not_a_model"))

  rows = report.collect(root)
  assert [r["model"] for r in rows] == ["student_miniend_d", "student_scratch"]
  d, s = rows
  assert d["SST-2"] == 90.0 and d["MRPC"] == 86.0 and d["STS-B"] == 85.5
  assert d["QQP"] == 88.5 and d["MNLI-m"] == 80.0 and d["MNLI-mm"] == 81.0
  assert d["GLUE"] == pytest.approx((90 + 86 + 85.5 + 88.5 + 80 + 81 + 88 + 70) / 8)
  assert s["MNLI-m"] == 79.5 and s["RTE"] is None and s["GLUE"] is None
  markdown = report.format_markdown(rows)
  lines = markdown.splitlines()
  assert lines[0] == ("| model | SST-2 | MRPC | STS-B | QQP | MNLI-m | MNLI-mm | QNLI | RTE "
                      "| GLUE |")
  assert lines[2].startswith("| student_miniend_d | 90.0 | 86.0 | 85.5 | 88.5 | 80.0 | 81.0 |")
  assert lines[3].endswith("| - | - |")

  out_csv = tmp_path / "table.csv"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "collect_glue_table.py"), root,
       "--models", "student_scratch,student_miniend_d", "--csv", str(out_csv)],
      capture_output=True, text=True, check=True, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.stdout.splitlines()[2].startswith("| student_scratch |")
  assert out_csv.read_text().splitlines()[0] == (
      "model,SST-2,MRPC,STS-B,QQP,MNLI-m,MNLI-mm,QNLI,RTE,GLUE")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert report.main([str(empty)]) == 1
