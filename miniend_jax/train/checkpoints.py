"""Checkpoints of a run on orbax's `CheckpointManager`.

A checkpoint step is one directory holding these orbax items:

    <directory>/<step>/state/          the TrainState (params, opt_state, step) as
                                       sharded arrays (tensorstore / OCDBT)
    <directory>/<step>/data_iterator/  the input pipeline's position: files each
                                       process writes for its part of the data
                                       (`train/inputs.py`), when a run passes one
    <directory>/<step>/data_state/     a JSON-able data position, for callers that
                                       keep their own
    <directory>/<step>/metadata/       model config, run metadata, metrics (JSON)

so the state, the data position and the facts needed to rebuild the model
without gin are always saved and restored together: every process writes its
part into the step's temporary directory, and orbax commits the step only
when all of them are done.

Safety comes from orbax: each step is written into
`<step>.orbax-checkpoint-tmp-*` and renamed when complete (on GCS, committed
with a commit_success.txt marker), so a crash never leaves a half-written step
that looks finished; unfinished tmp directories are ignored and cleaned up.
Old steps are deleted only after a newer one has been committed, by a
preservation policy that keeps the last `max_to_keep` and the `keep_best`
best by a metric. Restoring never deletes anything: a damaged step raises
`CheckpointRestoreError` naming it, and `restore_latest_good` falls back to
older steps.

Here: `CheckpointConfig`, the `Checkpointer`, and the read-side functions that
start from another run's checkpoint (`latest_step`, `load_metadata`,
`load_model_config`, `load_params_from_checkpoint`). The items and their
encodings are in `checkpoint_items.py`, the errors and the target check in
`checkpoint_errors.py`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
from typing import Any, Mapping

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from miniend_jax.model import stacking
from miniend_jax.model.config import T5Config
from miniend_jax.train.checkpoint_errors import (CheckpointRestoreError, NoCheckpointError,
                                                 check_matches, no_checkpoint_message,
                                                 short_error)
from miniend_jax.train.checkpoint_items import (DATA_ITERATOR, DATA_STATE, FORMAT, METADATA,
                                                STATE, DataIteratorRestore, DataIteratorSave,
                                                DataState, config_dict, decode_data_state,
                                                encode_data_state, item_handlers,
                                                scalar_metrics)
# re-exported: users import them from here (as the errors and item names above)
from miniend_jax.train.checkpoint_items import DataIteratorHandler  # noqa: F401

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep.

  Attributes:
    save_interval_steps: `save` writes only on multiples of this (or with force=True).
    max_to_keep: how many of the most recent steps to keep (>= 1; None = all).
    best_metric: a key of the `metrics` passed to `save`; the `keep_best` best
      steps by it are kept in addition to the most recent ones. None = off.
    best_mode: "min" (e.g. loss) or "max" (e.g. accuracy).
    keep_best: how many best steps to keep.
    async_save: write in a background thread; `save` returns once the arrays
      are copied to host memory, so the train step may donate them right after.
  """

  save_interval_steps: int = 1000
  max_to_keep: int | None = 3
  best_metric: str | None = None
  best_mode: str = "min"
  keep_best: int = 1
  async_save: bool = True

  def __post_init__(self):
    if not isinstance(self.save_interval_steps, int) or self.save_interval_steps < 1:
      raise ValueError(f"CheckpointConfig.save_interval_steps={self.save_interval_steps!r} "
                       "must be a positive integer.")
    if self.max_to_keep is not None and (not isinstance(self.max_to_keep, int)
                                         or self.max_to_keep < 1):
      # 0 would let a save delete the only good checkpoint.
      raise ValueError(f"CheckpointConfig.max_to_keep={self.max_to_keep!r} must be an "
                       "integer >= 1 (or None to keep every checkpoint).")
    if self.best_mode not in ("min", "max"):
      raise ValueError(f"CheckpointConfig.best_mode={self.best_mode!r} must be 'min' or 'max'.")
    if not isinstance(self.keep_best, int) or self.keep_best < 1:
      raise ValueError(f"CheckpointConfig.keep_best={self.keep_best!r} must be an integer >= 1.")


