"""Gin on the command line: `--gin.NAME=VALUE` flags and gin files.

Shared by every command that takes gin settings (`miniend distill | pretrain |
finetune | evaluate | export`, `miniend sweep`), so that none of them imports
another command's module to read its flags.

  rest, bindings = split_gin_flags(sys.argv[1:])   # --gin.X=1 -> "X = 1"
  parse_gin(["gin_configs/runs/quickstart_distill.gin"], bindings)

Gin files are looked up as given, then relative to the current directory, the
repository root (a clone) and the installed package (a wheel ships the tree as
miniend_jax/gin_configs), so `--gin_file gin_configs/runs/...` and the files'
own `include 'gin_configs/...'` lines work from any directory either way.
"""

from __future__ import annotations

import ast
import os
from typing import Sequence

# The installed package, miniend_jax/ (this file is miniend_jax/cli/gin_flags.py).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where relative gin file names (and their `include`s) are looked up: the current
# directory, the repository root (a clone), the package (a wheel).
SEARCH_PATH = (os.getcwd, lambda: os.path.dirname(_PACKAGE_DIR), lambda: _PACKAGE_DIR)


class GinError(ValueError):
  """A gin file or binding that cannot be applied."""


def gin_value(value: str) -> str:
  """`value` as a gin expression: literals and references as they are, bare words quoted
  (so --gin.ModelSetup.student_shape=2L-64H means the string '2L-64H')."""
  value = value.strip()
  if value.startswith(("@", "%")):
    return value
  try:
    ast.literal_eval(value)
    return value
  except (ValueError, SyntaxError):
    return repr(value)


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates --gin.NAME=VALUE flags (as "NAME = VALUE" bindings) from the other arguments."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name.strip():
        raise GinError(f"{arg!r} is not a gin binding: write --gin.NAME=VALUE, e.g. "
                       "--gin.TrainConfig.num_steps=100.")
      bindings.append(f"{name.strip()} = {gin_value(value)}")
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
  for f in gin_files:
    try:
      gin.parse_config_file(f)
    except (ValueError, KeyError, SyntaxError, IOError) as e:
      raise GinError(f"gin file {f}: {_first_line(e)}. Check the name against the "
                     "configurables in README.md (e.g. TrainConfig.num_steps).") from e
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, KeyError, SyntaxError) as e:
      name, _, value = binding.partition(" = ")
      raise GinError(f"--gin.{name}={value}: {_first_line(e)}. Check the name against the "
                     "configurables in README.md (e.g. --gin.TrainConfig.num_steps=100).") from e


def _first_line(error: Exception) -> str:
  """gin's message without its location trailer, on one line."""
  text = " ".join(str(error).split("\n")[:2]).strip()
  return text.rstrip(".")
