"""Registered seqio tasks and mixtures, and the input pipeline entry point.

Tasks (registered on import with the default vocabulary, re-registered with
another by `register_tfds_tasks(vocabulary)`):

  c4_span_corruption                    TFDS c4/en, T5 span corruption
  glue_<config> for every GLUE config   TFDS glue/<config>, T5 text-to-text
  glue                                  mixture of the GLUE training tasks
  cnn_dailymail, xsum                   "summarize:" summarization, ROUGE

plus `span_corruption_task(...)` for local text / JSONL / TFRecord files and
the offline pydoc tasks of `local_corpus`.

`get_dataset(...)` turns any of them into batches of the model features that
`seqio.EncDecFeatureConverter` defines (encoder_input_tokens,
decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, when
packed, *_segment_ids / *_positions), each int32 [batch, length]. Every host
reads its own shard; `DatasetIterator` saves and restores its position.

TFDS datasets are never downloaded at run time: a dataset that is not
prepared in the data directory raises `TfdsDatasetNotPreparedError` saying
what to do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable, Mapping, Optional, Sequence, Union

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from miniend_jax.data import metrics
from miniend_jax.data import preprocessors
from miniend_jax.data import sources
from miniend_jax.data import vocab as vocab_lib

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
# Data sources
# ----------------------------------------------------------------------------


class TfdsDatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset a task needs is not in the TFDS data directory."""


class OfflineTfdsDataSource(seqio.TfdsDataSource):
  """A `seqio.TfdsDataSource` that never downloads and explains what is missing.

  seqio's source calls `tfds.load(download=True)`, which on an offline
  machine fails deep inside a download attempt. This one only reads prepared
  data (`read_only=True`) and turns a missing dataset into a
  `TfdsDatasetNotPreparedError` naming the dataset, the data directory and
  the command that prepares it.
  """

  def __init__(
      self,
      tfds_name: str,
      splits: Mapping[str, str],
      tfds_data_dir: Optional[str] = None,
  ):
    super().__init__(
        tfds_name=tfds_name,
        tfds_data_dir=tfds_data_dir,
        splits=dict(splits),
        read_only=True,
    )

  def not_prepared_message(self, split: str, cause: Exception) -> str:
    """Says which dataset and data_dir are missing and how to prepare them."""
    name = self.tfds_dataset.name
    data_dir = self.tfds_dataset.data_dir or os.environ.get(
        "TFDS_DATA_DIR", tfds.core.constants.DATA_DIR
    )
    dataset = name.split("/")[0].split(":")[0]
    message = (
        f"TFDS dataset '{name}' (split '{split}') is not prepared in data_dir "
        f"'{data_dir}' ({type(cause).__name__}: {cause}). miniend_jax never "
        "downloads data at run time. Prepare it once on a machine with "
        "internet access:\n"
        f"  python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{name}', data_dir='{data_dir}')"
        ".download_and_prepare()\"\n"
        "then copy that data_dir to this machine and pass its path as "
        "tfds_data_dir= to register_tfds_tasks() (or set TFDS_DATA_DIR)."
    )
    if dataset == "c4":
      message += (
          "\nc4/en is built from Common Crawl with Apache Beam (hundreds of "
          "GB); see https://www.tensorflow.org/datasets/catalog/c4, or point "
          "tfds_data_dir at an existing prepared copy."
      )
    else:
      builder_cls = self.tfds_dataset.builder_cls(split)
      manual = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
      if manual:
        message += (
            f"\n'{dataset}' needs files downloaded by hand first (put them "
            f"in the manual_dir):\n{manual.strip()}"
        )
    return message

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **kwargs) -> tf.data.Dataset:
    """The TFDS examples of `split` (this shard's files when `shard_info`).

    Raises:
      TfdsDatasetNotPreparedError: if the dataset is not in the data_dir.
    """
    try:
      return super().get_dataset(
          split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
          **kwargs,
      )
    except (
        AssertionError,
        FileNotFoundError,
        tfds.core.registered.DatasetNotFoundError,
        tf.errors.NotFoundError,
    ) as e:
      raise TfdsDatasetNotPreparedError(
          self.not_prepared_message(split, e)
      ) from e

  def num_input_examples(self, split: str) -> Optional[int]:
    # Unknown (None) when TFDS has no metadata, e.g. before preparation or
    # under tfds.testing.mock_data; seqio then just skips in-memory caching.
    try:
      return super().num_input_examples(split)
    except Exception:  # pylint: disable=broad-except
      return None

  def list_shards(self, split: str) -> Sequence[str]:
    # Without metadata the file list is unknown; an empty list makes seqio
    # shard at the example level, and get_dataset reports what is missing.
    try:
      return super().list_shards(split)
    except Exception:  # pylint: disable=broad-except
      return []


