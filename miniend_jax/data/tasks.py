"""Registered seqio tasks and mixtures.

Tasks (registered on import with the default vocabulary, re-registered with
another by `register_tfds_tasks(vocabulary)`):

  c4_span_corruption                    TFDS c4/en, T5 span corruption
  glue_<config> for every GLUE config   TFDS glue/<config>, T5 text-to-text
  glue                                  mixture of the GLUE training tasks
  cnn_dailymail, xsum                   "summarize:" summarization, ROUGE

plus `span_corruption_task(...)` for local text / JSONL / TFRecord files and
the offline pydoc tasks of `local_corpus`. `pipeline.get_dataset(...)` turns
any of them into batches.

TFDS datasets are never downloaded at run time: a dataset that is not
prepared in the data directory raises `TfdsDatasetNotPreparedError` saying
what to do (`tfds_source`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Callable, Mapping, Optional, Sequence, Union

from absl import logging
import gin
import seqio
import tensorflow as tf

from miniend_jax.data import metrics
from miniend_jax.data import preprocessors
from miniend_jax.data import sources
from miniend_jax.data import vocab as vocab_lib
from miniend_jax.data.tfds_source import OfflineTfdsDataSource

# re-exported: users import them from here
from miniend_jax.data.jsonl_source import (  # noqa: F401
    JsonlDataSource, parse_jsonl_record, read_jsonl_files)
from miniend_jax.data.pipeline import DatasetIterator, get_dataset, host_shard_info  # noqa: F401
from miniend_jax.data.tfds_source import TfdsDatasetNotPreparedError  # noqa: F401

# Environment variable naming the vocabulary the TFDS tasks are registered
# with on import (a .model file, gs:// path or HF checkpoint directory).
VOCABULARY_ENV = "MINIEND_VOCABULARY"

C4_TFDS_NAME = "c4/en:3.1.0"
GLUE_TFDS_VERSION = "2.0.0"
CNN_DAILYMAIL_TFDS_NAME = "cnn_dailymail:3.4.0"
XSUM_TFDS_NAME = "xsum:1.1.0"

GLUE_CONFIGS = tuple(preprocessors.GLUE_LABEL_NAMES)

# Canonical split -> TFDS split of each GLUE config. MNLI's "validation" and
# "test" are the matched ones; AX has an (unlabelled) test split only.
_GLUE_STANDARD_SPLITS = {s: s for s in ("train", "validation", "test")}
GLUE_SPLITS: Mapping[str, Mapping[str, str]] = {
    **{c: _GLUE_STANDARD_SPLITS for c in GLUE_CONFIGS},
    "mnli": {
        "train": "train",
        "validation": "validation_matched",
        "validation_matched": "validation_matched",
        "validation_mismatched": "validation_mismatched",
        "test": "test_matched",
        "test_matched": "test_matched",
        "test_mismatched": "test_mismatched",
    },
    "mnli_matched": {"validation": "validation", "test": "test"},
    "mnli_mismatched": {"validation": "validation", "test": "test"},
    "ax": {"test": "test"},
}

# Training-set sizes (TFDS glue 2.0.0), the rates of the proportional `glue`
# mixture (as T5's glue_v002_proportional). Hard-coded rather than read from
# TFDS metadata so that the mixture can be built without the data.
GLUE_TRAIN_EXAMPLES: Mapping[str, int] = {
    "cola": 8_551,
    "sst2": 67_349,
    "mrpc": 3_668,
    "qqp": 363_846,
    "stsb": 5_749,
    "mnli": 392_702,
    "qnli": 104_743,
    "rte": 2_490,
    "wnli": 635,
}

# Formats `span_corruption_task` takes ("jsonl" is "json"); None: from the names.
TEXT_FILE_FORMATS = ("text", "jsonl", "json", "tfrecord", "parquet")


# ----------------------------------------------------------------------------
# Vocabulary and features
# ----------------------------------------------------------------------------


def default_vocabulary() -> seqio.SentencePieceVocabulary:
  """$MINIEND_VOCABULARY if set, else T5's public vocabulary (read lazily)."""
  return vocab_lib.get_vocabulary(
      os.environ.get(VOCABULARY_ENV, vocab_lib.DEFAULT_T5_SPM_PATH),
      validate=False,
  )


