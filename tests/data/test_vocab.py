"""The T5 vocabulary: parity with transformers' T5 tokenizer, layout, errors."""

import json
import os
import shutil

import pytest
import seqio
import sentencepiece
import tensorflow as tf
import transformers

from miniend_jax.data import local_corpus, preprocessors
from miniend_jax.data import vocab as vocab_lib

SAMPLES = [
    "Hello world, this is a test.",
    "Return the number of items in a container.",
    "  multiple   spaces\tand\nnewlines are normalised ",
    "def f(x):\n    return x ** 2  # squares",
    "Numbers 12345 and symbols: {}[]()<>=!@#$%^&*",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(pydoc_vocab):
  directory = os.path.dirname(pydoc_vocab.sentencepiece_model_file)
  return transformers.T5TokenizerFast.from_pretrained(directory)


@pytest.fixture(scope="module")
def validation_texts(pydoc_data_dir):
  path = local_corpus.corpus_file(
      pydoc_data_dir, "pydoc_span_corruption", "validation")
  with open(path) as f:
    return [json.loads(line)["text"] for line in f][:300]


def test_layout(pydoc_vocab, hf_tokenizer):
  assert (pydoc_vocab.pad_id, pydoc_vocab.eos_id, pydoc_vocab.unk_id) == (
      0, 1, 2)
  assert pydoc_vocab.extra_ids == 100
  assert pydoc_vocab.vocab_size == local_corpus.DEFAULT_VOCAB_SIZE + 100
  assert len(hf_tokenizer) == pydoc_vocab.vocab_size
  assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id,
          hf_tokenizer.unk_token_id) == (0, 1, 2)
  # Sentinels at the top, <extra_id_0> highest, in both libraries.
  sentinels = [preprocessors.sentinel_id(pydoc_vocab) - i for i in range(100)]
  assert sentinels[0] == pydoc_vocab.vocab_size - 1
  assert sentinels == hf_tokenizer.convert_tokens_to_ids(
      [f"<extra_id_{i}>" for i in range(100)])
  assert vocab_lib.padded_vocab_size(pydoc_vocab) == 3200


def test_encode_decode_like_t5_tokenizer_fast(
    pydoc_vocab, hf_tokenizer, validation_texts):
  texts = SAMPLES + validation_texts
  decoded = 0
  for text in texts:
    ids = pydoc_vocab.encode(text)
    hf_ids = hf_tokenizer(text, add_special_tokens=False).input_ids
    assert ids == hf_ids, text
    # Unknown characters (unseen in training) decode differently by design:
    # SentencePiece writes " \u2047 ", transformers "<unk>".
    if pydoc_vocab.unk_id not in ids:
      assert pydoc_vocab.decode(ids) == hf_tokenizer.decode(
          hf_ids, skip_special_tokens=True), text
      decoded += 1
  assert decoded > 0.9 * len(texts)
  # With EOS: T5's tokenizer appends </s> = 1, seqio's feature add_eos does.
  assert hf_tokenizer("Hello world").input_ids[-1] == pydoc_vocab.eos_id
  # The TF ops tokenize the same way as the Python tokenizer.
  tf_ids = pydoc_vocab.encode_tf(tf.constant(texts)).to_list()
  assert tf_ids == [pydoc_vocab.encode(t) for t in texts]


def test_get_vocabulary_from_file_and_hf_directory(pydoc_vocab, tmp_path):
  spm_path = pydoc_vocab.sentencepiece_model_file
  from_file = vocab_lib.get_vocabulary(spm_path)
  hf_dir = vocab_lib.save_hf_tokenizer(pydoc_vocab, str(tmp_path / "hf"))
  from_dir = vocab_lib.get_vocabulary(hf_dir)
  text = "Create a new event loop."
  assert from_file.encode(text) == from_dir.encode(text) == pydoc_vocab.encode(
      text)
  reloaded = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert reloaded(text, add_special_tokens=False).input_ids == (
      pydoc_vocab.encode(text))
  assert reloaded.convert_tokens_to_ids("<extra_id_0>") == (
      pydoc_vocab.vocab_size - 1)


