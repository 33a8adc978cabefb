"""The TFDS-backed tasks under tfds.testing.mock_data, GLUE formatting, and
the error for a dataset that is not prepared."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.text import glue as tfds_glue

from miniend_jax.data import metrics
from miniend_jax.data import preprocessors
from miniend_jax.data import tasks

LENGTHS = {"inputs": 64, "targets": 16}
TFDS_TASKS = (["c4_span_corruption", "cnn_dailymail", "xsum"]
              + [f"glue_{c}" for c in tasks.GLUE_CONFIGS])


def _check_batch(batch, vocabulary, batch_size, packed):
  expected = {"encoder_input_tokens": LENGTHS["inputs"],
              "decoder_input_tokens": LENGTHS["targets"],
              "decoder_target_tokens": LENGTHS["targets"],
              "decoder_loss_weights": LENGTHS["targets"]}
  if packed:
    expected.update(encoder_segment_ids=LENGTHS["inputs"],
                    encoder_positions=LENGTHS["inputs"],
                    decoder_segment_ids=LENGTHS["targets"],
                    decoder_positions=LENGTHS["targets"])
  assert set(batch) == set(expected)
  for key, length in expected.items():
    assert batch[key].shape == (batch_size, length), key
    assert batch[key].dtype == np.int32, key
  for key in ("encoder_input_tokens", "decoder_target_tokens"):
    tokens = batch[key]
    assert tokens.min() >= 0 and tokens.max() < vocabulary.vocab_size
    assert (tokens == vocabulary.eos_id).any(axis=1).all()  # every row: EOS
  targets = batch["decoder_target_tokens"]
  np.testing.assert_array_equal(batch["decoder_loss_weights"], targets > 0)
  if not packed:
    # Teacher forcing: decoder inputs are the targets shifted right by one.
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:],
                                  targets[:, :-1])
    assert (batch["decoder_input_tokens"][:, 0] == 0).all()


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_tfds_task_batches_under_mock_data(tfds_tasks, name):
  vocabulary = tfds_tasks
  task = seqio.get_mixture_or_task(name)
  split = "validation" if "validation" in task.splits else "test"
  packed = name == "c4_span_corruption"
  with tfds.testing.mock_data(num_examples=64):
    ds = tasks.get_dataset(name, LENGTHS, split=split, batch_size=4,
                           pack=packed, num_epochs=1, shuffle=False)
    batches = list(ds.take(2).as_numpy_iterator())
  assert len(batches) == 2
  for batch in batches:
    _check_batch(batch, vocabulary, 4, packed)
  if name.startswith("glue_"):
    config = name[len("glue_"):]
    text = vocabulary.decode(batches[0]["encoder_input_tokens"][0].tolist())
    assert text.startswith(preprocessors.glue_benchmark_name(config) + " ")
    target = vocabulary.decode(batches[0]["decoder_target_tokens"][0].tolist())
    label_names = preprocessors.GLUE_LABEL_NAMES[config]
    if label_names is None:
      assert metrics.string_to_float(target) != -1.0 or target == "-1.0"
    else:
      assert target in list(label_names) + ["<unk>"]
      assert task.postprocess_fn(target, is_target=True) == (
          label_names.index(target) if target in label_names else -1)
    assert list(task.metric_fns) == list(metrics.GLUE_METRICS[config])
  elif name in ("cnn_dailymail", "xsum"):
    text = vocabulary.decode(batches[0]["encoder_input_tokens"][0].tolist())
    assert text.startswith("summarize: ")
    assert task.metric_fns == [metrics.rouge]


def test_glue_mixture_under_mock_data(tfds_tasks):
  mixture = seqio.get_mixture_or_task("glue")
  assert sorted(t.name for t in mixture.tasks) == sorted(
      f"glue_{c}" for c in tasks.GLUE_TRAIN_EXAMPLES)
  with tfds.testing.mock_data(num_examples=16):
    ds = tasks.get_dataset("glue", LENGTHS, split="train", batch_size=8,
                           pack=True, seed=1)
    batch = next(ds.as_numpy_iterator())
  _check_batch(batch, tfds_tasks, 8, packed=True)


def test_glue_label_names_match_tfds():
  for config in tfds_glue.Glue.BUILDER_CONFIGS:
    assert config.name in preprocessors.GLUE_LABEL_NAMES
    expected = config.label_classes
    assert preprocessors.GLUE_LABEL_NAMES[config.name] == (
        tuple(expected) if expected else None)


def _apply(preprocessor, example):
  ds = preprocessor(tf.data.Dataset.from_tensors(example))
  return {k: (v.decode() if isinstance(v, bytes) else v)
          for k, v in next(ds.as_numpy_iterator()).items()}


def test_glue_text_to_text_by_hand():
  rte = preprocessors.glue_text_preprocessor("rte")
  out = _apply(rte, {"sentence1": "A cat.", "sentence2": "An animal.",
                     "label": tf.constant(1, tf.int64), "idx": 7})
  assert out == {"inputs": "rte sentence1: A cat. sentence2: An animal.",
                 "targets": "not_entailment", "idx": 7}
  unlabelled = _apply(rte, {"sentence1": "a", "sentence2": "b",
                            "label": tf.constant(-1, tf.int64), "idx": 0})
  assert unlabelled["targets"] == "<unk>"
  mnli = _apply(preprocessors.glue_text_preprocessor("mnli_mismatched"),
                {"premise": "P.", "hypothesis": "H.",
                 "label": tf.constant(2, tf.int64), "idx": 1})
  assert mnli["inputs"] == "mnli hypothesis: H. premise: P."
  assert mnli["targets"] == "contradiction"
  cola = _apply(preprocessors.glue_text_preprocessor("cola"),
                {"sentence": "Him went.", "label": tf.constant(0, tf.int64),
                 "idx": 3})
  assert (cola["inputs"], cola["targets"]) == (
      "cola sentence: Him went.", "unacceptable")


def test_stsb_rounds_to_a_fifth_like_t5():
  stsb = preprocessors.glue_text_preprocessor("stsb")
  for label, expected in ((3.27, "3.2"), (3.35, "3.4"), (0.0, "0.0"),
                          (5.0, "5.0"), (2.5, "2.4")):
    out = _apply(stsb, {"sentence1": "a", "sentence2": "b",
                        "label": tf.constant(label, tf.float32), "idx": 0})
    assert out["inputs"] == "stsb sentence1: a sentence2: b"
    assert out["targets"] == expected, label


def test_summarize_by_hand():
  out = _apply(
      lambda ds: preprocessors.summarize(ds, article_key="article",
                                         summary_key="highlights"),
      {"article": "Long text.", "highlights": "Short."})
  assert out == {"inputs": "summarize: Long text.", "targets": "Short."}


def test_missing_tfds_dataset_says_what_and_how(
    pydoc_vocab, fresh_tfds_builders, tmp_path):
  del fresh_tfds_builders
  try:
    tasks.register_tfds_tasks(pydoc_vocab, tfds_data_dir=str(tmp_path))
    with pytest.raises(tasks.TfdsDatasetNotPreparedError) as error:
      tasks.get_dataset("glue_cola", LENGTHS, batch_size=2)
    message = str(error.value)
    assert "'glue/cola:2.0.0'" in message
    assert f"data_dir '{tmp_path}'" in message
    assert "download_and_prepare()" in message
    assert "tfds_data_dir=" in message
    with pytest.raises(tasks.TfdsDatasetNotPreparedError,
                       match="(?s)xsum:1.1.0.*manual_dir"):
      tasks.get_dataset("xsum", LENGTHS, batch_size=2)
    with pytest.raises(tasks.TfdsDatasetNotPreparedError,
                       match="(?s)c4/en:3.1.0.*Apache Beam"):
      tasks.get_dataset("c4_span_corruption", LENGTHS, batch_size=2)
  finally:
    tasks.register_tfds_tasks()
