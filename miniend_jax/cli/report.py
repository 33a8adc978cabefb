"""Collects finetuned GLUE scores into the paper's table layout.

Expected layout (what `gin_configs/runs/paper_finetune_glue.gin` documents):

  ROOT/<model>/<run>/eval/glue_<task>.json     written by `miniend evaluate`

e.g. ROOT/t5base_6L384H_miniend_d/glue_mnli/eval/glue_mnli_mismatched.json. Any
depth under <model> works: every `eval/glue_*.json` below it counts (ROOT may be
gs://...). Columns, GLUE dev sets, each x100:

  SST-2 accuracy | MRPC mean(F1, accuracy) | STS-B mean(Pearson, Spearman) |
  QQP mean(F1, accuracy) | MNLI-m accuracy | MNLI-mm accuracy | QNLI accuracy |
  RTE accuracy | GLUE = mean of those 8 columns (only when all are present)

MNLI-m is read from glue_mnli_matched.json, or else glue_mnli.json (whose
validation split is the matched one).

  python scripts/collect_glue_table.py ROOT [--csv out.csv] [--models a,b]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Mapping, Sequence

from etils import epath

# (column, [(eval task, [metrics averaged])] tried in order).
COLUMNS: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    ("SST-2", (("glue_sst2", ("accuracy",)),)),
    ("MRPC", (("glue_mrpc", ("f1", "accuracy")),)),
    ("STS-B", (("glue_stsb", ("pearson_corrcoef", "spearman_corrcoef")),)),
    ("QQP", (("glue_qqp", ("f1", "accuracy")),)),
    ("MNLI-m", (("glue_mnli_matched", ("accuracy",)), ("glue_mnli", ("accuracy",)))),
    ("MNLI-mm", (("glue_mnli_mismatched", ("accuracy",)),)),
    ("QNLI", (("glue_qnli", ("accuracy",)),)),
    ("RTE", (("glue_rte", ("accuracy",)),)),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS) + ("GLUE",)


# Paths are local or gs:// (etils.epath).


def _list_dirs(root: str) -> list[str]:
  return sorted(p.name for p in epath.Path(root).iterdir() if p.is_dir())


def _eval_files(model_dir: str) -> list[str]:
  out = []
  for dirpath, _, filenames in epath.Path(model_dir).walk():
    if dirpath.name == "eval":
      out += [os.fspath(dirpath / f) for f in filenames
              if f.startswith("glue") and f.endswith(".json")]
  return sorted(out)


def _read(path: str) -> dict:
  return json.loads(epath.Path(path).read_text())


def model_scores(model_dir: str) -> dict[str, dict[str, float]]:
  """{eval task: {metric: value}} from every eval/glue_*.json under `model_dir`."""
  scores: dict[str, dict[str, float]] = {}
  for path in _eval_files(model_dir):
    try:
      results = _read(path)
    except (OSError, json.JSONDecodeError):
      continue
    for task, metrics in results.items():
      if isinstance(metrics, Mapping):
        scores.setdefault(task, {}).update(
            {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
  return scores


def table_row(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
  """The paper's columns from {eval task: {metric: value}} (None where missing)."""
  row: dict[str, float | None] = {}
  for column, sources in COLUMNS:
    row[column] = None
    for task, metrics in sources:
      values = [scores.get(task, {}).get(m) for m in metrics]
      if values and all(isinstance(v, float) and math.isfinite(v) for v in values):
        row[column] = sum(values) / len(values)
        break
  present = [row[c] for c, _ in COLUMNS]
  row["GLUE"] = sum(present) / len(present) if all(v is not None for v in present) else None
  return row


def collect(root: str, models: Sequence[str] | None = None) -> list[dict]:
  """One row per model directory under `root` that has GLUE eval files."""
  rows = []
  for model in (models or _list_dirs(root)):
    scores = model_scores(os.path.join(root, model))
    if scores or models:
      rows.append({"model": model, **table_row(scores)})
  return rows


def format_markdown(rows: Sequence[Mapping[str, object]]) -> str:
  header = ("model",) + COLUMN_NAMES
  lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(COLUMN_NAMES) + "|"]
  for row in rows:
    cells = [str(row["model"])] + [
        "-" if row.get(c) is None else f"{row[c]:.1f}" for c in COLUMN_NAMES]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def format_csv(rows: Sequence[Mapping[str, object]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=("model",) + COLUMN_NAMES)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else row.get(k)
                     for k in ("model",) + COLUMN_NAMES})
  return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="collect_glue_table",
      description="Collect finetuned GLUE dev scores (ROOT/<model>/**/eval/glue_*.json) into "
                  "the paper's table: SST-2, MRPC, STS-B, QQP, MNLI-m/mm, QNLI, RTE, GLUE.")
  parser.add_argument("root", help="directory (or gs://...) with one sub-directory per model")
  parser.add_argument("--models", help="comma-separated model directories, in table order")
  parser.add_argument("--csv", help="also write the table as CSV to this path")
  args = parser.parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
  rows = collect(args.root, models)
  if not rows:
    print(f"No eval/glue_*.json files under {args.root}/<model>/.", file=sys.stderr)
    return 1
  print(format_markdown(rows))
  print("\nMRPC and QQP: mean of F1 and accuracy; STS-B: mean of Pearson and Spearman; "
        "GLUE: mean of the 8 columns.")
  if args.csv:
    epath.Path(args.csv).write_text(format_csv(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
