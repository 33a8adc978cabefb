"""What can be wrong with a checkpoint, and the errors that say so.

No checkpoint (or not the step asked for): `NoCheckpointError`, with advice.
A step that exists but does not read (damaged or incomplete files):
`CheckpointRestoreError`, naming it. A checkpoint of another model or
optimizer than the state to restore into: ValueError from `check_matches`,
listing the arrays that differ (a config error, which no older step mends).
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any


class NoCheckpointError(FileNotFoundError):
  """The directory holds no (finished) checkpoint, or not the step asked for."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint step exists but cannot be read (damaged or incomplete files)."""

  def __init__(self, message: str, *, step: int, directory: str):
    super().__init__(message)
    self.step = step
    self.directory = directory


def no_checkpoint_message(directory) -> str:
  return (f"no checkpoint in {directory}; run `miniend distill` first or pass --init_from "
          "(a checkpoint directory or a Hugging Face model).")


def short_error(error: Exception, limit: int = 500) -> str:
  """The first line of an error, without tensorstore's (very long) spec dump."""
  text = str(error).split(" [tensorstore_spec=")[0].strip().splitlines()
  text = text[0] if text else ""
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------
# Tree checks.


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{"a.b.c": shape} over the leaves of a pytree, named as orbax names them."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # Leaves are arrays, ShapeDtypeStructs or orbax ArrayMetadata: all have .shape.
  return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
          for path, leaf in leaves}


def check_matches(saved: PyTree, target: PyTree, step: int, directory) -> None:
  """Raises ValueError when `target` asks for arrays the checkpoint lacks or shapes differ.

  This separates "you are restoring the wrong thing" (a config error; no older
  step would help) from damaged files.
  """
  saved_shapes, target_shapes = _flat_shapes(saved), _flat_shapes(target)
  missing = sorted(set(target_shapes) - set(saved_shapes))
  unexpected = sorted(set(saved_shapes) - set(target_shapes))
  wrong = sorted(k for k in set(target_shapes) & set(saved_shapes)
                 if saved_shapes[k] != target_shapes[k])
  if not (missing or unexpected or wrong):
    return
  head = lambda names: f"{names[:5]}{' ...' if len(names) > 5 else ''}"
  details = []
  if missing:
    details.append(f"missing from the checkpoint: {head(missing)}")
  if unexpected:
    details.append(f"in the checkpoint but not the target: {head(unexpected)}")
  if wrong:
    details.append("shape differs: " + ", ".join(
        f"{k} saved {saved_shapes[k]} vs target {target_shapes[k]}" for k in wrong[:5]))
  raise ValueError(
      f"Checkpoint step {step} in {directory} does not match the state to restore into "
      f"({'; '.join(details)}). It was saved with another model config or optimizer; "
      "build the target from the checkpoint's metadata (load_model_config) and the run's "
      "optimizer settings.")
