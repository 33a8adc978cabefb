"""Metric writers: TensorBoard and logging through clu, plus a JSONL file.

clu has TensorBoard / logging writers but no JSON-lines one; `JsonlWriter` adds
it as a clu `MetricWriter`, so one `MultiWriter` takes every metric. Only
process 0 writes files; other processes only log.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": s, name: value, ...}."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    # Object stores (gs://) cannot append: keep the lines and rewrite the small file.
    self._remote = "://" in str(path)
    if self._remote:
      self._lines = self._path.read_text().splitlines(True) if self._path.exists() else []
    else:
      self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def _write(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()  # readable as it grows (tail -f, plots, tests)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    self._write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

  def flush(self):
    if not self._remote:
      self._file.flush()

  def close(self):
    if not self._remote:
      self._file.close()


def read_jsonl(path: str) -> list[dict]:
  """The records a JsonlWriter wrote (for plots and tests)."""
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines() if line.strip()]


def create_writer(logdir: str, name: str = "train") -> metric_writers.MetricWriter:
  """TensorBoard + logging + `<logdir>/<name>_metrics.jsonl` on process 0; logging elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(os.path.join(logdir, name), asynchronous=False),
      JsonlWriter(os.path.join(logdir, f"{name}_metrics.jsonl")),
  ])


def drop_rows_after(path: str, step: int) -> int:
  """Removes the records of steps after `step` from a JSONL metrics file (a resumed
  run logs them again); returns how many were dropped. Missing file: nothing to do."""
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(True)
  kept = [line for line in lines
          if not line.strip() or json.loads(line).get("step", -1) <= step]
  if len(kept) != len(lines):
    path.write_text("".join(kept))
  return len(lines) - len(kept)
