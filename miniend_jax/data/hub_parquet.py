"""GLUE, CNN/DailyMail and XSum from the Hugging Face Hub's parquet files instead of TFDS.

CNN/DailyMail's TFDS builder downloads from a host that often refuses and
XSum's needs a manual download; the same data is on the Hub as parquet:
`nyu-mll/glue`, `abisee/cnn_dailymail` (config 3.0.0) and `EdinburghNLP/xsum`.
Their columns carry the TFDS feature names (sentence1, label, idx, article,
highlights, document, summary, ...), so the tasks keep their preprocessors,
labels and metrics and only their source changes:

  register_hub_tasks("gs://bucket/hf")   # or a local copy, or "hf://datasets"

reads `<dir>/<repo id>/...` or `<dir>/<glue|cnn_dailymail|xsum>/...`, in the
Hub's layouts: `<config>/<split>-NNNNN-of-NNNNN.parquet`, the parquet
conversion's `<config>/<split>/NNNN.parquet`, or `data/<split>-*.parquet`.
Nothing is read until a dataset is built.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from miniend_jax.data import sources
from miniend_jax.data import tasks

GLUE_REPO, CNN_DAILYMAIL_REPO, XSUM_REPO = "nyu-mll/glue", "abisee/cnn_dailymail", "EdinburghNLP/xsum"
CNN_DAILYMAIL_CONFIG = "3.0.0"

# The text features of each TFDS glue config (the Hub's columns of the same names).
GLUE_TEXT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"), "mnli_matched": ("premise", "hypothesis"),
    "mnli_mismatched": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
SUMMARIZATION_FIELDS = {"cnn_dailymail": ("article", "highlights"), "xsum": ("document", "summary")}


def split_patterns(repo_dir: str, config: str, split: str) -> list[str]:
  """Globs of one split's parquet files in the Hub's layouts (`config` "" for none)."""
  base = f"{repo_dir.rstrip('/')}/{config}".rstrip("/")
  patterns = [f"{base}/{split}-*.parquet", f"{base}/{split}/*.parquet"]
  if not config:
    patterns += [f"{base}/data/{split}-*.parquet", f"{base}/default/{split}/*.parquet"]
  return patterns


def _repo_dirs(hf_data_dir: str, repo: str, short: str) -> list[str]:
  root = hf_data_dir.rstrip("/")
  return [f"{root}/{repo}", f"{root}/{short}"]


def _source(hf_data_dir: str, repo: str, short: str, config: str,
            splits: Mapping[str, str], fields: Sequence[str],
            dtypes: Mapping[str, tf.DType]) -> sources.FileSource:
  patterns = {split: [p for d in _repo_dirs(hf_data_dir, repo, short)
                      for p in split_patterns(d, config, hub_split)]
              for split, hub_split in splits.items()}
  return sources.FileSource(patterns, fields, dtypes=dtypes, file_format="parquet")


def glue_source(hf_data_dir: str, config: str) -> sources.FileSource:
  """The Hub-parquet source of `glue_<config>`: its TFDS features, same names and dtypes."""
  label = tf.float32 if config == "stsb" else tf.int64
  return _source(hf_data_dir, GLUE_REPO, "glue", config, tasks.GLUE_SPLITS[config],
                 GLUE_TEXT_FIELDS[config] + ("label", "idx"), {"label": label, "idx": tf.int32})


def summarization_source(hf_data_dir: str, name: str) -> sources.FileSource:
  """The Hub-parquet source of `cnn_dailymail` or `xsum`."""
  repo, config = ((CNN_DAILYMAIL_REPO, CNN_DAILYMAIL_CONFIG) if name == "cnn_dailymail"
                  else (XSUM_REPO, ""))
  return _source(hf_data_dir, repo, name, config,
                 {s: s for s in ("train", "validation", "test")},
                 SUMMARIZATION_FIELDS[name], {})


def register_hub_tasks(hf_data_dir: str) -> list[str]:
  """Re-registers glue_<config>, glue, cnn_dailymail and xsum over the Hub's parquet
  files under `hf_data_dir` (their vocabulary, preprocessors and metrics unchanged).
  Idempotent; returns the names."""
  names = []
  for config in tasks.GLUE_CONFIGS:
    task = seqio.get_mixture_or_task(f"glue_{config}")
    tasks.add_to_registry(task.replace(source=glue_source(hf_data_dir, config)))
    names.append(task.name)
  for name in SUMMARIZATION_FIELDS:
    task = seqio.get_mixture_or_task(name)
    tasks.add_to_registry(task.replace(source=summarization_source(hf_data_dir, name)))
    names.append(name)
  # A mixture holds its task objects: rebuild it over the new ones.
  tasks.add_to_registry(seqio.Mixture(
      "glue", [(f"glue_{c}", rate) for c, rate in tasks.GLUE_TRAIN_EXAMPLES.items()]))
  return names + ["glue"]
