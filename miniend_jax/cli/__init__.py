"""The `miniend` command line (also `python -m miniend_jax`).

  miniend distill  --workdir DIR --teacher T --student_shape 6L-384H --recipe miniend_d
  miniend pretrain --workdir DIR --preset t5-v1_1-small
  miniend finetune --workdir DIR --init_from STUDENT --task glue_sst2
  miniend evaluate --workdir DIR [--task T] [--gin.evaluate.num_beams=4]
  miniend export   --workdir DIR --out_dir HF_DIR [--overwrite]
  miniend convert  --teacher HF_DIR --out_dir DIR   (Hugging Face -> orbax, for pods)
  miniend plan     --gin_file RUN.gin --topology v4-64 [--slices N]   (fits a TPU slice?)
  miniend quickstart [--workdir DIR]   (the offline end-to-end demo)
  miniend sweep    --gin_file F --sweep NAME=v1,v2 [...] --workdir DIR
  miniend models   (presets and student shapes with sizes)

Every setting is a gin binding (--gin_file F, --gin.NAME=VALUE); the other flags
are shorthands for the bindings they name. Expected failures end in one line,
`miniend: <what is wrong>. <what to do>.`, with exit status 2 (usage: flags,
settings, a directory made by another run) or 3 (data, checkpoints, files,
a diverged run); --debug shows the traceback instead. Ctrl-C saves and exits
130; a training run that stops finishing steps exits 4 (train/watchdog.py).
Nothing heavy is imported before a command runs, so --help and `models` answer
at once.

The package: `parser.py` (the flags of each subcommand), `commands.py` (what
each runs), `errors.py` (one-line errors, exit statuses), `logs.py` (quiet
logs), `gin_flags.py` (--gin.NAME=VALUE and gin files), `plan.py`, `sweep.py`,
`report.py` (the paper's GLUE table), `plots.py`.
"""

from __future__ import annotations

import os
import sys

from miniend_jax.cli import commands, errors, logs
from miniend_jax.cli.gin_flags import split_gin_flags
from miniend_jax.cli.parser import build_parser
# re-exported: users import it from here
from miniend_jax.cli.parser import RECIPE_NAMES  # noqa: F401  pylint: disable=unused-import


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or bool(os.environ.get("MINIEND_DEBUG"))
  logs.configure_logging(verbose="--verbose" in argv)
  try:
    rest, bindings = split_gin_flags(argv)
    command = next((a for a in rest if not a.startswith("-")), None)
    args = build_parser(command).parse_args(rest)
    commands.set_distributed_env(args)
    import gin  # pylint: disable=import-outside-toplevel
    gin.clear_config()  # one command, one configuration (main may run in a notebook)
    if "--verbose" not in argv:
      logs.load_libraries_quietly(command)
    return args.func(args, bindings)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
    print("miniend: interrupted; nothing after the last saved checkpoint was kept.",
          file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    code = errors.exit_code(e)
    if code is None or debug:
      raise
    print(f"miniend: {errors.message(e)}", file=sys.stderr)
    return code
