"""`miniend plan` (and benchmarks/aot_plan.py): a run's gin settings -> its plan, printed.

  miniend plan --gin_file gin_configs/runs/paper_t5_11b_6L768H.gin --topology v4-64

The command's half of planning: its flags, reading the run's gin files and
bindings into the step program on the topology's abstract devices, and the
report as a table, a JSON line or a one-line `miniend: ...` error (exit 2).
Compiling for the topology and the report itself are `train/plan.py`'s.
Importing this module loads JAX (the CLI imports it only for `miniend plan`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from miniend_jax.cli.gin_flags import parse_gin
from miniend_jax.train.plan import PlanReport, parse_topology, plan_program, topology_devices


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The flags of `miniend plan`; --gin.NAME=VALUE bindings are separated by the caller."""
  parser.add_argument("--gin_file", action="append", default=[],
                      help="the run's gin file (repeatable), e.g. "
                           "gin_configs/runs/paper_t5_11b_6L768H.gin")
  parser.add_argument("--topology", required=True,
                      help="TPU slice: v4-64, v5e-256 / v5litepod-256, v5p-128, v6e-64, or a "
                           "libtpu name such as v4:2x4x4 (v4/v5p names count TensorCores, "
                           "2 per chip)")
  parser.add_argument("--slices", type=int, default=1,
                      help="slices joined over DCN (MeshConfig.dcn_data * dcn_fsdp; "
                           "default: dcn_data = slices)")
  parser.add_argument("--mode", default="distill", choices=("distill", "pretrain", "finetune"))
  parser.add_argument("--recipe", help="distillation recipe (= --gin.train.recipe)")
  parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
  return parser


def _gin_recipe(default: str = "miniend_d"):
  import gin  # pylint: disable=import-outside-toplevel
  try:
    return gin.get_bindings("train").get("recipe", default)
  except (ValueError, KeyError):
    return default


def build_program(args, bindings: Sequence[str]):
  """The run's StepProgram on the topology's devices, from gin files and bindings."""
  from miniend_jax.train import partitioning, program, state  # pylint: disable=import-outside-toplevel
  topology = parse_topology(args.topology)
  shorthand = [f"train.recipe = {args.recipe!r}"] if getattr(args, "recipe", None) else []
  parse_gin(list(args.gin_file), list(bindings) + shorthand)
  mesh = partitioning.MeshConfig()
  if args.slices > 1 and mesh.dcn_data * mesh.dcn_fsdp == 1:
    mesh = dataclasses.replace(mesh, dcn_data=args.slices)
  devices = topology_devices(topology, args.slices)
  prog = program.build_step_program(args.mode, program.TrainConfig(), program.ModelSetup(),
                                    state.OptimizerConfig(), mesh, _gin_recipe(),
                                    devices=devices)
  return topology, prog


def describe(prog) -> str:
  """One line naming the models, the batch and the recipe of a program."""
  from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel
  parts = []
  if prog.teacher_config is not None:
    tc = prog.teacher_config
    parts.append(f"teacher {t5.count_params(tc) / 1e9:.2f}B params ({tc.num_layers}+"
                 f"{tc.num_decoder_layers} layers, d_model {tc.d_model}, {tc.param_dtype})")
  sc = prog.student_config
  parts.append(f"student {t5.count_params(sc) / 1e6:.0f}M params ({sc.num_layers}+"
               f"{sc.num_decoder_layers} layers, d_model {sc.d_model}, remat "
               f"{sc.remat_policy}, scan_layers {sc.scan_layers})")
  train = prog.train
  parts.append(f"recipe {prog.recipe.name}, batch {train.batch_size} x "
               f"({train.inputs_length} + {train.targets_length}) tokens")
  return "; ".join(parts)


# What a config that cannot be planned raises (GinError and PlanError are ValueErrors).
CONFIG_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError)


def config_error_message(error: Exception) -> str:
  """The one-line `miniend: ...` message of a config error."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return "miniend: " + " ".join(str(message).split())


def report_from_args(args, bindings: Sequence[str]) -> PlanReport:
  """The plan of the run the gin files and bindings describe, on `args.topology`.

  Raises:
    One of CONFIG_ERRORS for a config that cannot be planned.
  """
  topology, prog = build_program(args, bindings)
  report = plan_program(prog, topology, slices=args.slices)
  report.title = f"miniend plan {' '.join(args.gin_file)}: {describe(prog)}"
  return report


def run_from_args(args, bindings: Sequence[str]) -> int:
  """`miniend plan`: prints the report; 0 for an answer (fits or not), 2 for a bad config."""
  try:
    report = report_from_args(args, bindings)
  except CONFIG_ERRORS as e:
    print(config_error_message(e), file=sys.stderr)
    return 2
  print(json.dumps(report.to_json()) if args.json else report.table())
  return 0
