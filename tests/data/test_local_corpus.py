"""The embedded pydoc corpus: harvest, split, vocabulary and offline tasks."""

import filecmp
import json
import os

import pytest
import seqio

from miniend_jax.data import local_corpus
from miniend_jax.data import tasks
from miniend_jax.data import vocab as vocab_lib

LENGTHS = {"inputs": 128, "targets": 32}


def _records(data_dir, task_name, split):
  with open(local_corpus.corpus_file(data_dir, task_name, split)) as f:
    return [json.loads(line) for line in f]


def test_harvest_is_deterministic_and_reused(pydoc_data_dir, tmp_path):
  manifest = local_corpus.harvest_pydoc_corpus(str(tmp_path))
  for task_name in ("pydoc_span_corruption", "pydoc_summary", "pydoc_topic"):
    for split in local_corpus.SPLITS:
      assert filecmp.cmp(
          local_corpus.corpus_file(pydoc_data_dir, task_name, split),
          local_corpus.corpus_file(str(tmp_path), task_name, split),
          shallow=False)
  counts = manifest["counts"]
  assert counts["pydoc_span_corruption"]["train"] > 2000
  assert counts["pydoc_summary"]["train"] > 500
  assert counts["pydoc_topic"]["train"] > 500
  # A complete harvest is reused, not redone.
  path = local_corpus.corpus_file(str(tmp_path), "pydoc_topic", "train")
  mtime = os.stat(path).st_mtime_ns
  assert local_corpus.harvest_pydoc_corpus(str(tmp_path)) == manifest
  assert os.stat(path).st_mtime_ns == mtime


def test_split_is_disjoint_and_by_hash(pydoc_data_dir):
  for task_name in ("pydoc_span_corruption", "pydoc_summary", "pydoc_topic"):
    train = _records(pydoc_data_dir, task_name, "train")
    validation = _records(pydoc_data_dir, task_name, "validation")
    train_ids = {r["id"] for r in train}
    validation_ids = {r["id"] for r in validation}
    assert not train_ids & validation_ids
    assert len(train_ids) == len(train)
    fraction = len(validation) / (len(train) + len(validation))
    assert 0.05 < fraction < 0.15
    assert all(local_corpus.split_of(i) == "validation"
               for i in validation_ids)
  texts = [r["text"] for r in _records(
      pydoc_data_dir, "pydoc_span_corruption", "train")]
  assert len(set(texts)) == len(texts)
  assert any(r["id"].startswith("topic:") for r in _records(
      pydoc_data_dir, "pydoc_span_corruption", "train"))


def test_summary_and_topic_records(pydoc_data_dir):
  for record in _records(pydoc_data_dir, "pydoc_summary", "validation"):
    assert "\n" not in record["summary"]
    assert record["summary"] and len(record["body"].split()) >= 8
  topic = _records(pydoc_data_dir, "pydoc_topic", "train")
  packages = {r["package"] for r in topic}
  assert packages == set(local_corpus.TOPIC_PACKAGES)
  assert all(r["id"].split(".")[0] == r["package"] for r in topic)
  assert local_corpus.summary_example("One line.\n\nToo short.") is None
  assert local_corpus.summary_example(
      "Return the sum of two numbers.\n\nBoth must support addition with "
      "each other, or TypeError is raised.") == {
          "summary": "Return the sum of two numbers.",
          "body": "Both must support addition with each other, or "
                  "TypeError is raised."}


def test_vocabulary_is_t5_compatible(pydoc_vocab):
  vocab_lib.validate_vocabulary(pydoc_vocab)
  assert pydoc_vocab.vocab_size == local_corpus.DEFAULT_VOCAB_SIZE + 100
  text = "Return a new event loop object."
  assert pydoc_vocab.decode(pydoc_vocab.encode(text)) == text


@pytest.mark.parametrize("name", ["pydoc_summary", "pydoc_topic"])
def test_downstream_tasks_yield_real_batches(pydoc_setup, name):
  vocabulary, data_dir = pydoc_setup
  ds = tasks.get_dataset(name, LENGTHS, split="validation", batch_size=4,
                         pack=False, shuffle=False, num_epochs=1)
  batch = next(ds.as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (4, 128)
  inputs = vocabulary.decode(batch["encoder_input_tokens"][0].tolist())
  target = vocabulary.decode(batch["decoder_target_tokens"][0].tolist())
  task = seqio.get_mixture_or_task(name)
  first = _records(data_dir, name, "validation")[0]
  if name == "pydoc_summary":
    assert inputs.startswith("summarize: ")
    assert target == " ".join(first["summary"].split())
    assert task.metric_fns[0]([target], [target])["rouge1"] == 100.0
  else:
    assert inputs.startswith("topic: ")
    assert target == first["package"]
    label = task.postprocess_fn(target, is_target=True)
    assert label == local_corpus.TOPIC_PACKAGES.index(first["package"])
    assert task.metric_fns[0]([label], [label])["accuracy"] == 100.0


def test_span_corruption_task_yields_real_batches(pydoc_setup):
  ds = tasks.get_dataset("pydoc_span_corruption",
                         tasks.span_corruption_feature_lengths(128),
                         batch_size=8)
  batch = next(ds.as_numpy_iterator())
  assert batch["encoder_input_tokens"].shape == (8, 128)
  assert batch["decoder_target_tokens"].shape == (8, 29)
  assert (batch["encoder_input_tokens"] >= 3000).any()  # sentinels


def test_register_is_idempotent_and_checks_the_directory(pydoc_setup,
                                                          tmp_path):
  vocabulary, data_dir = pydoc_setup
  names = local_corpus.register_pydoc_tasks(vocabulary, data_dir)
  assert names == local_corpus.register_pydoc_tasks(vocabulary, data_dir)
  assert set(names) <= set(seqio.TaskRegistry.names())
  with pytest.raises(FileNotFoundError, match="harvest_pydoc_corpus"):
    local_corpus.register_pydoc_tasks(vocabulary, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="harvest_pydoc_corpus"):
    local_corpus.train_pydoc_vocabulary(str(tmp_path))
