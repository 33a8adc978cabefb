"""The embedded offline corpus: the Python installation's own documentation.

Every machine that runs this package has Python's documentation on it: the
pydoc topics (`pydoc_data.topics`, the language reference pages `help()`
shows) and the docstrings of the standard library. This module harvests that
text at run time (nothing generated is committed), splits it
deterministically into train / validation, trains a small T5-compatible
SentencePiece vocabulary on it, and registers three seqio tasks:

  pydoc_span_corruption  all harvested text, T5 span corruption (distillation)
  pydoc_summary          docstring body -> its one-line summary (ROUGE)
  pydoc_topic            docstring -> which of `TOPIC_PACKAGES` it documents
                         (accuracy)

Typical use (the quickstart):

  vocabulary, data_dir = setup_pydoc_tasks("/tmp/work")
  ds = pipeline.get_dataset("pydoc_span_corruption", {"inputs": 128,
                            "targets": 32}, batch_size=8)

The text differs between Python versions, but for one installation the
harvest, the split and the vocabulary are deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
import warnings
from typing import Iterator, Optional

from absl import logging
import seqio
import tensorflow as tf

from miniend_jax.data import jsonl_source
from miniend_jax.data import metrics
from miniend_jax.data import preprocessors
from miniend_jax.data import tasks
from miniend_jax.data import vocab as vocab_lib

# Bump when the harvest changes, so cached corpora are rebuilt.
HARVEST_FORMAT_VERSION = 1

# The classes of pydoc_topic: standard-library packages present in every
# supported Python (3.11+), each with enough documented objects.
TOPIC_PACKAGES = (
    "asyncio",
    "collections",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "urllib",
    "wsgiref",
    "xml",
)

# Modules never imported: side effects on import (a browser, printing, a GUI,
# terminal control), removed or deprecated, or platform specific.
_SKIP_MODULES = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "lib2to3", "distutils", "test", "readline", "rlcompleter", "msilib",
    "msvcrt", "winreg", "winsound", "nt", "ensurepip", "venv", "pydoc_data",
    "__main__", "__hello__", "__phello__",
})

VALIDATION_PERCENT = 10
DEFAULT_VOCAB_SIZE = 3000

TASK_SPAN_CORRUPTION = "pydoc_span_corruption"
TASK_SUMMARY = "pydoc_summary"
TASK_TOPIC = "pydoc_topic"
SPLITS = ("train", "validation")

_MANIFEST = "manifest.json"
_FILES = {
    TASK_SPAN_CORRUPTION: "pydoc_text",
    TASK_SUMMARY: "pydoc_summary",
    TASK_TOPIC: "pydoc_topic",
}


def corpus_file(data_dir: str, task_name: str, split: str) -> str:
  """Path of the JSONL file of `task_name`'s `split` under `data_dir`."""
  return os.path.join(data_dir, f"{_FILES[task_name]}.{split}.jsonl")


def split_of(doc_id: str, validation_percent: int = VALIDATION_PERCENT) -> str:
  """Deterministic split of a document, from a hash of its id.

  Hashing the id (not the position) keeps a document in the same split when
  other documents appear or disappear between Python versions.
  """
  bucket = int(hashlib.sha256(doc_id.encode("utf-8")).hexdigest(), 16) % 100
  return "validation" if bucket < validation_percent else "train"


# ----------------------------------------------------------------------------
# Harvesting
# ----------------------------------------------------------------------------


def _import_quietly(name: str):
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return importlib.import_module(name)
  except BaseException:  # pylint: disable=broad-except
    # Platform-specific or optional modules (no _tkinter, no Windows) are
    # simply not part of this installation's documentation.
    return None


def _is_skipped(name: str) -> bool:
  parts = name.split(".")
  return (
      parts[0] in _SKIP_MODULES
      or any(p.startswith("_") for p in parts)
      or any(p in ("test", "tests", "__main__") for p in parts)
  )


