#!/usr/bin/env python3
"""Print finetuned GLUE dev scores in the paper's table layout.

  python scripts/collect_glue_table.py ROOT [--models a,b] [--csv out.csv]

ROOT holds one directory per model, each with the finetuning runs that
`miniend evaluate` scored (ROOT/<model>/**/eval/glue_<task>.json); see
miniend_jax/cli/report.py for the columns and how they are computed.
"""

import sys

from miniend_jax.cli import report

if __name__ == "__main__":
  sys.exit(report.main())
