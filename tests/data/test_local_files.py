"""Span corruption tasks over local text / JSONL / TFRecord files, and the
errors for files that cannot be used."""

import json

import pytest
import seqio
import tensorflow as tf

from miniend_jax.data import tasks

LENGTHS = {"inputs": 32, "targets": 8}
LINES = [f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}."
         for i in range(60)]


def _write_tfrecord(path, texts, key="text"):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for text in texts:
      example = tf.train.Example(features=tf.train.Features(feature={
          key: tf.train.Feature(
              bytes_list=tf.train.BytesList(value=[text.encode()]))}))
      writer.write(example.SerializeToString())


@pytest.mark.parametrize("file_format", ["text", "jsonl", "tfrecord"])
def test_span_corruption_over_local_files(pydoc_vocab, tmp_path, file_format):
  path = tmp_path / f"corpus.{file_format}"
  if file_format == "text":
    path.write_text("\n".join(LINES) + "\n\n")
  elif file_format == "jsonl":
    path.write_text("\n".join(json.dumps({"body": t}) for t in LINES))
  else:
    _write_tfrecord(path, LINES, key="body")
  name = f"test_local_{file_format}"
  task = tasks.span_corruption_task(
      name, pydoc_vocab, {"train": str(path)}, file_format, text_key="body")
  assert seqio.get_mixture_or_task(name) is task
  ds = tasks.get_dataset(name, LENGTHS, batch_size=4, num_epochs=1,
                         shuffle=False)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) >= 4
  tokens = sum(len(pydoc_vocab.encode(t)) for t in LINES)
  noise = sum(int(((b["decoder_target_tokens"] > 0)
                   & (b["decoder_target_tokens"]
                      < pydoc_vocab.vocab_size - pydoc_vocab.extra_ids)
                   & (b["decoder_target_tokens"] != 1)).sum())
              for b in batches)
  # All text went through: ~15% of its tokens are targets.
  assert 0.12 < noise / tokens < 0.18
  # Registering again replaces the task (idempotent).
  tasks.span_corruption_task(
      name, pydoc_vocab, {"train": str(path)}, file_format, text_key="body")


def test_missing_files(pydoc_vocab, tmp_path):
  with pytest.raises(FileNotFoundError, match="no file matches"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "*.txt")})


def test_empty_file(pydoc_vocab, tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "empty.txt")})


def test_blank_file(pydoc_vocab, tmp_path):
  (tmp_path / "blank.jsonl").write_text(
      json.dumps({"text": "  "}) + "\n\n")
  with pytest.raises(ValueError, match="has no non-blank text"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "blank.jsonl")},
                               "jsonl")


def test_non_utf8_file(pydoc_vocab, tmp_path):
  (tmp_path / "latin1.txt").write_bytes(
      "fine first line\nun caf\u00e9 cr\u00e8me\n".encode("latin-1"))
  with pytest.raises(ValueError,
                     match=r"latin1.txt:2: is not UTF-8.*Re-encode"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "latin1.txt")})


def test_bad_jsonl(pydoc_vocab, tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: is not valid JSON"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "bad.jsonl")}, "jsonl")
  (tmp_path / "bad.jsonl").write_text('{"content": "ok"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1: has no string field 'text'"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "bad.jsonl")}, "jsonl")


def test_unknown_format(pydoc_vocab, tmp_path):
  (tmp_path / "a.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="file_format must be one of"):
    tasks.span_corruption_task("test_bad", pydoc_vocab,
                               {"train": str(tmp_path / "a.csv")}, "csv")


def test_vocabulary_without_extra_ids(pydoc_vocab, tmp_path):
  (tmp_path / "a.txt").write_text("some text\n")
  no_sentinels = seqio.SentencePieceVocabulary(
      pydoc_vocab.sentencepiece_model_file)
  with pytest.raises(ValueError, match="exactly 100 extra ids"):
    tasks.span_corruption_task("test_bad", no_sentinels,
                               {"train": str(tmp_path / "a.txt")})
  assert "test_bad" not in seqio.TaskRegistry.names()