def test_gs_path_stays_lazy():
  vocabulary = vocab_lib.get_vocabulary(
      vocab_lib.DEFAULT_T5_SPM_PATH, validate=False)
  assert vocabulary.sentencepiece_model_file == vocab_lib.DEFAULT_T5_SPM_PATH
  assert vocabulary.extra_ids == 100


def test_train_sentencepiece_is_deterministic(tmp_path):
  words = "the cat sat on a mat while dogs ran around gardens quickly".split()
  lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(i % 9 + 3))
           for i in range(300)]
  a = vocab_lib.train_sentencepiece(lines, str(tmp_path / "a.model"), 30)
  b = vocab_lib.train_sentencepiece(lines, str(tmp_path / "b.model"), 30)
  assert open(a, "rb").read() == open(b, "rb").read()
  assert sentencepiece.SentencePieceProcessor(model_file=a).GetPieceSize() == 30
  vocabulary = vocab_lib.get_vocabulary(a)
  assert vocabulary.vocab_size == 130
  assert vocabulary.decode(vocabulary.encode("the cat sat")) == "the cat sat"
  with pytest.raises(ValueError, match="no non-blank text"):
    vocab_lib.train_sentencepiece(["", "  "], str(tmp_path / "c.model"), 60)


# ------------------------------ bad input -----------------------------------


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vocab_lib.get_vocabulary(str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match="has no 'spiece.model'"):
    vocab_lib.get_vocabulary(str(tmp_path))


def test_wrong_extra_ids_count(pydoc_vocab):
  with pytest.raises(ValueError, match="exactly 100 extra ids"):
    vocab_lib.get_vocabulary(pydoc_vocab.sentencepiece_model_file, extra_ids=50)
  with pytest.raises(ValueError, match="exactly 100 extra ids"):
    vocab_lib.validate_vocabulary(seqio.SentencePieceVocabulary(
        pydoc_vocab.sentencepiece_model_file, extra_ids=0))


def _train_raw(path, **kwargs):
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter([f"some words number {i}" for i in range(100)]),
      model_prefix=str(path), vocab_size=40, hard_vocab_limit=False,
      minloglevel=2, **kwargs)
  return f"{path}.model"


def test_model_that_already_has_extra_ids(tmp_path):
  path = _train_raw(
      tmp_path / "with_extra", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      user_defined_symbols=[f"<extra_id_{i}>" for i in range(3)])
  with pytest.raises(ValueError, match="already contains 3 extra-id pieces"):
    vocab_lib.get_vocabulary(path)


def test_model_with_non_t5_special_ids(tmp_path):
  path = _train_raw(tmp_path / "default_ids")  # unk=0, bos=1, eos=2
  with pytest.raises(ValueError, match="T5 needs pad=0, eos=1, unk=2"):
    vocab_lib.get_vocabulary(path)


def test_hf_directory_declaring_other_extra_ids(pydoc_vocab, tmp_path):
  shutil.copy(pydoc_vocab.sentencepiece_model_file, tmp_path / "spiece.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 50}))
  with pytest.raises(ValueError, match="declares 50 extra ids"):
    vocab_lib.get_vocabulary(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"extra_ids": 100}))
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3000}))
  with pytest.raises(ValueError, match="vocab_size=3000 embedding rows"):
    vocab_lib.get_vocabulary(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3200}))
  assert vocab_lib.get_vocabulary(str(tmp_path)).vocab_size == 3100


def test_not_a_sentencepiece_model(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"\x00\x01 not a model \xff")
  with pytest.raises(ValueError, match="is not a SentencePiece model"):
    vocab_lib.get_vocabulary(str(path))


def _texts(count: int = 320) -> list[str]:
  """ASCII, accented Latin, CJK, emoji and control characters, lengths 0..~60."""
  pieces = ["hello", "Grüße", "naïve café", "日本語のテキスト", "русский", "🙂👍🏽", "tab\tnew\nline",
            "ελληνικά", "עברית", "x" * 40, "", " ", "a\u0301", "\u200b", "mixed: ascii + ü + 漢"]
  return [" ".join(pieces[(i * 7 + j) % len(pieces)] for j in range(i % 5)) + str(i)
          for i in range(count)]


