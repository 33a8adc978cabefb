"""`miniend sweep`: a grid of gin bindings, one resumable run per point, one table.

  miniend sweep --workdir W --gin_file gin_configs/runs/quickstart_distill.gin \\
      --teacher W0/teacher \\
      --sweep train.recipe=scratch,kd_logits,miniend_d \\
      --sweep ModelSetup.student_shape=1L-32H,2L-64H

runs the 3 x 2 grid. Each point is a run of `miniend <mode>` (default distill)
in its own directory, named from its bindings
(`W/recipe=miniend_d__student_shape=2L-64H`), with the gin files, the --gin.*
bindings and the point's bindings applied in that order. A finished run (its
summary.json at TrainConfig.num_steps) is skipped; an interrupted one resumes
from its checkpoint; so re-running the same command after an interruption
completes only the missing runs. The runs share one compilation cache
(`W/compilation_cache`, unless gin sets `TrainConfig.compilation_cache_dir`), so
points with the same shapes compile once. Every run's summary and logged
metrics are collected into `W/sweep_results.{md,csv}` and `W/sweep.png`.

Values: gin literals ('miniend_d', 100, 0.5, [1, 2], @LinearRamp(), %MACRO);
a bare word that is not one (miniend_d, 1L-32H) is taken as a string. Commas
inside brackets or quotes do not split values. Interpolation schedules are
swept like anything else, e.g.
`--sweep miniend_e_interpolated/LinearRamp.end_step=0,1000,10000` with
`--gin_file gin_configs/recipes/miniend_e_interpolated.gin`.

Seeds: `--seeds N` runs every point with `TrainConfig.seed` = 0 .. N-1 (the
last grid axis, `W/<point>__seed=<k>`): the seed fixes the student's
initialisation and the data order, so within a seed every point starts from
the same weights and reads the same batches. The runs of a point are then
aggregated (mean ± sample std per metric) at the top of `W/sweep_results.md` and
in `W/sweep_summary.csv`, and
the plot shows means with error bars and bands. A point is marked better (▲)
or worse (▼) than the baseline point (`--baseline train.recipe=scratch`, the
default when the grid sweeps a recipe that includes scratch; the other
bindings equal) only when the means differ by more than the sum of the two
standard deviations (`quickstart.stats`). `--sweep TrainConfig.seed=3,4,5`
picks other seeds and is aggregated the same way.

Python API: `run_sweep(workdir, gin_files, {"train.recipe": ["scratch", ...]}, seeds=3)`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from etils import epath

from miniend_jax.cli import gin_flags
from miniend_jax.cli.gin_flags import gin_value
from miniend_jax.quickstart import stats
from miniend_jax.quickstart.bookkeeping import claim_settings, read_json, run_finished
from miniend_jax.quickstart.results import write_csv

MANIFEST = "sweep.json"
SEED_BINDING = "TrainConfig.seed"
POINT_FILE = "sweep_point.json"
MODES = ("distill", "pretrain", "finetune")
_MAX_NAME = 120


class SweepError(ValueError):
  """A malformed --sweep flag or grid."""


# ----------------------------------------------------------------------------
# The grid.


def split_values(text: str) -> list[str]:
  """Splits 'a,b,[1,2],"x,y"' on the commas outside brackets and quotes."""
  values, depth, quote, current = [], 0, None, []
  for ch in text:
    if quote:
      current.append(ch)
      if ch == quote:
        quote = None
      continue
    if ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append("".join(current).strip())
      current = []
      continue
    current.append(ch)
  if quote or depth:
    raise SweepError(f"Unbalanced quotes or brackets in sweep values {text!r}.")
  values.append("".join(current).strip())
  if any(not v for v in values):
    raise SweepError(f"Empty value in sweep values {text!r}.")
  return values


def parse_sweep(specs: Sequence[str]) -> dict[str, list[str]]:
  """['NAME=v1,v2', ...] -> {NAME: [gin value, ...]} (order kept; a NAME at most once)."""
  grid: dict[str, list[str]] = {}
  for spec in specs:
    name, sep, values = spec.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
      raise SweepError(f"--sweep {spec!r}: write --sweep NAME=VALUE1,VALUE2 "
                       "(e.g. --sweep train.recipe=scratch,miniend_d).")
    if name.startswith("--gin."):
      name = name[len("--gin."):]
    if name in grid:
      raise SweepError(f"--sweep {name} is given twice; list all its values in one flag.")
    parsed = [gin_value(v) for v in split_values(values)]
    if len(set(parsed)) != len(parsed):
      raise SweepError(f"--sweep {name}: repeated values {parsed}.")
    grid[name] = parsed
  return grid


def grid_points(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
  """Every combination of the grid's values, the first name varying slowest."""
  names = list(grid)
  return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _short_key(name: str) -> str:
  """'ModelSetup.student_shape' -> 'student_shape'; 'a/LinearRamp.end_step' -> 'end_step'."""
  return name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def _display(value: str) -> str:
  try:
    literal = ast.literal_eval(value)
    if isinstance(literal, str):
      return literal
  except (ValueError, SyntaxError):
    pass
  return value