def output_features(
    vocabulary: seqio.Vocabulary,
) -> dict[str, seqio.Feature]:
  """Text-to-text features: inputs and targets, both ending in EOS."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


# ----------------------------------------------------------------------------
# Local files: validation and span corruption tasks
# ----------------------------------------------------------------------------


def span_corruption_preprocessors(
    text_key: str = "text",
    noise_density: float = preprocessors.NOISE_DENSITY,
    mean_noise_span_length: float = preprocessors.MEAN_NOISE_SPAN_LENGTH,
) -> list[Callable[..., tf.data.Dataset]]:
  """T5's span corruption pipeline over a string feature `text_key`."""
  return [
      functools.partial(
          seqio.preprocessors.rekey, key_map={"targets": text_key}
      ),
      functools.partial(
          seqio.preprocessors.tokenize, copy_pretokenized=False
      ),
      seqio.CacheDatasetPlaceholder(),
      functools.partial(
          preprocessors.span_corruption,
          noise_density=noise_density,
          mean_noise_span_length=mean_noise_span_length,
      ),
      seqio.preprocessors.append_eos_after_trim,
  ]


def span_corruption_feature_lengths(
    inputs_length: int,
    noise_density: float = preprocessors.NOISE_DENSITY,
    mean_noise_span_length: float = preprocessors.MEAN_NOISE_SPAN_LENGTH,
) -> dict[str, int]:
  """Task feature lengths whose packed rows span corruption fills exactly.

  E.g. 512 -> {"inputs": 512, "targets": 114} (T5's pretraining lengths).
  """
  _, targets_length = preprocessors.random_spans_helper(
      inputs_length, noise_density, mean_noise_span_length
  )
  return {"inputs": inputs_length, "targets": targets_length}


def add_to_registry(provider: Union[seqio.Task, seqio.Mixture]) -> None:
  """Adds or replaces a task / mixture, so registration is idempotent."""
  registry = (
      seqio.TaskRegistry
      if isinstance(provider, seqio.Task)
      else seqio.MixtureRegistry
  )
  registry.remove(provider.name)
  registry.add_provider(provider.name, provider)


# The run's bindings (`--gin.span_corruption_task.shuffle_buffer_size=10000`)
# reach the task `--train_files` registers; explicit arguments still win.
@gin.configurable(allowlist=["shuffle_buffer_size", "chunk_records"])
def span_corruption_task(
    name: str,
    vocabulary: seqio.Vocabulary,
    split_to_filepattern: Mapping[str, Union[str, Sequence[str]]],
    file_format: Optional[str] = None,
    text_key: str = "text",
    *,
    validate_files: bool = True,
    register: bool = True,
    skip_bad_records: bool = False,
    noise_density: float = preprocessors.NOISE_DENSITY,
    mean_noise_span_length: float = preprocessors.MEAN_NOISE_SPAN_LENGTH,
    shuffle_buffer_size: int = seqio.SHUFFLE_BUFFER_SIZE,
    chunk_records: int = sources.CHUNK_RECORDS,
) -> seqio.Task:
  """A span corruption task over corpus files, streamed (`sources.FileSource`).

  Args:
    name: task name.
    vocabulary: T5 vocabulary (with 100 extra ids).
    split_to_filepattern: e.g. {"train": "gs://b/c4/en/c4-train.*.json.gz"};
      local, gs:// or any filesystem `etils.epath` knows.
    file_format: None (from the file names: .json/.jsonl/.txt, optionally
      .gz, .parquet, .tfrecord) or one of `TEXT_FILE_FORMATS`.
    text_key: text field of JSON objects / parquet columns / tf.train.Example
      features.
    validate_files: check the first records of a few files of each split
      (`sources.check_files`; the corpus itself is never read here).
    register: add (or replace) it in `seqio.TaskRegistry`.
    skip_bad_records: skip (and count) bad records instead of stopping.
    noise_density: span corruption noise density.
    mean_noise_span_length: span corruption mean span length.
    shuffle_buffer_size: examples in the shuffle buffer of each data shard
      (host memory: ~ this x a document); the buffer is part of the saved
      position, so a resumed run needs the same size.
    chunk_records: records one read of a file hands to tf.data (`sources`).

  Returns:
    The `seqio.Task`.
  """
  vocab_lib.validate_vocabulary(vocabulary)
  if file_format not in (None, *TEXT_FILE_FORMATS):
    raise ValueError(
        f"file_format must be one of {TEXT_FILE_FORMATS} (or None: from the file names), "
        f"got {file_format!r}.")
  file_format = "json" if file_format == "jsonl" else file_format
  if validate_files:
    sources.check_files(split_to_filepattern, (text_key,), file_format=file_format)
  source = sources.FileSource(split_to_filepattern, (text_key,), file_format=file_format,
                              skip_bad_records=skip_bad_records, chunk_records=chunk_records)
  task = seqio.Task(
      name,
      source=source,
      output_features=output_features(vocabulary),
      preprocessors=span_corruption_preprocessors(
          text_key, noise_density, mean_noise_span_length),
      metric_fns=[],
      shuffle_buffer_size=shuffle_buffer_size,
  )
  if register:
    add_to_registry(task)
  return task