# ----------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Saves and restores TrainStates, data positions and metadata in `directory`.

    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(save_interval_steps=500),
                        model_config=cfg, metadata={"recipe": "miniend_d"})
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(target_state=abstract_state)
    for ...:
      ckpt.save(step, state, data_state=it.get_state(), metrics={"loss": loss})
    ckpt.save(step, state, data_state=..., force=True)   # at the end
    ckpt.close()

  Every process of a multi-host job must make the same calls. The data state
  and metadata are JSON written by the primary process only, so in multi-host
  runs `data_state` must describe the position of every process; a
  `data_iterator` instead writes each process's own part (what the run loop
  uses).
  """

  def __init__(self, directory: str | epath.PathLike, config: CheckpointConfig = CheckpointConfig(),
               *, model_config: T5Config | Mapping | None = None,
               metadata: Mapping[str, Any] | None = None, read_only: bool = False):
    """
    Args:
      directory: local path or gs:// URL; created if missing.
      config: save and retention policy.
      model_config: saved with each step so evaluate / export can rebuild the
        model without gin.
      metadata: any JSON-able run facts (recipe, teacher, git revision, ...).
      read_only: for reading another run: never writes, deletes or creates
        anything (not even `directory`).
    """
    directory = os.fspath(directory)
    if "://" not in directory:  # orbax wants absolute paths; users give relative ones
      directory = os.path.abspath(os.path.expanduser(directory))
    self.directory = epath.Path(directory)
    self.config = config
    self._model_config = config_dict(model_config)
    self._run_metadata = json.loads(json.dumps(dict(metadata or {})))
    # A reader is this process's alone: hosts of a pod query at different times
    # (one may see the directory another just created), so a reader that joined
    # orbax's global barriers would pair them with another host's save barriers.
    options = (ocp.CheckpointManagerOptions(
        read_only=True, create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}))
               if read_only else self._options(config))
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=item_handlers(), options=options)

  @staticmethod
  def _options(config: CheckpointConfig) -> ocp.CheckpointManagerOptions:
    policies = [ocp_managers.LatestN(n=config.max_to_keep)]
    best_fn = None
    if config.best_metric is not None:
      # A step saved without the metric ranks last, so it never displaces the best.
      worst = math.inf if config.best_mode == "min" else -math.inf
      best_fn = lambda metrics: float((metrics or {}).get(config.best_metric, worst))
      policies.append(ocp_managers.BestN(
          get_metric_fn=best_fn, reverse=config.best_mode == "min", n=config.keep_best,
          keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        save_interval_steps=config.save_interval_steps,
        # Keep-if-any-keeps: the last K and the best N. orbax's legacy
        # max_to_keep + best_fn would keep only the best.
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        # best_fn is still set so orbax writes each step's metrics to disk and
        # the ranking survives a restart (and best_step() works).
        best_fn=best_fn, best_mode=config.best_mode,
        enable_async_checkpointing=config.async_save,
        cleanup_tmp_directories=True,
        create=True)

  # -- Queries.

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The best step by `best_metric` (the latest when there is no metric)."""
    return self._manager.best_step()

  def step_directory(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def item_directory(self, step: int, item: str) -> epath.Path:
    """Where a finished step keeps one item (STATE, DATA_ITERATOR, ...)."""
    return self.step_directory(step) / item

  # -- Saving.

  def save(self, step: int, state: PyTree, *, data_state: DataState = None,
           data_iterator: Any = None, metrics: Mapping[str, Any] | None = None,
           force: bool = False, chunk_bytes: int | None = None) -> bool:
    """Saves `state` (a TrainState or any pytree of arrays) at `step`.

    Writes only when `step` is a multiple of `save_interval_steps` or `force`
    (use it for the final step and before preemption). A step that already
    exists is left alone.

    Args:
      data_state: a data position, a JSON-able dict or bytes.
      data_iterator: an iterator with `save(directory)` / `restore(directory)`
        (e.g. `inputs.GlobalBatchReader`); its position is written into this
        step before `save` returns.
      metrics: scalars (e.g. {"eval_loss": ...}); `best_metric` ranks by them.
      chunk_bytes: store arrays in chunks of at most this size (default: one chunk
        per process's part), so hosts that shard them otherwise read only theirs.
    Returns:
      Whether a checkpoint was started (it completes asynchronously).
    """
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("Checkpoint step %d already exists in %s; not saving again.", step,
                   self.directory)
      return False
    if not force and not self._manager.should_save(step):
      return False
    metrics = scalar_metrics(metrics)
    metadata = {
        "format": FORMAT,
        "step": step,
        "model_config": self._model_config,
        "run": self._run_metadata,
        "metrics": metrics,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    save_args = None if chunk_bytes is None else jax.tree.map(
        lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), state)
    items = {
        STATE: ocp.args.StandardSave(state, save_args=save_args),
        DATA_STATE: ocp.args.JsonSave(encode_data_state(data_state)),
        METADATA: ocp.args.JsonSave(metadata),
    }
    if data_iterator is not None:
      items[DATA_ITERATOR] = DataIteratorSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves (and their old-step cleanup) are done."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- Restoring.

  def _require_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise NoCheckpointError(no_checkpoint_message(self.directory))
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise NoCheckpointError(
          f"no checkpoint for step {step} in {self.directory}; available steps: {steps}.")
    return int(step)

  def _restore_error(self, step: int, error: Exception) -> CheckpointRestoreError:
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      advice = (f"restore an earlier step with Checkpointer.restore(step={earlier[-1]}) "
                f"(available: {self.all_steps()}) or Checkpointer.restore_latest_good() (what "
                "a resumed run does), or ")
    else:
      advice = ""
    return CheckpointRestoreError(
        f"Checkpoint step {step} in {self.directory} could not be read: its files are damaged "
        f"or incomplete. To continue, {advice}move {self.step_directory(step)} out of the "
        f"directory. Nothing was deleted. Cause: {short_error(error)}",
        step=step, directory=str(self.directory))

  def restore(self, step: int | None = None, target_state: PyTree = None, *,
              data_iterator: Any = None) -> tuple[PyTree, DataState]:
    """Restores a step (default: the latest) and its data iterator position.

    Args:
      step: which step; None = latest.
      target_state: the state's structure with `jax.ShapeDtypeStruct` (or
        array) leaves carrying shardings, e.g. `state.abstract_train_state(...)`.
        Arrays are read straight into those shardings, so the mesh may differ
        from the one that saved. None restores the saved tree as nested dicts
        with the saved shardings (same devices only).
      data_iterator: an iterator to move to the saved input position (the step
        must have been saved with one).
    Returns:
      (state, data_state): the state shaped like `target_state`, and the
      data_state given to `save` (dict, bytes or None).
    Raises:
      NoCheckpointError: no checkpoint, or not that step.
      ValueError: the checkpoint does not match `target_state`.
      CheckpointRestoreError: the step's files are damaged.
    """
    self.wait_until_finished()
    step = self._require_step(step)
    if target_state is not None:
      try:
        saved = self._manager.item_metadata(step)[STATE]
      except Exception as e:  # pylint: disable=broad-except
        raise self._restore_error(step, e) from e
      if saved is None:
        raise self._restore_error(step, FileNotFoundError("the state item's metadata is missing"))
      check_matches(getattr(saved, "tree", saved), target_state, step, self.directory)
    items = {STATE: ocp.args.StandardRestore(target_state), DATA_STATE: ocp.args.JsonRestore()}
    if data_iterator is not None:
      items[DATA_ITERATOR] = DataIteratorRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # orbax / tensorstore raise many types for unreadable files.
      raise self._restore_error(step, e) from e
    return restored[STATE], decode_data_state(restored[DATA_STATE])

  def restore_latest_good(self, target_state: PyTree = None, *,
                          data_iterator: Any = None) -> tuple[PyTree, DataState]:
    """Restores the newest step that every process reads cleanly, skipping damaged ones.

    Each process tries the steps, newest first, on its own (through a reader
    that joins no cross-host barrier), and after each try the processes agree
    on whether all of them read it: all restore the newest step that every one
    read. (A host falling back alone would mix two steps' parameter shards and
    data positions, then hang at the next barrier.) Damaged steps are logged,
    naming the processes that could not read them, and left on disk (never
    deleted). Raises NoCheckpointError when there is no step, and
    CheckpointRestoreError (about the newest step) when none reads.
    """
    errors = []
    with Checkpointer(self.directory, read_only=True) as reader:
      for step in reversed(self._require_steps_list()):
        try:
          restored, error = reader.restore(step, target_state, data_iterator=data_iterator), None
        except CheckpointRestoreError as e:
          restored, error = None, e
          logging.warning("Skipping unreadable checkpoint: %s", e)
        failed = _processes_that_failed(step, error is not None, self.directory)
        if not failed:
          if errors:
            logging.warning("Restored step %d of %s after skipping steps %s that not every "
                            "process could read.", step, self.directory,
                            [e.step for e in errors])
          return restored
        if error is None:
          logging.warning("Checkpoint step %d of %s reads here, but not on process(es) %s: "
                          "every process falls back to an older step.", step, self.directory,
                          failed)
        errors.append(error or CheckpointRestoreError(
            f"Checkpoint step {step} in {self.directory} could not be read on process(es) "
            f"{failed} (their logs say why).", step=step, directory=str(self.directory)))
    raise CheckpointRestoreError(
        f"No checkpoint step in {self.directory} could be read (tried "
        f"{[e.step for e in errors]}). The newest failed with: {errors[0]}",
        step=errors[0].step, directory=str(self.directory))

  def _require_steps_list(self) -> list[int]:
    self.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      raise NoCheckpointError(no_checkpoint_message(self.directory))
    return steps

  def metadata(self, step: int | None = None) -> dict:
    """The metadata JSON saved with a step (model_config, run, metrics, ...)."""
    self.wait_until_finished()
    step = self._require_step(step)
    try:
      return self._manager.restore(
          step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA]
    except Exception as e:  # pylint: disable=broad-except
      raise self._restore_error(step, e) from e


def _processes_that_failed(step: int, failed_here: bool, directory) -> list[int]:
  """The processes that could not read `step` (the same list on every process).

  Every process calls it once per step it tries, so all make the same calls; a
  process that lists other steps than the others (it could not see the same
  directory) ends the restore on all of them at once.
  """
  if jax.process_count() == 1:
    return [0] if failed_here else []
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  gathered = np.asarray(multihost_utils.process_allgather(
      np.asarray([step, int(failed_here)], np.int64))).reshape(-1, 2)
  if len(set(gathered[:, 0].tolist())) > 1:
    raise CheckpointRestoreError(
        f"The processes see different checkpoint steps in {directory} (trying "
        f"{gathered[:, 0].tolist()} by process): they do not read the same directory. Give "
        "every host the same --workdir on storage they all share (gs://).",
        step=step, directory=str(directory))
  return [index for index, failed in enumerate(gathered[:, 1].tolist()) if failed]


# ----------------------------------------------------------------------------
# Starting from another run's checkpoint.


def _read_only(directory) -> Checkpointer:
  return Checkpointer(directory, read_only=True)


def latest_step(directory) -> int | None:
  """The newest finished step in `directory` (None if there is none or no directory)."""
  if not epath.Path(directory).exists():
    return None
  with _read_only(directory) as reader:  # closed: no orbax threads outlive the query
    return reader.latest_step()


def require_checkpoint(directory, step: int | None = None) -> int:
  """The step to load (latest by default); NoCheckpointError with advice if absent."""
  if not epath.Path(directory).exists():
    raise NoCheckpointError(no_checkpoint_message(directory))
  with _read_only(directory) as reader:
    return reader._require_step(step)


def load_metadata(directory, step: int | None = None) -> dict:
  """The metadata JSON of a step (latest by default)."""
  require_checkpoint(directory, step)
  with _read_only(directory) as reader:
    return reader.metadata(step)


def load_model_config(directory, step: int | None = None) -> T5Config:
  """The T5Config a checkpoint was saved with, for evaluate / export without gin."""
  meta = load_metadata(directory, step)
  if not meta.get("model_config"):
    raise ValueError(f"The checkpoint in {directory} was saved without a model config; "
                     "pass model_config= to Checkpointer when saving.")
  return T5Config(**meta["model_config"])


def load_params_from_checkpoint(directory, step: int | None = None, *,
                                target_params: PyTree = None) -> PyTree:
  """The model parameters of a saved TrainState, without its optimizer state.

  Reads `params["model"]` when the state's params are {"model": ...,
  "distill": ...} (a distillation run), else `params`; nothing else is read
  from disk. Use it to finetune from a distilled student.

  Args:
    directory: a Checkpointer directory.
    step: which step (default latest).
    target_params: optional abstract params (`jax.ShapeDtypeStruct`s with
      shardings) to read straight into; default: host numpy arrays.
  """
  step = require_checkpoint(directory, step)
  path = epath.Path(directory) / str(step) / STATE
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    saved = checkpointer.metadata(path).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise _read_only(directory)._restore_error(step, e) from e
  if "params" not in saved:
    raise ValueError(f"Checkpoint step {step} in {directory} holds no TrainState params "
                     f"(top-level keys: {sorted(saved)}).")
  params = saved["params"]
  prefix = ("params", "model") if isinstance(params, Mapping) and "model" in params else ("params",)
  saved_model = params["model"] if len(prefix) == 2 else params

  if target_params is None:
    target = saved_model
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_model)
  else:
    # A checkpoint of unrolled layers (`miniend convert`, unscanned runs) restores into
    # a scanned model and the other way round: read the saved layout with the
    # matching shardings, then restack on the devices.
    target = stacking.abstract_like(target_params, saved_model)
    check_matches(saved_model, target, step, directory)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)

  def nest(tree):
    for key in reversed(prefix):
      tree = {key: tree}
    return tree

  try:
    # partial_restore: read only this subtree, never the optimizer state.
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=nest(target), restore_args=nest(restore_args), partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise _read_only(directory)._restore_error(step, e) from e
  for key in prefix:
    restored = restored[key]
  if target_params is not None and target is not target_params:
    restored = stacking.relayout(restored, stacking.is_scanned(target_params),
                                 jax.tree.map(lambda t: t.sharding, target_params))
  return restored
