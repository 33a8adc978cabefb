"""Compile a run's training step for a TPU slice from this CPU host (libtpu, ahead of time).

  python benchmarks/aot_plan.py --gin_file gin_configs/runs/paper_t5_11b_6L768H.gin \
      --topology v4-64 [--slices N] [--gin.NAME=VALUE ...]

Builds the exact step the run loop jits (`program.build_step_program`) on the
topology's abstract devices, compiles it with the TPU compiler and prints the
plan's table, then one JSON line with at least fits, bytes_per_chip,
hbm_per_chip_bytes, compile_s, xla_flops, xla_bytes_accessed, analytic_flops,
roofline_step_s, roofline_mfu, roofline_bound, compiler_step_s (libtpu's
optimal_seconds when positive, else null) and step_s_at_50pct_mfu. A step that
does not fit is an answer (fits false, exit 0);
a config that cannot be built exits 2 with a `miniend: ...` message.

Needs libtpu (`pip install -e '.[plan]'`). Imports neither seqio nor TensorFlow
at import time (reading a run's gin file imports the run loop, which does).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
  from miniend_jax.cli import plan  # pylint: disable=import-outside-toplevel
  from miniend_jax.cli.gin_flags import split_gin_flags  # pylint: disable=import-outside-toplevel
  parser = plan.add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
  try:
    rest, bindings = split_gin_flags(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    report = plan.report_from_args(args, bindings)
  except plan.CONFIG_ERRORS as e:
    print(plan.config_error_message(e), file=sys.stderr)
    return 2
  print(report.table())
  print(json.dumps({"benchmark": "aot_plan", "gin_file": args.gin_file, "bindings": bindings,
                    **report.to_json()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
