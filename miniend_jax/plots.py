"""PNG plots of runs: loss curves, encoder / decoder gradient norms, scores.

Used by `miniend quickstart` and `miniend sweep`; also handy on any run
directories. Every figure is drawn with matplotlib's object-oriented API on an
Agg canvas (no pyplot, no global backend change), so it works headless and
inside notebooks alike.

  metrics = {name: read_metrics(f"{run}/logs/train_metrics.jsonl") for ...}
  plot_loss_curves(metrics, "loss_curves.png")
  plot_grad_norms(metrics, "grad_norms.png")      # the paper's stability figure
  plot_scores(rows, ["eval/loss", "accuracy"], "scores.png", label_key="model")
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)], sorted by step


def read_metrics(path: str) -> Series:
  """Reads a `logs/train_metrics.jsonl` into {metric: [(step, value), ...]}.

  Lines repeated by a resumed run (the steps after its last checkpoint are
  trained and logged again) are de-duplicated: the last value of a step wins.
  A missing file gives {}.
  """
  values: dict[str, dict[int, float]] = {}
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by an interrupted run
        continue
      if "step" not in record:
        continue
      step = int(record["step"])
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          values.setdefault(key, {})[step] = float(value)
  return {k: sorted(v.items()) for k, v in values.items()}


def _new_figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.8) -> Figure:
  fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def _finite_positive(points):
  return [(s, v) for s, v in points if math.isfinite(v) and v > 0]


def _plot_curves(ax, runs: Mapping[str, Series], key: str, title: str, ylabel: str,
                 log: bool = True) -> bool:
  """Draws `key` of every run on `ax`; returns whether anything was drawn."""
  drawn = False
  for name, series in runs.items():
    points = series.get(key, [])
    points = _finite_positive(points) if log else [(s, v) for s, v in points if math.isfinite(v)]
    if not points:
      continue
    steps, values = zip(*points)
    ax.plot(steps, values, label=name, marker="o" if len(points) < 4 else None, linewidth=1.4)
    drawn = True
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if drawn:
    if log:
      ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
  else:
    ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes)
  return drawn


def plot_loss_curves(runs: Mapping[str, Series], path: str, *, train_key: str = "loss",
                     eval_key: str = "eval/loss",
                     eval_title: str = "held-out span-corruption loss",
                     references: Mapping[str, float] | None = None,
                     title: str = "Training objective and held-out loss per path") -> str:
  """Two panels: each run's training objective (its own recipe's loss) and `eval_key`.

  `references` ({label: value}) are drawn as dashed horizontal lines on the
  second panel (e.g. the teacher's final loss).
  """
  fig = _new_figure(2)
  left, right = fig.subplots(1, 2)
  _plot_curves(left, runs, train_key, "training objective (recipe loss)", train_key)
  drawn = _plot_curves(right, runs, eval_key, eval_title, eval_key)
  for i, (label, value) in enumerate((references or {}).items()):
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
      right.axhline(value, linestyle="--", color="k", alpha=0.6 - 0.15 * i, label=label)
      drawn = True
  if drawn:
    right.legend(fontsize="small")
  fig.suptitle(title)
  return _save(fig, path)


def plot_grad_norms(runs: Mapping[str, Series], path: str, *,
                    title: str = "Gradient norms per path (encoder vs decoder)") -> str:
  """Encoder and decoder gradient norms per run (the paper's stability diagnostic)."""
  fig = _new_figure(2)
  left, right = fig.subplots(1, 2)
  _plot_curves(left, runs, "grad_norm/encoder", "encoder gradient norm", "grad_norm/encoder")
  _plot_curves(right, runs, "grad_norm/decoder", "decoder gradient norm", "grad_norm/decoder")
  fig.suptitle(title)
  return _save(fig, path)


def plot_scores(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str, *,
                label_key: str = "model", titles: Mapping[str, str] | None = None,
                title: str = "Scores per path", max_columns: int = 3) -> str:
  """One bar panel per column in `columns` (wrapped after `max_columns`), one bar per row
  (missing values left out)."""
  titles = dict(titles or {})
  ncols = min(max(len(columns), 1), max_columns)
  nrows = -(-max(len(columns), 1) // ncols)
  fig = _new_figure(ncols, nrows, width=4.4, height=3.9)
  axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
  for ax in axes[len(columns):]:
    ax.set_visible(False)
  colors = [f"C{i % 10}" for i in range(len(rows))]
  for ax, column in zip(axes, columns):
    labels, values, bar_colors = [], [], []
    for row, color in zip(rows, colors):
      value = row.get(column)
      if isinstance(value, (int, float)) and math.isfinite(value):
        labels.append(str(row.get(label_key, "")))
        values.append(float(value))
        bar_colors.append(color)
    if values:
      bars = ax.bar(range(len(values)), values, color=bar_colors)
      ax.set_xticks(range(len(values)))
      ax.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
      for bar, value in zip(bars, values):
        ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize="x-small")
      low, high = min(values), max(values)
      if low >= 0:
        ax.set_ylim(0, high * 1.15 if high > 0 else 1.0)
      ax.grid(True, axis="y", alpha=0.3)
    else:
      ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(titles.get(column, column), fontsize="medium")
  fig.suptitle(title)
  return _save(fig, path)


def plot_sweep(runs: Mapping[str, Series], rows: Sequence[Mapping[str, Any]], path: str, *,
               label_key: str = "run", score_key: str = "eval_loss",
               title: str = "Sweep") -> str:
  """Four panels: training objective, held-out loss per run (bars), encoder and decoder
  gradient norms."""
  fig = _new_figure(2, 2, width=6.0, height=4.2)
  (loss_ax, score_ax), (enc_ax, dec_ax) = fig.subplots(2, 2)
  _plot_curves(loss_ax, runs, "loss", "training objective", "loss")
  _plot_curves(enc_ax, runs, "grad_norm/encoder", "encoder gradient norm", "grad_norm/encoder")
  _plot_curves(dec_ax, runs, "grad_norm/decoder", "decoder gradient norm", "grad_norm/decoder")
  labels, values = [], []
  for row in rows:
    value = row.get(score_key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      labels.append(str(row.get(label_key, "")))
      values.append(float(value))
  if values:
    score_ax.barh(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))])
    score_ax.set_yticks(range(len(values)))
    score_ax.set_yticklabels(labels, fontsize="x-small")
    score_ax.invert_yaxis()
    for i, value in enumerate(values):
      score_ax.annotate(f"{value:.4g}", (value, i), va="center", fontsize="x-small")
    score_ax.grid(True, axis="x", alpha=0.3)
  else:
    score_ax.text(0.5, 0.5, f"no '{score_key}' yet", ha="center", va="center",
                  transform=score_ax.transAxes)
  score_ax.set_title(f"{score_key} per run")
  fig.suptitle(title)
  return _save(fig, path)