def _walk_package(name: str) -> list:
  """The module `name` and, for a package, its importable submodules."""
  module = _import_quietly(name)
  if module is None:
    return []
  modules = [module]
  if hasattr(module, "__path__"):
    infos = pkgutil.walk_packages(
        module.__path__, prefix=name + ".", onerror=lambda _: None
    )
    for info in sorted(infos, key=lambda i: i.name):
      if not _is_skipped(info.name):
        submodule = _import_quietly(info.name)
        if submodule is not None:
          modules.append(submodule)
  return modules


def _clean(doc) -> Optional[str]:
  if not isinstance(doc, str):
    return None
  doc = inspect.cleandoc(doc).strip()
  return doc or None


def _module_docstrings(module) -> Iterator[tuple[str, str]]:
  """(qualified name, docstring) of a module and what it defines.

  Only objects defined in the module itself (not imported into it), and only
  their own docstrings (not inherited ones); dunder methods are skipped as
  their docstrings are boilerplate.
  """
  name = module.__name__
  doc = _clean(getattr(module, "__doc__", None))
  if doc:
    yield name, doc
  members = sorted(vars(module).items())
  for member_name, obj in members:
    if member_name.startswith("_"):
      continue
    if getattr(obj, "__module__", None) != name:
      continue
    if inspect.isclass(obj):
      doc = _clean(obj.__dict__.get("__doc__"))
      if doc:
        yield f"{name}.{member_name}", doc
      for attr_name, attr in sorted(vars(obj).items()):
        if attr_name.startswith("_"):
          continue
        if isinstance(attr, (staticmethod, classmethod)):
          attr = attr.__func__
        if isinstance(attr, property) or inspect.isroutine(attr):
          doc = _clean(getattr(attr, "__doc__", None))
          if doc:
            yield f"{name}.{member_name}.{attr_name}", doc
    elif inspect.isroutine(obj):
      doc = _clean(obj.__doc__)
      if doc:
        yield f"{name}.{member_name}", doc


def _stdlib_top_level_names() -> list[str]:
  names = getattr(sys, "stdlib_module_names", None)
  if names is None:  # Python < 3.10: only the topic packages.
    names = TOPIC_PACKAGES
  return sorted(n for n in names if not _is_skipped(n))


def iter_pydoc_documents() -> Iterator[dict]:
  """Yields the harvested documents, in a deterministic order.

  Each is {"id", "kind" ("topic" | "docstring"), "package" (top-level module
  or "" for topics), "text"}. Duplicate texts are kept once (first id).
  """
  seen = set()
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    topic_texts = topics.topics
  except ImportError:
    logging.warning("pydoc_data is not installed; harvesting docstrings only.")
    topic_texts = {}
  for key in sorted(topic_texts):
    text = topic_texts[key].strip()
    if text and text not in seen:
      seen.add(text)
      yield {"id": f"topic:{key}", "kind": "topic", "package": "",
             "text": text}
  # The topic packages are walked into their submodules; other standard
  # library modules only contribute their top level.
  module_names = sorted(set(_stdlib_top_level_names()) | set(TOPIC_PACKAGES))
  for top in module_names:
    modules = (
        _walk_package(top) if top in TOPIC_PACKAGES
        else [m for m in [_import_quietly(top)] if m is not None]
    )
    for module in modules:
      for qualname, text in _module_docstrings(module):
        if text in seen:
          continue
        seen.add(text)
        yield {"id": qualname, "kind": "docstring", "package": top,
               "text": text}


def summary_example(text: str) -> Optional[dict]:
  """{"body", "summary"} for a docstring with a one-line summary, else None.

  PEP 257 layout: a summary line, a blank line, the body. The summary must be
  a sentence of 3-40 words and the body at least 8 words.
  """
  lines = text.split("\n")
  if len(lines) < 3 or lines[1].strip():
    return None
  summary = lines[0].strip()
  body = "\n".join(lines[2:]).strip()
  if not 3 <= len(summary.split()) <= 40 or len(body.split()) < 8:
    return None
  return {"body": body, "summary": summary}