def _sanitize(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def column_keys(names: Sequence[str]) -> dict[str, str]:
  """{binding name: its short column / directory key}: the last name part when unambiguous."""
  short = [_short_key(n) for n in names]
  keys = short if len(set(short)) == len(short) else [_sanitize(n) for n in names]
  return dict(zip(names, keys))


def run_names(points: Sequence[Mapping[str, str]]) -> list[str]:
  """A directory name per point, from its bindings (`recipe=miniend_d__student_shape=2L-64H`)."""
  if not points or not points[0]:
    return ["run"] * len(points)
  names = list(points[0])
  keys = list(column_keys(names).values())
  out = []
  for point in points:
    name = "__".join(f"{_sanitize(k)}={_sanitize(_display(point[n]))}"
                     for k, n in zip(keys, names))
    if len(name) > _MAX_NAME:
      digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:10]
      name = f"{name[:_MAX_NAME - 12]}__{digest}"
    out.append(name)
  if len(set(out)) != len(out):  # distinct gin values that sanitize alike
    out = [f"{n}__{hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:6]}"
           for n, p in zip(out, points)]
  return out


# ----------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class RunRecord:
  """One grid point: where it runs and what happened this time."""

  name: str
  directory: str
  bindings: dict[str, str]
  status: str = "pending"   # "ran", "skipped" (finished earlier), "failed: ..."
  num_steps: int | None = None


def _configure(gin_files: Sequence[str], bindings: Sequence[str],
               cache_dir: str | None = None) -> None:
  """Gin as one run of the sweep sees it; `cache_dir`: the compilation cache all runs share
  (unless the files or bindings choose one)."""
  import gin  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_flags.parse_gin(list(gin_files), list(bindings))
  if cache_dir is not None:
    try:
      gin.query_parameter("TrainConfig.compilation_cache_dir")
    except ValueError:  # not bound: the points' identical programs compile once
      gin.bind_parameter("TrainConfig.compilation_cache_dir", cache_dir)


def with_seeds(grid: Mapping[str, Sequence[str]], seeds: int) -> dict[str, list[str]]:
  """`grid` with the seed axis TrainConfig.seed = 0 .. seeds-1 last (none for one seed)."""
  grid = {name: list(values) for name, values in grid.items()}
  if seeds < 1:
    raise SweepError(f"--seeds {seeds}: give at least 1.")
  if seeds > 1:
    if SEED_BINDING in grid:
      raise SweepError(f"--seeds and --sweep {SEED_BINDING} both choose seeds; give one.")
    grid[SEED_BINDING] = [str(i) for i in range(seeds)]
  return grid


def default_baseline(grid: Mapping[str, Sequence[str]]) -> dict[str, str] | None:
  """{recipe binding: 'scratch'} when the grid sweeps a recipe that includes scratch."""
  for name, values in grid.items():
    if _short_key(name) == "recipe" and gin_value("scratch") in values:
      return {name: gin_value("scratch")}
  return None