FILES_TASK = "files_span_corruption"


def register_data_tasks(config, vocabulary: Optional[seqio.Vocabulary] = None) -> str:
  """Registers what a run's `TrainConfig` points at; returns the task it reads.

  `config.hf_data_dir`: the GLUE / CNN-DM / XSum tasks read the Hub's parquet
  copies there. `config.train_files`: span corruption over those files
  (`FILES_TASK`, tokenised with `vocabulary`, default `default_vocabulary()`),
  else `config.task`.
  """
  if config.hf_data_dir:
    from miniend_jax.data import hub_parquet  # pylint: disable=import-outside-toplevel
    hub_parquet.register_hub_tasks(config.hf_data_dir)
  if not config.train_files:
    return config.task
  if not config.validation_files:
    logging.warning("No validation files (--validation_files): the evaluation reads the "
                    "train files.")
  span_corruption_task(
      FILES_TASK, vocabulary or default_vocabulary(),
      {"train": config.train_files,
       "validation": config.validation_files or config.train_files},
      text_key=config.text_field or "text", skip_bad_records=config.skip_bad_records)
  return FILES_TASK


def vocabulary_tag(vocabulary: seqio.Vocabulary) -> str:
  """A short, content-derived name for a vocabulary: "byt5" or "spm_<hash>"."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return vocab_lib.BYT5
  model = getattr(vocabulary, "sp_model", None) or repr(vocabulary).encode()
  return "spm_" + hashlib.sha256(model).hexdigest()[:10]


def _for_vocabulary(step, vocabulary: seqio.Vocabulary):
  """A preprocessor, with span corruption following the vocabulary's convention:
  ByT5's 20-byte mean noise span on bytes, unless a span length was chosen."""
  if (isinstance(vocabulary, seqio.ByteVocabulary)
      and isinstance(step, functools.partial)
      and step.func is preprocessors.span_corruption
      and step.keywords.get("mean_noise_span_length",
                            preprocessors.MEAN_NOISE_SPAN_LENGTH)
      == preprocessors.MEAN_NOISE_SPAN_LENGTH):
    return functools.partial(
        step, mean_noise_span_length=preprocessors.BYT5_MEAN_NOISE_SPAN_LENGTH)
  return step


def retokenized(name: str, vocabulary: seqio.Vocabulary) -> str:
  """Registers task or mixture `name` tokenised with `vocabulary` instead.

  For runs whose teacher brings its own vocabulary (mT5, umT5, ByT5): the same
  sources, preprocessors, metrics and mixing rates, every feature re-tokenised,
  and span corruption in the vocabulary's convention (see `_for_vocabulary`).
  Idempotent.

  Args:
    name: a registered seqio task or mixture.
    vocabulary: the vocabulary to tokenise with (T5 layout; see
      `vocab.validate_vocabulary`).

  Returns:
    The registered copy's name, `<name>.<vocabulary_tag>`; `name` itself when
    it already uses `vocabulary`.
  """
  vocab_lib.validate_vocabulary(vocabulary)
  provider = seqio.get_mixture_or_task(name)
  if all(f.vocabulary == vocabulary for f in provider.output_features.values()):
    return name
  tag = vocabulary_tag(vocabulary)

  def copy_task(task: seqio.Task) -> str:
    features = {k: seqio.Feature(vocabulary=vocabulary, add_eos=f.add_eos,
                                 required=f.required, dtype=f.dtype, rank=f.rank)
                for k, f in task.output_features.items()}
    steps = [_for_vocabulary(step, vocabulary) for step in task.preprocessors]
    copy = task.replace(name=f"{task.name}.{tag}",
                        output_features=features, preprocessors=steps)
    add_to_registry(copy)
    return copy.name

  if isinstance(provider, seqio.Task):
    return copy_task(provider)
  add_to_registry(seqio.Mixture(
      f"{name}.{tag}", [(copy_task(t), provider.get_rate(t)) for t in provider.tasks]))
  return f"{name}.{tag}"


