"""`quickstart.run`: the stages in order, then the report."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

from miniend_jax.quickstart import results, runs, stages
from miniend_jax.quickstart.bookkeeping import StageLog
from miniend_jax.quickstart.settings import (BASELINE, DEFAULT_WORKDIR, PAPER_ROWS, Settings,
                                             make_settings, validate)


def run(workdir: str = DEFAULT_WORKDIR, *, size: str = "cpu", settings: Settings | None = None,
        compilation_cache: bool = True, progress: bool = False, verbose: bool = True,
        on_stage: Callable[[str, str], None] | None = None, **overrides) -> dict:
  """Runs (or resumes) the quickstart in `workdir`; returns the results.

  Args:
    workdir: the work directory (created).
    size: a named size (`SIZES`): "cpu" (default; CPU minutes) or "gpu".
    settings: a complete `Settings` instead of size + overrides.
    compilation_cache: use a persistent XLA compilation cache in
      `workdir/jax_cache` (unless one is already configured).
    progress: per-step progress bars of the training runs.
    verbose: print each stage and the final table.
    on_stage: called as on_stage(stage_name, "ran" | "skipped") after each stage.
    **overrides: single `Settings` fields (paths, seeds, steps, ...) over the size's.

  Returns:
    {"rows": one per model (seed aggregates), "per_seed": one per model and seed,
     "table": markdown, "notes": [...], "files": {name: path},
     "stages": [(stage, "ran" | "skipped", seconds)], "seconds": total, "settings": {...}}.
  """
  started = time.perf_counter()
  if "://" in os.fspath(workdir):  # os.path.abspath would make it a local "gs:" directory
    raise ValueError(f"--workdir {workdir}: the quickstart keeps its work on this machine; "
                     "give a local directory (the training commands and sweeps take gs://).")
  if settings is None:
    settings = make_settings(size, **overrides)
  else:
    validate(settings)
  with runs.quiet_logs():
    return _run(os.path.abspath(workdir), settings, started=started,
                compilation_cache=compilation_cache, progress=progress, verbose=verbose,
                on_stage=on_stage)


def _run(workdir: str, s: Settings, *, started: float, compilation_cache: bool, progress: bool,
         verbose: bool, on_stage) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(workdir, exist_ok=True)
  say = (lambda text: print(f"[quickstart] {text}", flush=True)) if verbose else (lambda _: None)
  cache_dir = ""
  if compilation_cache:
    runs.enable_compilation_cache(os.path.join(workdir, "jax_cache"))
    cache_dir = jax.config.jax_compilation_cache_dir or ""
  if s.batch_size % jax.device_count():  # every device takes an equal share of the batch
    rounded = -(-s.batch_size // jax.device_count()) * jax.device_count()
    say(f"batch_size {s.batch_size} -> {rounded} (a multiple of the {jax.device_count()} devices)")
    s = dataclasses.replace(s, batch_size=rounded)
  ctx = runs.Context(workdir, s, StageLog(say, on_stage), cache_dir=cache_dir, progress=progress,
                     say=say)
  say(f"work directory {workdir}; size {s.size}: teacher {s.teacher_preset} "
      f"({s.teacher_steps} steps); {s.student_shape} students ({s.steps} steps each) along "
      f"{', '.join(s.paths)}; seeds {', '.join(map(str, s.seed_values))}; finetune "
      f"{s.finetune_steps} steps on {', '.join(s.tasks)}; {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s)")

  # 1-2. Corpus, vocabulary and teacher.
  stages.prepare_data(ctx)
  teacher = stages.pretrain_teacher(ctx)
  # 3-5. Per seed: a student per path, then every model finetuned and scored per task.
  # The teacher is a reference, not compared: finetuned with the first seed only.
  per_seed, distill_dirs = [], {path: [] for path in s.paths}
  if not s.finetune_teacher:  # still a row: its held-out loss, size and speed
    per_seed.append(results.run_row(teacher.name, s.seed, teacher.directory, {}))
  for seed in s.seed_values:
    students = [stages.distill_student(ctx, teacher, path, seed) for path in s.paths]
    for student in students:
      distill_dirs[student.name].append(student.directory)
    reference = [teacher] if s.finetune_teacher and seed == s.seed else []
    for model in reference + students:
      finetuned = {task: stages.finetune_and_evaluate(ctx, model, seed, task)
                   for task in s.tasks}
      per_seed.append(results.run_row(model.name, seed, model.directory, finetuned))
  # 6. Speed.
  speed = stages.measure_speed(ctx, teacher)
  ctx.stages.flush_skipped()

  # 7. Report.
  rows = results.model_rows(per_seed, _model_info(ctx, teacher, speed))
  counts = stages.validation_counts(ctx)
  notes = _notes(s, speed, counts) + results.verdict_summary(rows, s.tasks)
  table = results.format_table(rows, s.tasks, counts)
  files = results.write_report(workdir, rows, per_seed, table, notes, s, distill_dirs)
  seconds = time.perf_counter() - started
  if verbose:
    print(f"\n{table}\n")
    for note in notes:
      print(f"- {note}")
    print()
    for name, path in files.items():
      print(f"{name:>12}: {path}")
    print(f"\n[quickstart] finished in {seconds / 60:.1f} min ({ctx.stages.ran} stages ran, "
          f"{len(ctx.stages.records) - ctx.stages.ran} skipped).", flush=True)
  return {"rows": rows, "per_seed": per_seed, "table": table, "notes": notes, "files": files,
          "stages": ctx.stages.records, "seconds": seconds,
          "settings": {**dataclasses.asdict(s), "seed_values": list(s.seed_values)}}


def _model_info(ctx: runs.Context, teacher: stages.Model, speed: dict) -> dict[str, dict]:
  """{model: kind, shape, params, measured and FLOP speed-up}: what seeds do not change."""
  from miniend_jax.model import student as student_lib  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.config import count_params, forward_flops  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  s = ctx.settings
  teacher_config = loop.load_model(teacher.directory)[0]
  student_config = student_lib.student_config(teacher_config, s.student_shape)
  shape = (s.batch_size, s.inputs_length, s.targets_length)
  teacher_flops = forward_flops(teacher_config, *shape)
  rates = speed.get("examples_per_s", {})

  def info(kind, name, config):
    rate = rates.get(kind, float("nan"))
    return {"kind": kind, "shape": name, "params": count_params(config),
            "fwd_examples_per_s": rate,
            "speedup_measured": rate / rates["teacher"] if rates.get("teacher") else float("nan"),
            "speedup_flops": teacher_flops / forward_flops(config, *shape)}

  out = {stages.TEACHER: info("teacher", s.teacher_preset, teacher_config)}
  out.update({path: info("student", s.student_shape, student_config) for path in s.paths})
  return out


def _notes(s: Settings, speed: dict, counts: dict) -> list[str]:
  rates = speed.get("examples_per_s", {})
  seeds = ", ".join(map(str, s.seed_values))
  counted = ", ".join(f"{task} {n if n is not None else 'all'}" for task, n in counts.items())
  return [
      f"seeds: {s.seeds} ({seeds}); each cell is the mean ± sample standard deviation "
      "(ddof=1) over them. Within a seed every path starts from the same student "
      "initialisation and sees the same batches in the same order at the same learning "
      f"rate. The teacher (a reference, not compared) is pretrained and finetuned once "
      f"(seed {s.seed}).",
      f"▲ / ▼: the path's mean is better / worse than {BASELINE}'s by more than the sum of "
      "the two standard deviations (the intervals mean ± std do not overlap); no mark: "
      "within the seeds' spread (or a single seed). Loss columns: lower is better; scores: "
      "higher.",
      f"speed-up (measured): {speed.get('method', '?')}, on {speed.get('device', '?')}; "
      f"teacher {rates.get('teacher', float('nan')):.0f}, student "
      f"{rates.get('student', float('nan')):.0f} examples/s.",
      "speed-up (FLOPs): ratio of forward matmul FLOPs (miniend_jax.model.t5.forward_flops).",
      f"held-out SC loss: span-corruption cross-entropy on {s.eval_batches} validation batches "
      "after distillation (pretraining for the teacher); paths without a logits or "
      "span-corruption term never train the output head, so theirs is high by construction.",
      f"downstream: each model finetuned {s.finetune_steps} steps per task and seed, greedy "
      f"decoding on n validation examples per task ({counted}); pydoc_summary ROUGE-Lsum, "
      "pydoc_topic accuracy (%); val loss: the finetuned model's teacher-forced validation "
      f"loss ({s.eval_batches} batches).",
      f"every student: {s.student_shape}, {s.steps} distillation steps of batch "
      f"{s.batch_size}; teacher {s.teacher_preset}, {s.teacher_steps} steps (size {s.size}).",
      "paper rows: " + ", ".join(f"{p} = {PAPER_ROWS.get(p, 'not a paper row')}"
                                 for p in s.paths) + ".",
  ]