def harvest_pydoc_corpus(
    out_dir: str,
    validation_percent: int = VALIDATION_PERCENT,
    overwrite: bool = False,
) -> dict:
  """Writes the pydoc corpus (JSONL per task and split) under `out_dir`.

  Files: pydoc_text.{split}.jsonl ({"id", "text"}), pydoc_summary.{split}.jsonl
  ({"id", "body", "summary"}), pydoc_topic.{split}.jsonl ({"id", "text",
  "package"}) and manifest.json (counts, Python version). A complete harvest
  of the same format and Python version is reused unless `overwrite`.

  Args:
    out_dir: directory to write (created).
    validation_percent: share of documents in the validation split.
    overwrite: harvest again even if a matching harvest exists.

  Returns:
    The manifest: {"python", "format", "validation_percent", "counts":
    {task: {split: n}}, "topic_packages"}.

  Raises:
    RuntimeError: if the installation yields no text at all.
  """
  manifest_path = os.path.join(out_dir, _MANIFEST)
  expected = {
      "python": sys.version,
      "format": HARVEST_FORMAT_VERSION,
      "validation_percent": validation_percent,
      "topic_packages": list(TOPIC_PACKAGES),
  }
  if not overwrite and tf.io.gfile.exists(manifest_path):
    with tf.io.gfile.GFile(manifest_path, "r") as f:
      manifest = json.load(f)
    if all(manifest.get(k) == v for k, v in expected.items()) and all(
        tf.io.gfile.exists(corpus_file(out_dir, t, s))
        for t in _FILES for s in SPLITS
    ):
      return manifest

  rows = {t: {s: [] for s in SPLITS} for t in _FILES}
  for doc in iter_pydoc_documents():
    split = split_of(doc["id"], validation_percent)
    rows[TASK_SPAN_CORRUPTION][split].append(
        {"id": doc["id"], "text": doc["text"]}
    )
    if doc["kind"] != "docstring":
      continue
    example = summary_example(doc["text"])
    if example:
      rows[TASK_SUMMARY][split].append({"id": doc["id"], **example})
    if doc["package"] in TOPIC_PACKAGES and len(doc["text"].split()) >= 5:
      rows[TASK_TOPIC][split].append(
          {"id": doc["id"], "text": doc["text"], "package": doc["package"]}
      )
  if not rows[TASK_SPAN_CORRUPTION]["train"]:
    raise RuntimeError(
        "Harvested no documentation text from this Python installation "
        f"({sys.executable}); the pydoc corpus needs pydoc_data or the "
        "standard library's sources."
    )
  tf.io.gfile.makedirs(out_dir)
  counts = {}
  for task_name, splits in rows.items():
    counts[task_name] = {}
    for split, records in splits.items():
      path = corpus_file(out_dir, task_name, split)
      # A name of this process's own: the hosts of a multi-process run may harvest
      # into one shared directory at once (they write the same content).
      tmp_path = f"{path}.tmp{os.getpid()}"
      with tf.io.gfile.GFile(tmp_path, "w") as f:
        for record in records:
          f.write(json.dumps(record, ensure_ascii=False) + "\n")
      tf.io.gfile.rename(tmp_path, path, overwrite=True)
      counts[task_name][split] = len(records)
  manifest = {**expected, "counts": counts}
  # The manifest is written last: its presence marks a complete harvest.
  tmp_path = f"{manifest_path}.tmp{os.getpid()}"
  with tf.io.gfile.GFile(tmp_path, "w") as f:
    json.dump(manifest, f, indent=1)
  tf.io.gfile.rename(tmp_path, manifest_path, overwrite=True)
  return manifest


