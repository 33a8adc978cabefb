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
completes only the missing runs. Every run's summary and logged metrics are
collected into `W/sweep_results.{md,csv}` and `W/sweep.png`.

Values: gin literals ('miniend_d', 100, 0.5, [1, 2], @LinearRamp(), %MACRO);
a bare word that is not one (miniend_d, 1L-32H) is taken as a string. Commas
inside brackets or quotes do not split values. Interpolation schedules are
swept like anything else, e.g.
`--sweep miniend_e_interpolated/LinearRamp.end_step=0,1000,10000` with
`--gin_file gin_configs/recipes/miniend_e_interpolated.gin`.

Python API: `run_sweep(workdir, gin_files, {"train.recipe": ["scratch", ...]})`.
"""

from __future__ import annotations

import argparse
import ast
import csv
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

from miniend_jax.quickstart import claim_settings, read_json, run_finished

MANIFEST = "sweep.json"
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


def gin_value(value: str) -> str:
  """`value` as a gin expression: literals and references as they are, bare words quoted."""
  value = value.strip()
  if value.startswith(("@", "%")):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


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


def _configure(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  import gin  # pylint: disable=import-outside-toplevel
  from miniend_jax import cli  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cli.parse_gin(list(gin_files), list(bindings))


def run_sweep(workdir: str, gin_files: Sequence[str] = (),
              grid: Mapping[str, Sequence[str]] | None = None, *,
              bindings: Sequence[str] = (), mode: str = "distill",
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
    evaluate_tasks: after training, score each run on these seqio tasks
      (`loop.evaluate`, settings from the gin `evaluate.*` bindings).
    max_runs: start at most this many runs that are not finished (None: all).
    keep_going: record a failing run and go on (default: stop on the error).
    progress: per-step progress bars.
    before_run / after_run: called with each run's RunRecord (tests, logging).

  Returns:
    {"runs": [RunRecord as dict], "rows": table rows, "files": {name: path}}.
  """
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise SweepError(f"Unknown mode {mode!r}; one of {MODES}.")
  grid = {name: [gin_value(str(v)) for v in values] for name, values in (grid or {}).items()}
  points = grid_points(grid) if grid else [{}]
  names = run_names(points)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
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
  manifest = {"mode": mode, "gin_files": list(gin_files), "bindings": list(bindings),
              "grid": grid, "evaluate_tasks": list(evaluate_tasks),
              "runs": [{"name": r.name, "bindings": r.bindings} for r in records]}
  _write_json(os.path.join(workdir, MANIFEST), manifest)

  started = 0
  try:
    for i, record in enumerate(records):
      point_bindings = list(bindings) + _point_bindings(record.bindings)
      eval_done = all(os.path.exists(os.path.join(record.directory, "eval", f"{t}.json"))
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
        _configure(gin_files, point_bindings)
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
  files = write_table(workdir, rows)
  if verbose:
    print()
    print(format_markdown(rows))
    print()
    for key, path in files.items():
      print(f"{key:>9}: {path}")
  return {"runs": [dataclasses.asdict(r) for r in records], "rows": rows, "files": files}


def _point_bindings(point: Mapping[str, str]) -> list[str]:
  return [f"{name} = {value}" for name, value in point.items()]


def _run_point(record: RunRecord, mode: str, evaluate_tasks: Sequence[str],
               progress: bool) -> None:
  import gin  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  os.makedirs(record.directory, exist_ok=True)
  with open(os.path.join(record.directory, f"{mode}_config.gin"), "w", encoding="utf-8") as f:
    f.write(gin.config_str())
  if not run_finished(record.directory, record.num_steps):
    loop.train(mode, record.directory, progress=progress)
  for task in evaluate_tasks:
    if not os.path.exists(os.path.join(record.directory, "eval", f"{task}.json")):
      loop.evaluate(record.directory, task=task)


def _write_json(path: str, value) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# Collecting.


def collect(workdir: str, records: Sequence[RunRecord] | None = None,
            evaluate_tasks: Sequence[str] | None = None) -> list[dict]:
  """One row per run of the sweep in `workdir` (from its manifest unless `records`)."""
  from miniend_jax import plots  # pylint: disable=import-outside-toplevel
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
             else "partial" if os.path.isdir(os.path.join(record.directory, "checkpoints"))
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


def write_table(workdir: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Writes sweep_results.md / .csv and sweep.png; returns their paths."""
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax import plots  # pylint: disable=import-outside-toplevel
  files = {"markdown": os.path.join(workdir, "sweep_results.md"),
           "csv": os.path.join(workdir, "sweep_results.csv"),
           "plot": os.path.join(workdir, "sweep.png")}
  if jax.process_index() != 0:
    return files
  with open(files["markdown"], "w", encoding="utf-8") as f:
    f.write("# miniend sweep\n\n" + format_markdown(rows) + "\n")
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(files["csv"], "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
  runs = {row["run"]: plots.read_metrics(os.path.join(workdir, row["run"], "logs",
                                                      "train_metrics.jsonl"))
          for row in rows}
  plots.plot_sweep(runs, rows, files["plot"])
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
  from miniend_jax import cli  # pylint: disable=import-outside-toplevel
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  extra = list(bindings)
  if args.teacher is not None:
    extra.append(f"ModelSetup.teacher = {args.teacher!r}")
  if args.num_steps is not None:
    extra.append(f"TrainConfig.num_steps = {args.num_steps!r}")
  try:
    grid = parse_sweep(args.sweep)
    run_sweep(args.workdir, args.gin_file, grid, bindings=extra, mode=args.mode,
              evaluate_tasks=args.evaluate_task, max_runs=args.max_runs,
              keep_going=args.keep_going, progress=not args.no_progress)
  except (SweepError, cli.GinError) as e:
    print(f"miniend sweep: {e}", file=sys.stderr)
    return 2
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from miniend_jax import cli  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = cli._split_gin_flags(argv)  # pylint: disable=protected-access
  parser = add_arguments(argparse.ArgumentParser(
      prog="miniend sweep", description="Run a grid of gin bindings, one run each, resumable."))
  return run_from_args(parser.parse_args(rest), bindings)


if __name__ == "__main__":
  sys.exit(main())
