"""PNG plots of runs: loss curves, encoder / decoder gradient norms, scores.

Used by `miniend quickstart` and `miniend sweep`; also handy on any run
directories. Every figure is drawn with matplotlib's object-oriented API on an
Agg canvas (no pyplot, no global backend change), so it works headless and
inside notebooks alike.

  metrics = {name: read_metrics(f"{run}/logs/train_metrics.jsonl") for ...}
  plot_loss_curves(metrics, "loss_curves.png")
  plot_grad_norms(metrics, "grad_norms.png")      # the paper's stability figure
  plot_scores(rows, ["eval/loss", "accuracy"], "scores.png", label_key="model")

Several seeds of one setting: `mean_curves` gives the step-wise mean and
standard deviation of their series; pass the means as the runs and the
deviations as `spread=` to draw bands. `plot_scores` draws a row's
`<column>/std` as an error bar, and a `<column>/vs_baseline` verdict as a mark.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Sequence

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)], sorted by step


def read_metrics(path: str) -> Series:
  """Reads a `logs/train_metrics.jsonl` into {metric: [(step, value), ...]}.

  Lines repeated by a resumed run (the steps after its last checkpoint are
  trained and logged again) are de-duplicated: the last value of a step wins.
  A missing file gives {}. `path` may be local or gs://.
  """
  values: dict[str, dict[int, float]] = {}
  if not epath.Path(path).exists():
    return {}
  for line in epath.Path(path).read_text().splitlines():
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


def mean_curves(runs: Sequence[Series]) -> tuple[Series, Series]:
  """Step-wise mean and sample standard deviation (ddof=1) of several runs' series.

  A metric's points are the steps that every run which logged it has; with a
  single run the deviation is empty.
  """
  mean: Series = {}
  std: Series = {}
  for key in dict.fromkeys(k for series in runs for k in series):
    columns = [dict(series[key]) for series in runs if key in series]
    steps = sorted(set.intersection(*(set(c) for c in columns)))
    points = [(step, [c[step] for c in columns]) for step in steps]
    mean[key] = [(step, sum(vs) / len(vs)) for step, vs in points]
    if len(columns) > 1:
      std[key] = [(step, math.sqrt(sum((v - m) ** 2 for v in vs) / (len(vs) - 1)))
                  for (step, vs), (_, m) in zip(points, mean[key])]
  return mean, std


def _new_figure(ncols: int, nrows: int = 1, width: float = 5.2, height: float = 3.8) -> Figure:
  fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG to `path` (local or gs://)."""
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(png.getvalue())
  return path


def _finite_positive(points):
  return [(s, v) for s, v in points if math.isfinite(v) and v > 0]


def _plot_curves(ax, runs: Mapping[str, Series], key: str, title: str, ylabel: str,
                 log: bool = True, spread: Mapping[str, Series] | None = None) -> bool:
  """Draws `key` of every run on `ax` (with a band of +- `spread[run][key]` where given);
  returns whether anything was drawn."""
  drawn = False
  for name, series in runs.items():
    points = series.get(key, [])
    points = _finite_positive(points) if log else [(s, v) for s, v in points if math.isfinite(v)]
    if not points:
      continue
    steps, values = zip(*points)
    line, = ax.plot(steps, values, label=name, marker="o" if len(points) < 4 else None,
                    linewidth=1.4)
    deviation = dict((spread or {}).get(name, {}).get(key, []))
    band = [(s, v, deviation[s]) for s, v in points if math.isfinite(deviation.get(s, math.nan))]
    if band:
      b_steps, b_values, b_devs = zip(*band)
      low = [v - d for v, d in zip(b_values, b_devs)]
      if log:  # keep the band on the axis
        low = [max(x, v * 0.05) for x, v in zip(low, b_values)]
      ax.fill_between(b_steps, low, [v + d for v, d in zip(b_values, b_devs)],
                      color=line.get_color(), alpha=0.15, linewidth=0)
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
                     spread: Mapping[str, Series] | None = None,
                     title: str = "Training objective and held-out loss per path") -> str:
  """Two panels: each run's training objective (its own recipe's loss) and `eval_key`.

  `references` ({label: value}) are drawn as dashed horizontal lines on the
  second panel (e.g. the teacher's final loss); `spread` as bands.
  """
  fig = _new_figure(2)
  left, right = fig.subplots(1, 2)
  _plot_curves(left, runs, train_key, "training objective (recipe loss)", train_key,
               spread=spread)
  drawn = _plot_curves(right, runs, eval_key, eval_title, eval_key, spread=spread)
  for i, (label, value) in enumerate((references or {}).items()):
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
      right.axhline(value, linestyle="--", color="k", alpha=0.6 - 0.15 * i, label=label)
      drawn = True
  if drawn:
    right.legend(fontsize="small")
  fig.suptitle(title)
  return _save(fig, path)


