"""The `miniend` command line (also `python -m miniend_jax`)."""

from __future__ import annotations

import argparse
import sys


def _models(args) -> int:
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.t5 import count_params  # pylint: disable=import-outside-toplevel
  print(f"{'preset':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>6} {'params':>14}")
  for name, cfg in presets.MODEL_PRESETS.items():
    print(f"{name:<16} {cfg.num_layers:>6} {cfg.d_model:>7} {cfg.num_heads:>5} {cfg.d_ff:>6} "
          f"{count_params(cfg):>14,}")
  print()
  teacher = presets.get_model_config(args.teacher)
  from miniend_jax.model.student import student_config  # pylint: disable=import-outside-toplevel
  print(f"student shapes (family and vocabulary of {args.teacher}):")
  for name in presets.STUDENT_SHAPES:
    cfg = student_config(teacher, name)
    print(f"{name:<16} {cfg.num_layers:>6} {cfg.d_model:>7} {cfg.num_heads:>5} {cfg.d_ff:>6} "
          f"{count_params(cfg):>14,}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="miniend", description="Task-agnostic distillation of T5 models (MiniEnD) in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)
  models = sub.add_parser("models", help="List model presets and student shapes with sizes.")
  models.add_argument("--teacher", default="t5-v1_1-base",
                      help="Teacher preset whose family the student shapes take.")
  models.set_defaults(func=_models)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