def run_sweep(workdir: str, gin_files: Sequence[str] = (),
              grid: Mapping[str, Sequence[str]] | None = None, *,
              bindings: Sequence[str] = (), mode: str = "distill", seeds: int = 1,
              baseline: Mapping[str, str] | None = None,
              evaluate_tasks: Sequence[str] = (), max_runs: int | None = None,
              keep_going: bool = False, progress: bool = False, verbose: bool = True,
              before_run: Callable[[RunRecord], None] | None = None,
              after_run: Callable[[RunRecord], None] | None = None) -> dict:
  """Runs (or resumes) every point of `grid` in `workdir`, then collects the table.

  Args:
    workdir: the sweep's directory; each point runs in `workdir/<name>`.
    gin_files: gin files applied to every run.
    grid: {binding name: [gin values]} (see `parse_sweep`); bare words are quoted.
    bindings: extra "NAME = VALUE" bindings for every run (after the files).
    mode: "distill", "pretrain" or "finetune".
    seeds: run every point with TrainConfig.seed = 0 .. seeds-1 and aggregate them.
    baseline: {binding name: value} of the points the others are compared with
      (default: `default_baseline`); used when the grid has seeds.
    evaluate_tasks: after training, score each run on these seqio tasks
      (`loop.evaluate`, settings from the gin `evaluate.*` bindings).
    max_runs: start at most this many runs that are not finished (None: all).
    keep_going: record a failing run and go on (default: stop on the error).
    progress: per-step progress bars.
    before_run / after_run: called with each run's RunRecord (tests, logging).

  Returns:
    {"runs": [RunRecord as dict], "rows": table rows, "summary": seed aggregates (empty
     without seeds), "files": {name: path}}.
  """
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise SweepError(f"Unknown mode {mode!r}; one of {MODES}.")
  grid = {name: [gin_value(str(v)) for v in values] for name, values in (grid or {}).items()}
  grid = with_seeds(grid, seeds)
  if baseline is not None:
    baseline = {name: gin_value(str(v)) for name, v in baseline.items()}
    unknown = {n: v for n, v in baseline.items() if v not in grid.get(n, ())}
    if unknown:
      raise SweepError(f"--baseline {unknown} is not a point of the grid {grid}.")
  points = grid_points(grid) if grid else [{}]
  names = run_names(points)
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  records = [RunRecord(n, os.path.join(workdir, n), p) for n, p in zip(names, points)]
  say = (lambda text: print(f"[sweep] {text}", flush=True)) if verbose else (lambda _: None)

  # Check every point's configuration first, so a typo fails before hours of training,
  # and that a directory made earlier was made with these settings (or it is not resumable).
  for record in records:
    _configure(gin_files, list(bindings) + _point_bindings(record.bindings))
    record.num_steps = loop.TrainConfig().num_steps
    claim_settings(record.directory, {"mode": mode, "gin_files": list(gin_files),
                                      "bindings": list(bindings), "point": record.bindings},
                   POINT_FILE)
  baseline = baseline if baseline is not None else default_baseline(grid)
  manifest = {"mode": mode, "gin_files": list(gin_files), "bindings": list(bindings),
              "grid": grid, "baseline": baseline, "evaluate_tasks": list(evaluate_tasks),
              "runs": [{"name": r.name, "bindings": r.bindings} for r in records]}
  _write_json(os.path.join(workdir, MANIFEST), manifest)

  started = 0
  try:
    for i, record in enumerate(records):
      point_bindings = list(bindings) + _point_bindings(record.bindings)
      eval_done = all(epath.Path(record.directory, "eval", f"{t}.json").exists()
                      for t in evaluate_tasks)
      if run_finished(record.directory, record.num_steps) and eval_done:
        record.status = "skipped"
        say(f"[{i + 1}/{len(records)}] {record.name}: finished earlier, skipped")
        continue
      if max_runs is not None and started >= max_runs:
        say(f"[{i + 1}/{len(records)}] {record.name}: left for later (max_runs={max_runs})")
        continue
      started += 1
      say(f"[{i + 1}/{len(records)}] {record.name}: {mode} {record.num_steps} steps...")
      if before_run:
        before_run(record)
      try:
        _configure(gin_files, point_bindings, os.path.join(workdir, "compilation_cache"))
        _run_point(record, mode, evaluate_tasks, progress)
        record.status = "ran"
      except Exception as e:  # pylint: disable=broad-except
        if not keep_going:
          raise
        record.status = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        logging.exception("sweep run %s failed", record.name)
      say(f"[{i + 1}/{len(records)}] {record.name}: {record.status}")
      if after_run:
        after_run(record)
  finally:
    import gin  # pylint: disable=import-outside-toplevel
    gin.clear_config()
  rows = collect(workdir, records=records, evaluate_tasks=evaluate_tasks)
  summary = summarize(rows, grid, baseline)
  files = write_table(workdir, rows, summary, grid)
  if verbose:
    print()
    print(format_summary(summary, grid) if summary else format_markdown(rows))
    print()
    for key, path in files.items():
      print(f"{key:>9}: {path}")
  return {"runs": [dataclasses.asdict(r) for r in records], "rows": rows, "summary": summary,
          "files": files}


