"""From finished runs to the comparison: per-seed rows, seed aggregates, table, files, plots.

  run_row        one model and seed: held-out span-corruption loss, gradient norms,
                 downstream scores and validation losses
  model_rows     the seeds of every model aggregated (`stats.aggregate`): mean, std,
                 and the verdict against scratch on every metric with a direction
  format_table   the Markdown table (mean ± std, ▲ / ▼ where a path beats / trails scratch)
  write_report   results.{md,csv,json}, results_per_seed.csv and the PNG plots
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath

from miniend_jax.quickstart import stats
from miniend_jax.quickstart.bookkeeping import read_json
from miniend_jax.quickstart.settings import BASELINE, PRIMARY_METRIC, Settings

# Aggregated for every model (besides every downstream metric).
RUN_METRICS = ("heldout_sc_loss", "heldout_sc_token_accuracy", "train_objective_final",
               "grad_norm_encoder_max", "grad_norm_decoder_max")


def _max(points) -> float:
  values = [v for _, v in points or [] if math.isfinite(v)]
  return max(values) if values else float("nan")


def run_row(model: str, seed: int, run_dir: str, finetune_dirs: Mapping[str, str]) -> dict:
  """The numbers of one model (teacher or path) and seed.

  `run_dir` is the model's pretraining / distillation run, `finetune_dirs`
  {task: its finetuning run} (with eval/<task>.json inside).
  """
  from miniend_jax.cli import plots  # pylint: disable=import-outside-toplevel
  summary = read_json(os.path.join(run_dir, "summary.json")) or {}
  metrics = plots.read_metrics(os.path.join(run_dir, "logs", "train_metrics.jsonl"))
  evaluation = summary.get("eval", {})
  row = {
      "model": model, "seed": seed,
      "heldout_sc_loss": evaluation.get("eval/loss", math.nan),
      "heldout_sc_token_accuracy": evaluation.get("eval/token_accuracy", math.nan),
      "train_objective_final": summary.get("train", {}).get("loss", math.nan),
      "grad_norm_encoder_max": _max(metrics.get("grad_norm/encoder")),
      "grad_norm_decoder_max": _max(metrics.get("grad_norm/decoder")),
  }
  for task, directory in finetune_dirs.items():
    scores = (read_json(os.path.join(directory, "eval", f"{task}.json")) or {}).get(task, {})
    for metric, value in sorted(scores.items()):
      row[f"{task}/{metric}"] = value
    # The finetuned model's teacher-forced validation loss: far less noisy than the
    # decoded scores on a few hundred examples.
    ft_summary = read_json(os.path.join(directory, "summary.json")) or {}
    row[f"{task}/val_loss"] = ft_summary.get("eval", {}).get("eval/loss", math.nan)
  return row


def metric_names(per_seed: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every numeric metric of the per-seed rows, in first-seen order."""
  names = dict.fromkeys(RUN_METRICS)
  for row in per_seed:
    for key, value in row.items():
      if key not in ("model", "seed") and isinstance(value, (int, float)):
        names.setdefault(key)
  return list(names)


def model_rows(per_seed: Sequence[Mapping[str, Any]], info: Mapping[str, Mapping[str, Any]],
               baseline: str = BASELINE) -> list[dict]:
  """One row per model: `info[model]` (kind, shape, params, speed) and its seed aggregates.

  Every metric with a direction gets `<metric>/vs_baseline` (`stats.compare`
  against `baseline`'s seeds), students only: the teacher is a reference.
  """
  names = metric_names(per_seed)
  is_teacher = lambda r: info.get(r["model"], {}).get("kind") == "teacher"
  students = [r for r in per_seed if not is_teacher(r)]
  has_baseline = any(r["model"] == baseline for r in students)
  aggregated = {r["model"]: r for r in stats.aggregate(
      students, ["model"], names, baseline={"model": baseline} if has_baseline else None)}
  aggregated.update({r["model"]: r for r in stats.aggregate(
      [r for r in per_seed if is_teacher(r)], ["model"], names)})
  return [{**info.get(model, {}), **aggregated[model]}
          for model in dict.fromkeys(r["model"] for r in per_seed)]


def table_columns(tasks: Sequence[str]) -> list[tuple[str, str, int]]:
  """[(metric key, header, digits)] of the Markdown table."""
  columns = [("heldout_sc_loss", "held-out SC loss", 3)]
  for task in tasks:
    metric = PRIMARY_METRIC.get(task, "")
    columns += [(f"{task}/{metric}", f"{task} {metric}", 2),
                (f"{task}/val_loss", f"{task} val loss", 3)]
  return columns


