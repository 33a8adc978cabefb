"""What each `miniend` subcommand runs, given its parsed flags and gin bindings.

One function per subcommand, `run_<command>(args, bindings) -> exit status`
(the parser, `cli/parser.py`, sets it as the subcommand's `func`). Each imports
the engine only when it runs, so `--help` and `miniend models` stay fast. The
training flags such as --teacher are shorthands for the gin bindings in
`_SHORTHANDS`.
"""

from __future__ import annotations

import json
import os
import sys

from miniend_jax.cli.gin_flags import parse_gin

_SHORTHANDS = {
    "recipe": "train.recipe",
    "teacher": "ModelSetup.teacher",
    "student_shape": "ModelSetup.student_shape",
    "preset": "ModelSetup.preset",
    "init_from": "ModelSetup.init_from",
    "task": "TrainConfig.task",
    "vocabulary": "TrainConfig.vocabulary",
    "num_steps": "TrainConfig.num_steps",
    "data_dir": "TrainConfig.data_dir",
    "train_files": "TrainConfig.train_files",
    "validation_files": "TrainConfig.validation_files",
    "text_field": "TrainConfig.text_field",
    "hf_data_dir": "TrainConfig.hf_data_dir",
}


def run_models(args, bindings) -> int:
  del bindings
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.config import count_params  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.student import student_config  # pylint: disable=import-outside-toplevel

  def row(name, cfg):
    layers = (str(cfg.num_layers) if cfg.num_decoder_layers == cfg.num_layers
              else f"{cfg.num_layers}+{cfg.num_decoder_layers}")
    print(f"{name:<16} {layers:>6} {cfg.d_model:>7} {cfg.num_heads:>5} {cfg.d_ff:>6} "
          f"{cfg.vocab_size:>7} {cfg.feed_forward_proj:<11} {count_params(cfg):>15,}")

  print(f"{'preset':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>6} {'vocab':>7} "
        f"{'ffn':<11} {'params':>15}")
  for name, cfg in presets.MODEL_PRESETS.items():
    row(name, cfg)
  teacher = presets.get_model_config(args.teacher)
  print(f"\nstudent shapes (family and vocabulary of {args.teacher}):")
  for name in presets.STUDENT_SHAPES:
    row(name, student_config(teacher, name))
  return 0


def _shorthand_bindings(args) -> list[str]:
  return [f"{binding} = {getattr(args, flag)!r}" for flag, binding in _SHORTHANDS.items()
          if getattr(args, flag, None) is not None]


def run_train(args, bindings) -> int:
  parse_gin(args.gin_file, bindings + _shorthand_bindings(args))
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  summary = loop.train(args.command, args.workdir, progress=not args.no_progress,
                       allow_changes=args.allow_changes)
  print(json.dumps(summary, indent=2))
  if summary["preempted"]:
    print(f"miniend: stopped at step {summary['step']} ({summary['stopped_by']}); the "
          "checkpoint is saved. Run the same command again to resume.", file=sys.stderr)
  return summary["exit_code"]


def run_evaluate(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  kwargs = {k: v for k, v in (("task", args.task), ("checkpoint_dir", args.checkpoint_dir))
            if v is not None}
  print(json.dumps(loop.evaluate(args.workdir, **kwargs), indent=2))
  return 0


def run_export(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  out = loop.export(args.workdir, args.out_dir, checkpoint_dir=args.checkpoint_dir,
                    step=args.step, dtype=args.dtype, overwrite=args.overwrite)
  print(f"Wrote a Hugging Face checkpoint to {out}")
  return 0


def run_convert(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  out = loop.convert(args.teacher, args.out_dir, dtype=args.dtype)
  print(f"Wrote a miniend checkpoint to {out}; pass it as --teacher.")
  return 0


def run_plan(args, bindings) -> int:
  from miniend_jax.cli import plan  # pylint: disable=import-outside-toplevel
  return plan.run_from_args(args, bindings)


def run_quickstart(args, bindings) -> int:
  from miniend_jax import quickstart  # pylint: disable=import-outside-toplevel
  return quickstart.run_from_args(args, bindings)


def run_sweep(args, bindings) -> int:
  from miniend_jax.cli import sweep  # pylint: disable=import-outside-toplevel
  return sweep.run_from_args(args, bindings)


def set_distributed_env(args) -> None:
  """--coordinator_address / --num_processes / --process_id as JAX's own variables."""
  for flag, variable in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                         ("num_processes", "JAX_NUM_PROCESSES"),
                         ("process_id", "JAX_PROCESS_ID")):
    value = getattr(args, flag, None)
    if value is not None:
      os.environ[variable] = str(value)
