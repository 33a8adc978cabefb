"""The `miniend` command line (also `python -m miniend_jax`).

  miniend distill  --gin_file gin_configs/runs/X.gin [--gin.NAME=VALUE ...] --workdir DIR
  miniend pretrain | finetune   (same flags)
  miniend evaluate --workdir DIR [--task T] [--gin.evaluate.num_beams=4]
  miniend export   --workdir DIR --out_dir HF_DIR
  miniend convert  --teacher HF_DIR --out_dir DIR   (Hugging Face -> orbax, for pods)
  miniend plan     --gin_file RUN.gin --topology v4-64 [--slices N]   (fits a TPU slice?)
  miniend quickstart [--workdir DIR]   (the offline end-to-end demo)
  miniend sweep    --gin_file F --sweep NAME=v1,v2 [...] --workdir DIR
  miniend models   (presets and student shapes with sizes)

Every setting is a gin binding; the flags --recipe, --teacher, --init_from,
--task and --num_steps are shorthands for the bindings they name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from miniend_jax.gin_flags import GinError, parse_gin, split_gin_flags

_SHORTHANDS = {
    "recipe": "train.recipe",
    "teacher": "ModelSetup.teacher",
    "student_shape": "ModelSetup.student_shape",
    "init_from": "ModelSetup.init_from",
    "task": "TrainConfig.task",
    "num_steps": "TrainConfig.num_steps",
}


def _models(args) -> int:
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.student import student_config  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.t5 import count_params  # pylint: disable=import-outside-toplevel

  def row(name, cfg):
    print(f"{name:<16} {cfg.num_layers:>6} {cfg.d_model:>7} {cfg.num_heads:>5} {cfg.d_ff:>6} "
          f"{count_params(cfg):>14,}")

  print(f"{'preset':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>6} {'params':>14}")
  for name, cfg in presets.MODEL_PRESETS.items():
    row(name, cfg)
  teacher = presets.get_model_config(args.teacher)
  print(f"\nstudent shapes (family and vocabulary of {args.teacher}):")
  for name in presets.STUDENT_SHAPES:
    row(name, student_config(teacher, name))
  return 0


def _shorthand_bindings(args) -> list[str]:
  out = []
  for flag, binding in _SHORTHANDS.items():
    value = getattr(args, flag, None)
    if value is not None:
      out.append(f"{binding} = {value!r}")
  return out


def _train(args, bindings) -> int:
  import gin  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  parse_gin(args.gin_file, bindings + _shorthand_bindings(args))
  from etils import epath  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(args.workdir)  # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / f"{args.command}_config.gin").write_text(gin.config_str())
  summary = loop.train(args.command, args.workdir, progress=not args.no_progress)
  print(json.dumps(summary, indent=2))
  if summary["preempted"]:
    print(f"miniend: stopped at step {summary['step']} ({summary['stopped_by']}); the "
          f"checkpoint is saved. Run the same command again to resume.", file=sys.stderr)
  return summary["exit_code"]


def _evaluate(args, bindings) -> int:
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  parse_gin(args.gin_file, bindings)
  kwargs = {k: v for k, v in (("task", args.task), ("checkpoint_dir", args.checkpoint_dir))
            if v is not None}
  print(json.dumps(loop.evaluate(args.workdir, **kwargs), indent=2))
  return 0


def _export(args, bindings) -> int:
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  parse_gin(args.gin_file, bindings)
  out = loop.export(args.workdir, args.out_dir, checkpoint_dir=args.checkpoint_dir,
                    step=args.step, dtype=args.dtype)
  print(f"Wrote a Hugging Face checkpoint to {out}")
  return 0


def _convert(args, bindings) -> int:
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  parse_gin(args.gin_file, bindings)
  out = loop.convert(args.teacher, args.out_dir, dtype=args.dtype)
  print(f"Wrote a miniend checkpoint to {out}; pass it as --teacher.")
  return 0


def _set_distributed_env(args) -> None:
  """--coordinator_address / --num_processes / --process_id as JAX's own variables."""
  for flag, variable in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                         ("num_processes", "JAX_NUM_PROCESSES"),
                         ("process_id", "JAX_PROCESS_ID")):
    value = getattr(args, flag, None)
    if value is not None:
      os.environ[variable] = str(value)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="miniend", description="Task-agnostic distillation of T5 models (MiniEnD) in JAX.",
      epilog="Any --gin.NAME=VALUE flag is a gin binding, e.g. --gin.TrainConfig.num_steps=500.")
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--workdir", required=True,
                   help="run directory (checkpoints, logs, results); local or gs://")
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable), e.g. gin_configs/runs/quickstart_distill.gin")
    distributed(p)

  def distributed(p):
    group = p.add_argument_group(
        "multi-process jobs", "Not needed on Cloud TPU VMs, Slurm or Open MPI, which are "
        "detected; elsewhere give all three on every process (or set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID).")
    group.add_argument("--coordinator_address", help="host:port of process 0")
    group.add_argument("--num_processes", type=int, help="processes in the job")
    group.add_argument("--process_id", type=int, help="this process's index")

  for mode, text in (("distill", "Distil a student from a teacher (a recipe)."),
                     ("pretrain", "Train a model from scratch on span corruption."),
                     ("finetune", "Finetune a model (e.g. a distilled student) on a task.")):
    p = sub.add_parser(mode, help=text, description=text)
    common(p)
    p.add_argument("--recipe", help="distillation recipe, e.g. miniend_d (= --gin.train.recipe)")
    p.add_argument("--teacher", help="teacher: Hugging Face dir / hub id or miniend checkpoint dir")
    p.add_argument("--student_shape", help="student shape, e.g. 6L-384H")
    p.add_argument("--init_from", help="finetune: initial weights (checkpoint or HF dir)")
    p.add_argument("--task", help="seqio task or mixture")
    p.add_argument("--num_steps", type=int, help="training steps")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

  p = sub.add_parser("evaluate", help="Score a checkpoint with its task's metrics.")
  common(p)
  p.add_argument("--task", help="seqio task (default: the one the checkpoint trained on)")
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  p.set_defaults(func=_evaluate)

  p = sub.add_parser("export", help="Write a checkpoint as a Hugging Face T5 directory.")
  common(p)
  p.add_argument("--out_dir", required=True)
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  p.add_argument("--step", type=int, help="default: the latest")
  p.add_argument("--dtype", help="cast weights, e.g. bfloat16")
  p.set_defaults(func=_export)

  # Imported lazily by their run functions; only the flag definitions load here.
  from miniend_jax import quickstart, sweep  # pylint: disable=import-outside-toplevel
  p = quickstart.add_arguments(sub.add_parser(
      "quickstart", help="Offline end-to-end demo: teacher, students along several paths, table.",
      description="Pretrain a small teacher on the embedded corpus, distil students along "
                  "several paths at equal steps, finetune and score them, print the table."))
  p.set_defaults(func=lambda args, bindings: quickstart.run_from_args(args, bindings))
  p = sweep.add_arguments(sub.add_parser(
      "sweep", help="A grid of gin bindings, one resumable run each, collected in a table."))
  p.set_defaults(func=lambda args, bindings: sweep.run_from_args(args, bindings))

  p = sub.add_parser(
      "convert", help="Write a Hugging Face teacher as a miniend (orbax) checkpoint.",
      description="Convert a Hugging Face T5 checkpoint (local, gs:// or hub id) once into an "
                  "orbax checkpoint (e.g. on a bucket), which every host of a pod restores in "
                  "parallel, each reading only its own slices. Pass it as --teacher.")
  p.add_argument("--teacher", required=True, help="Hugging Face directory or hub id")
  p.add_argument("--out_dir", required=True, help="the new checkpoint directory (local or gs://)")
  p.add_argument("--dtype", help="store the weights in this dtype, e.g. bfloat16")
  p.add_argument("--gin_file", action="append", default=[])
  distributed(p)
  p.set_defaults(func=_convert)

  from miniend_jax.train import plan  # pylint: disable=import-outside-toplevel
  p = plan.add_arguments(sub.add_parser(
      "plan", help="Compile a run's step for a TPU slice from this host: does it fit, how fast.",
      description="Builds the exact step a run would jit (its gin file and bindings), compiles "
                  "it with the TPU compiler (libtpu, no TPU needed) for a slice topology, and "
                  "reports per-chip memory against HBM, FLOPs, compile time and the step time "
                  "at 50% and 100% of peak. Exit 0 with an answer (fits or not), 2 for a bad "
                  "config."))
  p.set_defaults(func=lambda args, bindings: plan.run_from_args(args, bindings))

  p = sub.add_parser("models", help="List model presets and student shapes with sizes.")
  p.add_argument("--teacher", default="t5-v1_1-base",
                 help="teacher preset whose family the student shapes take")
  p.set_defaults(func=lambda args, bindings: _models(args))
  return parser


def main(argv: list[str] | None = None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # orbax and seqio log every file operation through absl at INFO.
  logging.getLogger("absl").setLevel(logging.WARNING)
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    rest, bindings = split_gin_flags(argv)
    args = build_parser().parse_args(rest)
    _set_distributed_env(args)
    return args.func(args, bindings)
  except GinError as e:
    print(f"miniend: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
