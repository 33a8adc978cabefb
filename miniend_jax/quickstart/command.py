"""`miniend quickstart` on the command line (also `python -m miniend_jax.quickstart`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from miniend_jax.quickstart.bookkeeping import Preempted, StageMismatchError
from miniend_jax.quickstart.pipeline import run
from miniend_jax.quickstart.settings import DEFAULT_PATHS, DEFAULT_WORKDIR, SIZES, TASKS


def _csv_list(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the quickstart's flags (including --workdir) to `parser`."""
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                      help=f"work directory (default: ./{DEFAULT_WORKDIR}); re-running resumes")
  parser.add_argument("--size", choices=sorted(SIZES), default="cpu",
                      help="cpu: every path, 2 seeds, under 15 minutes on 2 cores (default); "
                           "gpu: the same study bigger, for a GPU or TPU")
  parser.add_argument("--paths", type=_csv_list,
                      help=f"comma-separated recipes (default: {','.join(DEFAULT_PATHS)})")
  parser.add_argument("--tasks", type=_csv_list,
                      help=f"comma-separated downstream tasks (default: {','.join(TASKS)})")
  parser.add_argument("--seeds", type=int,
                      help="seeds per path (cpu: 2, gpu: 4); the table shows mean ± std")
  parser.add_argument("--seed", type=int, help="the first seed (default 0)")
  parser.add_argument("--teacher_preset", help="teacher size (a `miniend models` preset)")
  parser.add_argument("--student_shape", help="every student's shape, e.g. 2L-64H")
  parser.add_argument("--steps", type=int, help="distillation steps of every student")
  parser.add_argument("--teacher_steps", type=int, help="teacher pretraining steps")
  parser.add_argument("--finetune_steps", type=int, help="finetuning steps per model and task")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--inputs_length", type=int)
  parser.add_argument("--targets_length", type=int)
  parser.add_argument("--eval_examples", type=int,
                      help="validation examples scored per task (default: all of them)")
  parser.add_argument("--no_finetune_teacher", action="store_true",
                      help="do not finetune / score the teacher")
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help="no persistent XLA compilation cache in WORKDIR/jax_cache")
  parser.add_argument("--no_progress", action="store_true",
                      help="no progress bar per run (as for every other command)")
  return parser


_SETTINGS_FLAGS = ("paths", "tasks", "seeds", "seed", "teacher_preset", "student_shape", "steps",
                   "teacher_steps", "finetune_steps", "batch_size", "inputs_length",
                   "targets_length", "eval_examples")


def run_from_args(args: argparse.Namespace, bindings: Sequence[str] = ()) -> int:
  """Entry point of `miniend quickstart` (args from `add_arguments`)."""
  if bindings:
    print("miniend quickstart: takes no --gin.* bindings; use its flags (see --help).",
          file=sys.stderr)
    return 2
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  overrides = {name: getattr(args, name) for name in _SETTINGS_FLAGS}
  try:
    run(args.workdir, size=args.size, finetune_teacher=False if args.no_finetune_teacher else None,
        compilation_cache=not args.no_compilation_cache, progress=not args.no_progress, **overrides)
  except (ValueError, StageMismatchError) as e:
    print(f"miniend quickstart: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"miniend quickstart: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = add_arguments(argparse.ArgumentParser(
      prog="miniend quickstart",
      description="Pretrain a small teacher, distil students along every path of the paper's "
                  "table with several seeds, finetune and score them, and print the "
                  "comparison (offline; CPU-sized by default)."))
  return run_from_args(parser.parse_args(argv))
