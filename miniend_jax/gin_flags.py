"""Gin on the command line: `--gin.NAME=VALUE` flags and gin files.

Shared by every command that takes gin settings (`miniend distill | pretrain |
finetune | evaluate | export`, `miniend sweep`), so that none of them imports
another command's module to read its flags.

  rest, bindings = split_gin_flags(sys.argv[1:])   # --gin.X=1 -> "X = 1"
  parse_gin(["gin_configs/runs/quickstart_distill.gin"], bindings)

Gin files are looked up as given, then relative to the current directory and
to the repository root (so `gin_configs/...` works from anywhere in a clone).
"""

from __future__ import annotations

import os
from typing import Sequence

# Where relative gin file names (and their `include`s) are looked up.
SEARCH_PATH = (os.getcwd, lambda: os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GinError(ValueError):
  """A gin file or binding that cannot be applied."""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates --gin.NAME=VALUE flags (as "NAME = VALUE" bindings) from the other arguments."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise GinError(f"{arg!r}: write --gin.NAME=VALUE.")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files and "NAME = VALUE" bindings (after importing every configurable).

  Raises GinError for a missing file or a binding gin rejects, with a hint.
  """
  import gin  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel,unused-import

  search = [where() for where in SEARCH_PATH]
  for path in search:
    gin.add_config_file_search_path(path)
  for f in gin_files:
    if not os.path.exists(f) and not any(os.path.exists(os.path.join(p, f)) for p in search):
      raise GinError(f"gin file {f!r} not found (looked in {search}).")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, KeyError, SyntaxError) as e:
    raise GinError(f"Invalid gin configuration: {e}\nCheck the binding's name against the "
                   "configurables in README.md (e.g. TrainConfig.num_steps=100) and quote "
                   "strings (--gin.TrainConfig.task=\"'pydoc_span_corruption'\").") from e