def plot_grad_norms(runs: Mapping[str, Series], path: str, *,
                    spread: Mapping[str, Series] | None = None,
                    title: str = "Gradient norms per path (encoder vs decoder)") -> str:
  """Encoder and decoder gradient norms per run (the paper's stability diagnostic)."""
  fig = _new_figure(2)
  left, right = fig.subplots(1, 2)
  _plot_curves(left, runs, "grad_norm/encoder", "encoder gradient norm", "grad_norm/encoder",
               spread=spread)
  _plot_curves(right, runs, "grad_norm/decoder", "decoder gradient norm", "grad_norm/decoder",
               spread=spread)
  fig.suptitle(title)
  return _save(fig, path)


_MARKS = {"better": "▲", "worse": "▼"}


def _finite_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bars(rows: Sequence[Mapping[str, Any]], column: str, label_key: str, std_suffix: str,
          verdict_suffix: str | None):
  """[(label, value, std or 0, mark text, row index)] of the rows that have `column`."""
  out = []
  for i, row in enumerate(rows):
    value = row.get(column)
    if _finite_number(value):
      std = row.get(f"{column}{std_suffix}")
      mark = _MARKS.get(row.get(f"{column}{verdict_suffix}"), "") if verdict_suffix else ""
      out.append((str(row.get(label_key, "")), float(value),
                  float(std) if _finite_number(std) else 0.0, mark, i))
  return out


def plot_scores(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str, *,
                label_key: str = "model", titles: Mapping[str, str] | None = None,
                title: str = "Scores per path", max_columns: int = 3,
                std_suffix: str = "/std", verdict_suffix: str | None = None) -> str:
  """One bar panel per column in `columns` (wrapped after `max_columns`), one bar per row
  (missing values left out). A row's `<column><std_suffix>` is drawn as an error bar, its
  `<column><verdict_suffix>` ("better" / "worse") as a mark after the value."""
  titles = dict(titles or {})
  ncols = min(max(len(columns), 1), max_columns)
  nrows = -(-max(len(columns), 1) // ncols)
  fig = _new_figure(ncols, nrows, width=4.4, height=3.9)
  axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
  for ax in axes[len(columns):]:
    ax.set_visible(False)
  for ax, column in zip(axes, columns):
    bars = _bars(rows, column, label_key, std_suffix, verdict_suffix)
    if bars:
      labels, values, stds, marks, index = zip(*bars)
      drawn = ax.bar(range(len(values)), values, color=[f"C{i % 10}" for i in index],
                     yerr=stds if any(stds) else None, capsize=3, ecolor="0.25")
      ax.set_xticks(range(len(values)))
      ax.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
      for bar, value, std, mark in zip(drawn, values, stds, marks):
        ax.annotate(f"{value:.3g}{mark}", (bar.get_x() + bar.get_width() / 2, value + std),
                    ha="center", va="bottom", fontsize="x-small")
      low, high = min(values), max(v + s for v, s in zip(values, stds))
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
               spread: Mapping[str, Series] | None = None, title: str = "Sweep") -> str:
  """Four panels: training objective, `score_key` per row (bars; `<score_key>/std` as error
  bars, a `<score_key>/vs_baseline` verdict as a mark), encoder and decoder gradient norms."""
  fig = _new_figure(2, 2, width=6.0, height=4.2)
  (loss_ax, score_ax), (enc_ax, dec_ax) = fig.subplots(2, 2)
  _plot_curves(loss_ax, runs, "loss", "training objective", "loss", spread=spread)
  _plot_curves(enc_ax, runs, "grad_norm/encoder", "encoder gradient norm", "grad_norm/encoder",
               spread=spread)
  _plot_curves(dec_ax, runs, "grad_norm/decoder", "decoder gradient norm", "grad_norm/decoder",
               spread=spread)
  bars = _bars(rows, score_key, label_key, "/std", "/vs_baseline")
  if bars:
    labels, values, stds, marks, _ = zip(*bars)
    score_ax.barh(range(len(values)), values, color=[f"C{i % 10}" for i in range(len(values))],
                  xerr=stds if any(stds) else None, capsize=3, ecolor="0.25")
    score_ax.set_yticks(range(len(values)))
    score_ax.set_yticklabels(labels, fontsize="x-small")
    score_ax.invert_yaxis()
    for i, (value, std, mark) in enumerate(zip(values, stds, marks)):
      score_ax.annotate(f"{value:.4g}{mark}", (value + std, i), va="center", fontsize="x-small")
    score_ax.grid(True, axis="x", alpha=0.3)
  else:
    score_ax.text(0.5, 0.5, f"no '{score_key}' yet", ha="center", va="center",
                  transform=score_ax.transAxes)
  score_ax.set_title(f"{score_key} per run")
  fig.suptitle(title)
  return _save(fig, path)