def train_pydoc_vocabulary(
    data_dir: str,
    vocab_dir: Optional[str] = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    overwrite: bool = False,
) -> seqio.SentencePieceVocabulary:
  """Trains (or reuses) the pydoc SentencePiece vocabulary.

  Trained on the lines of the train split of the harvested text; written as
  `<vocab_dir>/spiece.model`, so the directory also works as the tokenizer
  part of a Hugging Face checkpoint.

  Args:
    data_dir: a directory `harvest_pydoc_corpus` wrote.
    vocab_dir: where to put spiece.model (default `<data_dir>/vocab_<size>`).
    vocab_size: SentencePiece pieces (the vocabulary adds 100 extra ids).
    overwrite: retrain even if the model exists.

  Returns:
    The T5 vocabulary (pieces + 100 extra ids).
  """
  vocab_dir = vocab_dir or os.path.join(data_dir, f"vocab_{vocab_size}")
  spm_path = os.path.join(vocab_dir, vocab_lib.HF_SPM_FILENAME)
  if overwrite or not tf.io.gfile.exists(spm_path):
    text_path = corpus_file(data_dir, TASK_SPAN_CORRUPTION, "train")
    if not tf.io.gfile.exists(text_path):
      raise FileNotFoundError(
          f"{text_path} does not exist; run harvest_pydoc_corpus({data_dir!r})"
          " first."
      )
    lines = (
        line
        for text in jsonl_source.read_jsonl_files([text_path], ["text"])["text"]
        for line in text.split("\n")
    )
    vocab_lib.train_sentencepiece(lines, spm_path, vocab_size=vocab_size)
  return vocab_lib.get_vocabulary(vocab_dir)


# ----------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------


def _split_files(data_dir: str, task_name: str) -> dict[str, str]:
  files = {s: corpus_file(data_dir, task_name, s) for s in SPLITS}
  missing = [p for p in files.values() if not tf.io.gfile.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"The pydoc corpus is missing {missing}; run "
        f"harvest_pydoc_corpus({data_dir!r}) first."
    )
  return files


def register_pydoc_tasks(
    vocabulary: seqio.Vocabulary, data_dir: str
) -> list[str]:
  """(Re-)registers pydoc_span_corruption, pydoc_summary and pydoc_topic.

  Idempotent: a second call replaces the tasks (e.g. with another vocabulary
  or directory).

  Args:
    vocabulary: T5 vocabulary, e.g. from `train_pydoc_vocabulary`.
    data_dir: a directory `harvest_pydoc_corpus` wrote.

  Returns:
    The registered task names.
  """
  vocab_lib.validate_vocabulary(vocabulary)
  features = tasks.output_features(vocabulary)
  span_task = tasks.span_corruption_task(
      TASK_SPAN_CORRUPTION, vocabulary, _split_files(data_dir, TASK_SPAN_CORRUPTION),
      "jsonl", validate_files=False, register=False)  # the harvest wrote valid files
  summary_task = seqio.Task(
      TASK_SUMMARY,
      source=jsonl_source.JsonlDataSource(
          _split_files(data_dir, TASK_SUMMARY), fields=("body", "summary")
      ),
      output_features=features,
      preprocessors=tasks.text_to_text_preprocessors(functools.partial(
          preprocessors.summarize, article_key="body", summary_key="summary")),
      postprocess_fn=metrics.strip_text,
      metric_fns=[metrics.rouge],
  )
  topic_task = seqio.Task(
      TASK_TOPIC,
      source=jsonl_source.JsonlDataSource(
          _split_files(data_dir, TASK_TOPIC), fields=("text", "package")
      ),
      output_features=features,
      preprocessors=tasks.text_to_text_preprocessors(functools.partial(
          preprocessors.classify_text, prefix="topic:", text_key="text",
          label_key="package")),
      postprocess_fn=functools.partial(
          metrics.string_label_to_class_id, label_classes=list(TOPIC_PACKAGES)
      ),
      metric_fns=[metrics.accuracy],
  )
  names = []
  for task in (span_task, summary_task, topic_task):
    tasks.add_to_registry(task)
    names.append(task.name)
  return names


def setup_pydoc_tasks(
    work_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tuple[seqio.SentencePieceVocabulary, str]:
  """Harvests, trains the vocabulary and registers the tasks (all cached).

  Args:
    work_dir: the corpus goes to `<work_dir>/pydoc`, the vocabulary to
      `<work_dir>/pydoc/vocab_<vocab_size>`.
    vocab_size: SentencePiece pieces.

  Returns:
    (vocabulary, data_dir).
  """
  data_dir = os.path.join(work_dir, "pydoc")
  harvest_pydoc_corpus(data_dir)
  vocabulary = train_pydoc_vocabulary(data_dir, vocab_size=vocab_size)
  register_pydoc_tasks(vocabulary, data_dir)
  return vocabulary, data_dir