def _point_bindings(point: Mapping[str, str]) -> list[str]:
  return [f"{name} = {value}" for name, value in point.items()]


def _run_point(record: RunRecord, mode: str, evaluate_tasks: Sequence[str],
               progress: bool) -> None:
  import gin  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  epath.Path(record.directory).mkdir(parents=True, exist_ok=True)
  epath.Path(record.directory, f"{mode}_config.gin").write_text(gin.config_str())
  if not run_finished(record.directory, record.num_steps):
    loop.train(mode, record.directory, progress=progress)
  for task in evaluate_tasks:
    if not epath.Path(record.directory, "eval", f"{task}.json").exists():
      loop.evaluate(record.directory, task=task)


def _write_json(path: str, value) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return
  tmp = epath.Path(path + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)


# ----------------------------------------------------------------------------
# Collecting.


def collect(workdir: str, records: Sequence[RunRecord] | None = None,
            evaluate_tasks: Sequence[str] | None = None) -> list[dict]:
  """One row per run of the sweep in `workdir` (from its manifest unless `records`)."""
  from miniend_jax.cli import plots  # pylint: disable=import-outside-toplevel
  manifest = read_json(os.path.join(workdir, MANIFEST)) or {}
  if records is None:
    records = [RunRecord(r["name"], os.path.join(workdir, r["name"]), r["bindings"],
                         status="")
               for r in manifest.get("runs", [])]
  if evaluate_tasks is None:
    evaluate_tasks = manifest.get("evaluate_tasks", [])
  rows = []
  for record in records:
    summary = read_json(os.path.join(record.directory, "summary.json")) or {}
    metrics = plots.read_metrics(os.path.join(record.directory, "logs", "train_metrics.jsonl"))
    train, evaluation = summary.get("train", {}), summary.get("eval", {})
    state = ("done" if summary and run_finished(record.directory, record.num_steps or
                                             summary.get("step"))
             else "partial" if epath.Path(record.directory, "checkpoints").is_dir()
             else "missing")
    if record.status.startswith("failed"):
      state = record.status
    keys = column_keys(list(record.bindings))
    row = {"run": record.name, **{keys[k]: _display(v) for k, v in record.bindings.items()},
           "state": state, "step": summary.get("step"),
           "train_loss": train.get("loss"), "eval_loss": evaluation.get("eval/loss"),
           "eval_token_accuracy": evaluation.get("eval/token_accuracy"),
           "grad_norm_encoder": train.get("grad_norm/encoder"),
           "grad_norm_decoder": train.get("grad_norm/decoder"),
           "grad_norm_encoder_max": _max(metrics.get("grad_norm/encoder")),
           "grad_norm_decoder_max": _max(metrics.get("grad_norm/decoder")),
           "steps_per_s": train.get("perf/steps_per_s")}
    for task in evaluate_tasks:
      results = read_json(os.path.join(record.directory, "eval", f"{task}.json")) or {}
      for metric, value in sorted(results.get(task, {}).items()):
        row[f"{task}/{metric}"] = value
    rows.append(row)
  return rows