# ----------------------------------------------------------------------------
# TFDS tasks
# ----------------------------------------------------------------------------


def text_to_text_preprocessors(text_preprocessor) -> list:
  """The steps of a text-to-text task after its own `text_preprocessor`."""
  return [
      text_preprocessor,
      seqio.preprocessors.tokenize,
      seqio.CacheDatasetPlaceholder(),
      seqio.preprocessors.append_eos_after_trim,
  ]


def glue_task(
    config_name: str,
    vocabulary: seqio.Vocabulary,
    tfds_data_dir: Optional[str] = None,
) -> seqio.Task:
  """The `glue_<config_name>` task (not registered)."""
  label_names = preprocessors.GLUE_LABEL_NAMES[config_name]
  if label_names is None:
    postprocess_fn = metrics.string_to_float
  else:
    postprocess_fn = functools.partial(
        metrics.string_label_to_class_id, label_classes=list(label_names)
    )
  return seqio.Task(
      f"glue_{config_name}",
      source=OfflineTfdsDataSource(
          f"glue/{config_name}:{GLUE_TFDS_VERSION}",
          splits=GLUE_SPLITS[config_name],
          tfds_data_dir=tfds_data_dir,
      ),
      output_features=output_features(vocabulary),
      preprocessors=text_to_text_preprocessors(
          preprocessors.glue_text_preprocessor(config_name)
      ),
      postprocess_fn=postprocess_fn,
      metric_fns=list(metrics.GLUE_METRICS[config_name]),
  )


def register_tfds_tasks(
    vocabulary: Optional[seqio.Vocabulary] = None,
    tfds_data_dir: Optional[str] = None,
) -> list[str]:
  """(Re-)registers the TFDS-backed tasks and the `glue` mixture.

  Idempotent: registering again replaces the tasks (e.g. with the vocabulary
  of the teacher checkpoint). Nothing is read until a dataset is built.

  Args:
    vocabulary: T5 vocabulary; default `default_vocabulary()`.
    tfds_data_dir: TFDS data directory holding the prepared datasets (default:
      TFDS's, i.e. $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    Names of the registered tasks and mixtures.
  """
  vocabulary = vocabulary or default_vocabulary()
  features = output_features(vocabulary)
  tasks = [
      seqio.Task(
          "c4_span_corruption",
          source=OfflineTfdsDataSource(
              C4_TFDS_NAME,
              splits={"train": "train", "validation": "validation"},
              tfds_data_dir=tfds_data_dir,
          ),
          output_features=features,
          preprocessors=span_corruption_preprocessors("text"),
          metric_fns=[],
      )
  ]
  tasks += [glue_task(c, vocabulary, tfds_data_dir) for c in GLUE_CONFIGS]
  for name, tfds_name, article_key, summary_key in (
      ("cnn_dailymail", CNN_DAILYMAIL_TFDS_NAME, "article", "highlights"),
      ("xsum", XSUM_TFDS_NAME, "document", "summary"),
  ):
    tasks.append(
        seqio.Task(
            name,
            source=OfflineTfdsDataSource(
                tfds_name,
                splits={s: s for s in ("train", "validation", "test")},
                tfds_data_dir=tfds_data_dir,
            ),
            output_features=features,
            preprocessors=text_to_text_preprocessors(
                functools.partial(
                    preprocessors.summarize,
                    article_key=article_key,
                    summary_key=summary_key,
                )
            ),
            postprocess_fn=metrics.strip_text,
            metric_fns=[metrics.rouge],
        )
    )
  for task in tasks:
    add_to_registry(task)
  # A mixture holds its task objects, so it is rebuilt with the new tasks.
  glue_mixture = seqio.Mixture(
      "glue",
      [(f"glue_{c}", rate) for c, rate in GLUE_TRAIN_EXAMPLES.items()],
  )
  add_to_registry(glue_mixture)
  return [t.name for t in tasks] + [glue_mixture.name]


# Register the TFDS tasks with the default vocabulary on import, so that gin
# files and the command line can name them; nothing is read until used.
register_tfds_tasks()