def _fmt(value, digits: int = 2) -> str:
  if isinstance(value, bool) or value is None:
    return "-"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str],
                 eval_counts: Mapping[str, int | None] | None = None) -> str:
  """The Markdown comparison table: mean ± std over seeds, ▲ / ▼ against scratch."""
  eval_counts = eval_counts or {}
  columns = table_columns(tasks)
  header = ["model", "seeds", "params", "speed-up (measured)", "speed-up (FLOPs)"]
  for key, text, _ in columns:
    task = key.split("/")[0]
    count = eval_counts.get(task)
    decoded = not key.endswith(("val_loss", "heldout_sc_loss"))
    header.append(f"{text} (n={count})" if decoded and count else text)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  for row in rows:
    cells = [f"{row['model']} ({row.get('shape', '?')})", _fmt(row.get("seeds")),
             _fmt(row.get("params")), _fmt(row.get("speedup_measured")) + "x",
             _fmt(row.get("speedup_flops")) + "x"]
    for key, _, digits in columns:
      cells.append(stats.format_spread(row.get(key, math.nan), row.get(f"{key}/std", math.nan),
                                       f".{digits}f", row.get(f"{key}/vs_baseline")))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def verdict_summary(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[str]:
  """'miniend_d: better than scratch on held-out SC loss; worse on ...' per student."""
  out = []
  for row in rows:
    if row.get("kind") == "teacher" or row.get("model") == BASELINE:
      continue
    verdicts: dict[str, list[str]] = {}
    for key, text, _ in table_columns(tasks):
      verdict = row.get(f"{key}/vs_baseline")
      if verdict in (stats.BETTER, stats.WORSE):
        verdicts.setdefault(verdict, []).append(text)
    if verdicts:
      out.append(f"{row['model']}: " + "; ".join(
          f"{v} than {BASELINE} on {', '.join(names)}" for v, names in verdicts.items()))
  return out


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """`rows` as CSV at `path` (local or gs://): every key of any row a column, in
  first-seen order; missing / None empty."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
  epath.Path(path).write_text(text.getvalue())


def write_report(workdir: str, rows: Sequence[Mapping[str, Any]],
                 per_seed: Sequence[Mapping[str, Any]], table: str, notes: Sequence[str],
                 s: Settings, distill_dirs: Mapping[str, Sequence[str]]) -> dict[str, str]:
  """Writes the tables and plots; returns {name: path}.

  `distill_dirs` is {path: [its run directory per seed]}: the curves are
  each path's mean over its seeds, with a band of one standard deviation.
  """
  from miniend_jax.cli import plots  # pylint: disable=import-outside-toplevel
  files = {name: os.path.join(workdir, f"results{suffix}")
           for name, suffix in (("markdown", ".md"), ("csv", ".csv"), ("json", ".json"),
                                ("per_seed_csv", "_per_seed.csv"))}
  with open(files["markdown"], "w", encoding="utf-8") as f:
    f.write("# miniend quickstart results\n\n" + table + "\n\n")
    f.write("".join(f"- {note}\n" for note in notes))
  write_csv(files["csv"], rows)
  write_csv(files["per_seed_csv"], per_seed)
  with open(files["json"], "w", encoding="utf-8") as f:
    json.dump({"rows": list(rows), "per_seed": list(per_seed), "notes": list(notes),
               "settings": {**s.__dict__, "seed_values": list(s.seed_values)}}, f, indent=1)

  curves, bands = {}, {}
  for path, directories in distill_dirs.items():
    series = [plots.read_metrics(os.path.join(d, "logs", "train_metrics.jsonl"))
              for d in directories]
    curves[path], bands[path] = plots.mean_curves(series)
  teacher = next((r for r in rows if r.get("kind") == "teacher"), {})
  seeds = f"mean ± std over {s.seeds} seeds" if s.seeds > 1 else "1 seed"
  files["loss_curves"] = plots.plot_loss_curves(
      curves, os.path.join(workdir, "loss_curves.png"), eval_key="loss/span_corruption",
      eval_title="student span-corruption loss (training batches)", spread=bands,
      references={"teacher (held-out, end)": teacher.get("heldout_sc_loss", math.nan)},
      title=f"{s.student_shape} students, {s.steps} steps ({seeds}): objective and "
            "span-corruption loss")
  files["grad_norms"] = plots.plot_grad_norms(
      curves, os.path.join(workdir, "grad_norms.png"), spread=bands,
      title=f"{s.student_shape} students ({seeds}): encoder vs decoder gradient norms per path")
  columns = [key for key, _, _ in table_columns(s.tasks)]
  titles = {key: f"{text} ({'lower' if stats.direction(key) is False else 'higher'} is better)"
            for key, text, _ in table_columns(s.tasks)}
  files["scores"] = plots.plot_scores(
      rows, columns, os.path.join(workdir, "scores.png"), label_key="model", titles=titles,
      verdict_suffix="/vs_baseline",
      title=f"Teacher and students after finetuning ({seeds}; ▲ / ▼: beats / trails "
            f"{BASELINE} by more than the seeds' spread)")
  return files