def test_byt5_checkpoint_gives_byte_ids_equal_to_the_byt5_tokenizer(tmp_path):
  tokenizer = transformers.ByT5Tokenizer()
  tokenizer.save_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 384}))
  vocabulary = vocab_lib.checkpoint_vocabulary(str(tmp_path))
  # ByT5 as pretrained: 259 ids, the sentinels reusing the top byte ids.
  assert isinstance(vocabulary, seqio.ByteVocabulary) and vocabulary.vocab_size == 259
  assert vocabulary.extra_ids == 0
  vocab_lib.validate_vocabulary(vocabulary)
  texts = _texts()
  assert len(texts) >= 300 and any(not t.isascii() for t in texts)
  for text in texts:
    theirs = tokenizer(text).input_ids
    assert theirs[-1] == vocab_lib.EOS_ID  # the tokenizer appends EOS; seqio's tasks do too
    assert list(vocabulary.encode(text)) == theirs[:-1], text
    assert vocabulary.decode(theirs[:-1]) == text
  # And in TensorFlow, one example at a time as the input pipeline encodes.
  for text in texts[:20]:
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == tokenizer(
        text).input_ids[:-1]


def test_checkpoint_vocabulary_sentencepiece_and_unknown(pydoc_vocab, tmp_path):
  spm_dir = tmp_path / "spm"
  spm_dir.mkdir()
  shutil.copy(vocab_lib.resolve_sentencepiece_path(pydoc_vocab.sentencepiece_model_file),
              spm_dir / "spiece.model")
  vocabulary = vocab_lib.checkpoint_vocabulary(str(spm_dir))
  assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
  assert vocabulary.encode("def f(x): return x") == pydoc_vocab.encode("def f(x): return x")
  other = tmp_path / "other"
  other.mkdir()
  (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
  with pytest.raises(ValueError, match="GPT2Tokenizer"):
    vocab_lib.checkpoint_vocabulary(str(other))
  too_small = tmp_path / "small"
  transformers.ByT5Tokenizer().save_pretrained(too_small)
  (too_small / "config.json").write_text(json.dumps({"vocab_size": 200}))
  with pytest.raises(ValueError, match="259 embedding rows"):
    vocab_lib.checkpoint_vocabulary(str(too_small))


def test_an_mt5_style_sentencepiece_equals_its_fast_tokenizer(tmp_path):
  """A multilingual SentencePiece model (mT5's kind: unigram over many scripts,
  full character coverage) read by seqio gives the ids of the fast tokenizer
  transformers converts from the same file, on 300+ texts in several scripts."""
  texts = _texts()
  corpus = [t for t in texts for _ in range(3)] + [
      "Ein schneller brauner Fuchs", "быстрая лиса", "素早い茶色の狐", "ثعلب بني سريع",
      "तेज़ भूरी लोमड़ी", "빠른 갈색 여우", "γρήγορη καφέ αλεπού", "שועל חום מהיר"] * 20
  spm_path = vocab_lib.train_sentencepiece(corpus, str(tmp_path / "spm" / "mt5ish.model"),
                                           vocab_size=180)
  vocabulary = vocab_lib.get_vocabulary(spm_path)
  hf_dir = vocab_lib.save_hf_tokenizer(vocabulary, str(tmp_path / "hf"))
  fast = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert fast.is_fast
  unseen = ["Zürich ist schön", "слово", "漢字かな交じり", "🙂 done", "naïve"]
  for text in texts + unseen:
    theirs = fast(text).input_ids
    assert theirs[-1] == vocab_lib.EOS_ID
    assert list(vocabulary.encode(text)) == theirs[:-1], text
  # Sentinels agree too: <extra_id_0> is the top id on both sides.
  assert fast.convert_tokens_to_ids("<extra_id_0>") == vocabulary.vocab_size - 1
  assert fast.convert_tokens_to_ids("<extra_id_99>") == vocabulary.vocab_size - 100