def parse_jsonl_record(path: str, line_number: int, line: str,
                       fields: Sequence[str]) -> dict:
  """One JSONL line as a dict whose `fields` are strings; errors name the line."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}:{line_number} is not valid JSON ({e}); JSONL needs "
        "one JSON object per line."
    ) from None
  if not isinstance(record, dict) or not all(
      isinstance(record.get(field), str) for field in fields
  ):
    wanted = (f"a string {fields[0]!r} field" if len(fields) == 1
              else "string fields " + ", ".join(map(repr, fields)))
    raise ValueError(f"{path}:{line_number}: expected a JSON object with {wanted}.")
  return record


def read_jsonl_files(
    files: Sequence[str], fields: Sequence[str]
) -> dict[str, list[str]]:
  """The string `fields` of every record of JSONL `files`, as columns."""
  columns = {field: [] for field in fields}
  for path in files:
    with tf.io.gfile.GFile(path, "r") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        record = parse_jsonl_record(path, line_number, line, fields)
        for field in fields:
          columns[field].append(record[field])
  return columns


class JsonlDataSource(seqio.DataSource):
  """Reads string fields of JSON-lines files (one JSON object per line).

  The files of a split are read into memory when the dataset is built, which
  keeps the tf.data pipeline free of Python ops: fully deterministic and its
  iterator checkpointable. Meant for local corpora up to a few GB; convert
  larger ones to TFRecord (`span_corruption_task(file_format="tfrecord")`).
  """

  def __init__(
      self,
      split_to_filepattern: Mapping[str, Union[str, Sequence[str]]],
      fields: Sequence[str] = ("text",),
  ):
    self._split_to_filepattern = dict(split_to_filepattern)
    self._fields = tuple(fields)
    super().__init__(splits=self._split_to_filepattern.keys())

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True  # by files, or by records when files are fewer than shards

  def list_shards(self, split: str) -> Sequence[str]:
    return seqio.utils.list_files(self._split_to_filepattern[split])

  def get_dataset(self, split="train", shuffle=True, seed=None,
                  shard_info=None, **unused_kwargs) -> tf.data.Dataset:
    """Examples {field: tf.string []} of `split`, in file then line order.

    Args:
      split: a split of `split_to_filepattern`.
      shuffle: shuffle this shard's file order (seqio shuffles the examples).
      seed: seed of the file order.
      shard_info: which shard: every num_shards-th file of one order shared by
        all shards, or every num_shards-th record when there are fewer files
        (`sources.shard_files`), so shards are disjoint whatever their seeds.
    """
    files = list(self.list_shards(split))
    if not files:
      raise FileNotFoundError(
          f"No file matches {self._split_to_filepattern[split]!r} (split "
          f"{split!r})."
      )
    indices, stride, phase = sources.shard_files(len(files), shard_info)
    files = [files[i] for i in indices]
    if shuffle:
      files = [files[i] for i in np.random.RandomState(seed).permutation(
          len(files))]
    columns = {field: [] for field in self._fields}
    for path in files:  # records strided within each file: independent of the order
      for field, values in read_jsonl_files([path], self._fields).items():
        columns[field] += values[phase::stride]
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, dtype=tf.string, shape=[len(v)])
         for k, v in columns.items()}
    )


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


# ----------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------


def host_shard_info() -> seqio.ShardInfo:
  """This process's shard: index = jax.process_index(), of process_count()."""
  import jax  # pylint: disable=g-import-not-at-top

  return seqio.ShardInfo(
      index=jax.process_index(), num_shards=jax.process_count()
  )