_NOT_METRICS = ("run", "state", "step")


def summarize(rows: Sequence[Mapping[str, Any]], grid: Mapping[str, Sequence[str]],
              baseline: Mapping[str, str] | None = None) -> list[dict]:
  """The seeds of every point aggregated (`stats.aggregate`); [] when the grid has no
  seed axis. Columns: the point's bindings, `seeds`, and per metric m: m (mean),
  m/std, m/n and, against the baseline point with the same other bindings,
  m/vs_baseline."""
  if SEED_BINDING not in grid:
    return []
  keys = column_keys(list(grid))
  points = [keys[name] for name in grid if name != SEED_BINDING]
  skip = set(_NOT_METRICS) | set(keys.values())
  metrics = list(dict.fromkeys(
      k for row in rows for k, v in row.items()
      if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)))
  base = ({keys[name]: _display(value) for name, value in baseline.items()}
          if baseline else None)
  return stats.aggregate(rows, points, metrics, baseline=base,
                         match=[k for k in points if k not in (base or {})])


def format_summary(summary: Sequence[Mapping[str, Any]], grid: Mapping[str, Sequence[str]]) -> str:
  """The Markdown table of the seed aggregates: mean ± std, ▲ / ▼ against the baseline."""
  if not summary:
    return "(no runs)"
  keys = column_keys(list(grid))
  points = [keys[name] for name in grid if name != SEED_BINDING]
  metrics = [k for k in summary[0] if f"{k}/std" in summary[0]]
  lines = ["| " + " | ".join(points + ["seeds"] + metrics) + " |",
           "|" + "|".join(["---"] * (len(points) + 1 + len(metrics))) + "|"]
  for row in summary:
    cells = [_fmt(row.get(k)) for k in points + ["seeds"]]
    cells += [stats.format_spread(row.get(m), row.get(f"{m}/std"), ".4g",
                                  row.get(f"{m}/vs_baseline")) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _max(points):
  values = [v for _, v in points or [] if math.isfinite(v)]
  return max(values) if values else None


def _fmt(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}" if math.isfinite(value) else "-"
  return str(value)


def format_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The Markdown table of `rows` (all columns that any row has)."""
  if not rows:
    return "(no runs)"
  columns = list(dict.fromkeys(k for row in rows for k in row))
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def write_table(workdir: str, rows: Sequence[Mapping[str, Any]],
                summary: Sequence[Mapping[str, Any]] = (),
                grid: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
  """Writes sweep_results.md / .csv, sweep_summary.csv (with seeds) and sweep.png; returns
  their paths."""
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax.cli import plots  # pylint: disable=import-outside-toplevel
  files = {"markdown": os.path.join(workdir, "sweep_results.md"),
           "csv": os.path.join(workdir, "sweep_results.csv"),
           "plot": os.path.join(workdir, "sweep.png")}
  if summary:
    files["summary_csv"] = os.path.join(workdir, "sweep_summary.csv")
  if jax.process_index() != 0:
    return files
  markdown = "# miniend sweep\n\n"
  if summary:
    markdown += (f"Mean ± sample std over seeds; {stats.MARKS[stats.BETTER]} / "
                 f"{stats.MARKS[stats.WORSE]}: better / worse than the baseline point by more "
                 "than the sum of the two standard deviations.\n\n"
                 + format_summary(summary, grid or {}) + "\n\n## Every run\n\n")
  epath.Path(files["markdown"]).write_text(markdown + format_markdown(rows) + "\n")
  write_csv(files["csv"], rows)
  if summary:
    write_csv(files["summary_csv"], summary)
  runs = {row["run"]: plots.read_metrics(os.path.join(workdir, row["run"], "logs",
                                                      "train_metrics.jsonl"))
          for row in rows}
  if not summary:
    plots.plot_sweep(runs, rows, files["plot"])
    return files
  # One curve (mean, band of one std) and one bar (error bar) per point.
  keys = column_keys(list(grid or {}))
  points = [keys[name] for name in grid or {} if name != SEED_BINDING]
  label = lambda row: "__".join(f"{k}={row.get(k)}" for k in points) or "all"
  members: dict[str, list] = {}
  for row in rows:
    members.setdefault(label(row), []).append(runs[row["run"]])
  curves, bands = {}, {}
  for name, series in members.items():
    curves[name], bands[name] = plots.mean_curves(series)
  plots.plot_sweep(curves, [{**row, "point": label(row)} for row in summary], files["plot"],
                   label_key="point", spread=bands,
                   title=f"Sweep: mean ± std over {len(grid[SEED_BINDING])} seeds")
  return files


# ----------------------------------------------------------------------------
# Command line.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the sweep's flags (including --workdir and --gin_file) to `parser`."""
  parser.add_argument("--workdir", required=True,
                      help="sweep directory: one sub-directory per run, the table and plot")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file applied to every run (repeatable)")
  parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                      help="a gin binding and its values (repeatable: the grid is the product)")
  parser.add_argument("--mode", choices=MODES, default="distill",
                      help="what each run does (default: distill)")
  parser.add_argument("--seeds", type=int, default=1,
                      help="run every point with TrainConfig.seed = 0..N-1; report mean ± std")
  parser.add_argument("--baseline", metavar="NAME=VALUE",
                      help="the point the others are compared with (default: "
                           "train.recipe=scratch when the grid sweeps it)")
  parser.add_argument("--teacher", help="shorthand for --gin.ModelSetup.teacher=...")
  parser.add_argument("--num_steps", type=int, help="shorthand for --gin.TrainConfig.num_steps")
  parser.add_argument("--evaluate_task", action="append", default=[],
                      help="also score every run on this seqio task (repeatable)")
  parser.add_argument("--max_runs", type=int,
                      help="start at most this many unfinished runs, then collect")
  parser.add_argument("--keep_going", action="store_true",
                      help="record a failing run and continue with the next")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser


def run_from_args(args: argparse.Namespace, bindings: Sequence[str] = ()) -> int:
  """Entry point of `miniend sweep` (args from `add_arguments`; bindings: --gin.* flags)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  extra = list(bindings)
  if args.teacher is not None:
    extra.append(f"ModelSetup.teacher = {args.teacher!r}")
  if args.num_steps is not None:
    extra.append(f"TrainConfig.num_steps = {args.num_steps!r}")
  try:
    grid = parse_sweep(args.sweep)
    baseline = None
    if args.baseline:
      name, sep, value = args.baseline.partition("=")
      if not sep or not name.strip() or not value.strip():
        raise SweepError(f"--baseline {args.baseline!r}: write --baseline NAME=VALUE.")
      baseline = {name.strip(): value.strip()}
    run_sweep(args.workdir, args.gin_file, grid, bindings=extra, mode=args.mode,
              seeds=args.seeds, baseline=baseline, evaluate_tasks=args.evaluate_task,
              max_runs=args.max_runs, keep_going=args.keep_going,
              progress=not args.no_progress)
  except (SweepError, gin_flags.GinError) as e:
    print(f"miniend sweep: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, bindings = gin_flags.split_gin_flags(argv)
  except gin_flags.GinError as e:
    print(f"miniend sweep: {e}", file=sys.stderr)
    return 2
  parser = add_arguments(argparse.ArgumentParser(
      prog="miniend sweep", description="Run a grid of gin bindings, one run each, resumable."))
  return run_from_args(parser.parse_args(rest), bindings)


if __name__ == "__main__":
  sys.exit(main())
