"""What one checkpoint step holds, and how each of its orbax items is written.

    <directory>/<step>/state/          the TrainState (StandardCheckpointHandler)
    <directory>/<step>/data_iterator/  files each process writes for its part of
                                       the data (`DataIteratorHandler`)
    <directory>/<step>/data_state/     a JSON-able data position (`encode_data_state`)
    <directory>/<step>/metadata/       model config, run metadata, metrics (JSON)

`checkpoints.Checkpointer` saves and restores these items together.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from miniend_jax.model.config import T5Config

DataState = Mapping[str, Any] | bytes | None

STATE, DATA_STATE, DATA_ITERATOR, METADATA = "state", "data_state", "data_iterator", "metadata"
FORMAT = "miniend_jax.checkpoint/2"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores an input iterator that writes its own files.

  The iterator has `save(directory: str)` and `restore(directory: str)`; every
  process calls them (each writes and reads its own part, e.g. the logical
  data shards it owns). Saving is synchronous, so the position written is the
  one at the time of `Checkpointer.save`, even when the arrays are written
  asynchronously afterwards.
  """

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(os.fspath(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> None:
    args.iterator.restore(os.fspath(directory))

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
  """A fresh handler per item, as orbax's CheckpointManager takes them."""
  return {
      STATE: ocp.StandardCheckpointHandler(),
      DATA_STATE: ocp.JsonCheckpointHandler(),
      DATA_ITERATOR: DataIteratorHandler(),
      METADATA: ocp.JsonCheckpointHandler(),
  }


# ----------------------------------------------------------------------------
# JSON encodings.


def encode_data_state(data_state: DataState) -> dict:
  """The data iterator position as a JSON object; bytes go through base64."""
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"kind": "bytes", "base64": base64.b64encode(bytes(data_state)).decode("ascii")}
  if isinstance(data_state, Mapping):
    try:
      value = json.loads(json.dumps(dict(data_state)))
    except (TypeError, ValueError) as e:
      raise TypeError(f"data_state must be JSON-serialisable (or bytes): {e}") from e
    return {"kind": "json", "value": value}
  raise TypeError(f"data_state must be a dict, bytes or None, got {type(data_state).__name__}.")


def decode_data_state(encoded: Mapping | None) -> DataState:
  if not encoded or encoded.get("kind") == "none":
    return None
  if encoded["kind"] == "bytes":
    return base64.b64decode(encoded["base64"])
  return encoded["value"]


def scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float] | None:
  """Metrics as plain floats (JSON-able); they may arrive as jax / numpy scalars."""
  if metrics is None:
    return None
  out = {}
  for name, value in jax.device_get(dict(metrics)).items():
    value = np.asarray(value)
    if value.size != 1:
      raise ValueError(f"Checkpoint metric {name!r} must be a scalar, got shape {value.shape}.")
    out[str(name)] = float(value.reshape(()))
  return out


def config_dict(model_config: T5Config | Mapping | None) -> dict | None:
  if model_config is None:
    return None
  if isinstance(model_config, T5Config):
    return model_config.to_dict()
  return dict(model_config)