def get_dataset(
    mixture_or_task_name: Union[str, seqio.Task, seqio.Mixture],
    task_feature_lengths: Mapping[str, int],
    split: str = "train",
    *,
    batch_size: Optional[int] = None,
    shuffle: bool = True,
    seed: Optional[int] = 0,
    shard_info: Optional[seqio.ShardInfo] = None,
    pack: bool = True,
    num_epochs: Optional[int] = None,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
  """Batches of encoder-decoder model features for this host.

  Args:
    mixture_or_task_name: a registered task / mixture (or the object).
    task_feature_lengths: {"inputs": L_in, "targets": L_t}.
    split: dataset split.
    batch_size: per-host batch size (global batch / process count); None
      returns unbatched examples.
    shuffle: shuffle files and examples.
    seed: seed of shuffling and of random preprocessing (span corruption);
      the same seed gives the same data. None: nondeterministic.
    shard_info: which shard to read; default `host_shard_info()`, so every
      process reads a disjoint part of the data.
    pack: pack several examples per row (adds segment ids and positions).
    num_epochs: passes over the data; None repeats forever (training).
    drop_remainder: drop a last partial batch (keeps shapes static).

  Returns:
    tf.data.Dataset of dicts: encoder_input_tokens [B, L_in],
    decoder_input_tokens / decoder_target_tokens / decoder_loss_weights
    [B, L_t], and with `pack` encoder_segment_ids / encoder_positions
    [B, L_in], decoder_segment_ids / decoder_positions [B, L_t]; all int32.
  """
  if shard_info is None:
    shard_info = host_shard_info()
  converter = seqio.EncDecFeatureConverter(pack=pack)
  dataset = seqio.get_dataset(
      mixture_or_task_name,
      task_feature_lengths=task_feature_lengths,
      feature_converter=converter,
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_info=shard_info,
      seed=seed,
      verbose=False,
  )
  if batch_size is not None:
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  return dataset.prefetch(tf.data.AUTOTUNE)


class DatasetIterator:
  """Numpy batches of a tf.data.Dataset with a savable position.

  The position is tf.data's own iterator state (including shuffle and
  prefetch buffers and random-op states), written with
  `tf.train.Checkpoint`; restoring it into an iterator over the same pipeline
  continues with exactly the next batch, neither repeating nor skipping.
  Several iterators can share a directory under different names.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch as numpy arrays (int32 [batch, length] features)."""
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      message = sources.bad_record_message(e)
      if message is None:
        raise
      raise sources.BadRecordError(message) from None
    return tf.nest.map_structure(lambda t: t.numpy(), batch)

  @staticmethod
  def state_prefix(directory: str, name: Optional[str] = None) -> str:
    """Checkpoint prefix of a saved position called `name` under `directory`
    (default: this process's, "input_iterator.process<index>")."""
    if name is None:
      import jax  # pylint: disable=g-import-not-at-top

      name = f"input_iterator.process{jax.process_index()}"
    return os.path.join(directory, name)

  def save(self, directory: str, name: Optional[str] = None) -> str:
    """Writes the current position to `directory`; returns the prefix."""
    tf.io.gfile.makedirs(directory)
    return self._checkpoint.write(self.state_prefix(directory, name))

  def restore(self, directory: str, name: Optional[str] = None):
    """Moves this iterator to the position saved in `directory` as `name`."""
    prefix = self.state_prefix(directory, name)
    if not tf.io.gfile.exists(prefix + ".index"):
      raise FileNotFoundError(
          f"No saved input position at {prefix} (expected {prefix}.index). "
          "Was it saved with DatasetIterator.save under this name?"
      )
    self._checkpoint.read(prefix).assert_consumed()
    return self


# Register the TFDS tasks with the default vocabulary on import, so that gin
# files and the command line can name them; nothing is read until used.
register_tfds_tasks()
