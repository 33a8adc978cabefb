"""T5 SentencePiece vocabularies: loading, validating and training them
(and ByT5's byte vocabulary, `byt5_vocabulary`).

A T5 vocabulary is a SentencePiece model whose first three ids are
pad=0, eos=1, unk=2 (no bos), plus 100 "extra ids" (sentinels) that
`seqio.SentencePieceVocabulary` appends at the top of the id space in
reverse order: `<extra_id_0>` is `vocab_size - 1`, `<extra_id_99>` is
`vocab_size - 100`. Span corruption relies on that order (see
`preprocessors.sentinel_id`) and so do Hugging Face T5 tokenizers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Iterable, Optional

import seqio
from etils import epath
import sentencepiece
from sentencepiece import SentencePieceTrainer
from sentencepiece import sentencepiece_model_pb2
import tensorflow as tf

# The T5 conventions every checkpoint and task in this package relies on.
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
T5_EXTRA_IDS = 100

# The public T5 vocabulary (32000 pieces + 100 extra ids); lives on GCS, so it
# is only read when a task that uses it actually builds a dataset.
DEFAULT_T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"

# File name of the SentencePiece model inside a Hugging Face T5 checkpoint.
HF_SPM_FILENAME = "spiece.model"

_EXTRA_ID_PREFIX = "<extra_id_"


def resolve_sentencepiece_path(path: str) -> str:
  """Returns the SentencePiece model file for a file, `gs://` or HF directory.

  Args:
    path: a `.model` file (local or any etils.epath scheme such as
      `gs://`), or a Hugging Face checkpoint directory that holds
      `spiece.model`.

  Returns:
    Path of the SentencePiece model file.

  Raises:
    FileNotFoundError: if nothing usable is at `path`.
  """
  path = os.fspath(path)
  if epath.Path(path).is_dir():
    candidate = os.fspath(epath.Path(path) / HF_SPM_FILENAME)
    if not epath.Path(candidate).exists():
      raise FileNotFoundError(
          f"Directory {path!r} has no {HF_SPM_FILENAME!r}. A Hugging Face T5 "
          "checkpoint directory must contain its SentencePiece model "
          f"({HF_SPM_FILENAME}); a tokenizer.json alone is not enough. Copy "
          "the model's spiece.model there or pass the .model file directly."
      )
    return candidate
  if not epath.Path(path).exists():
    raise FileNotFoundError(
        f"SentencePiece model {path!r} does not exist. Pass a .model file, a "
        f"gs:// path, or a Hugging Face checkpoint directory with "
        f"{HF_SPM_FILENAME}; for the offline default corpus, train one with "
        "miniend_jax.data.local_corpus.train_pydoc_vocabulary()."
    )
  return path


def _read_model_proto(spm_path: str) -> sentencepiece_model_pb2.ModelProto:
  data = epath.Path(spm_path).read_bytes()
  try:
    return sentencepiece_model_pb2.ModelProto.FromString(data)
  except Exception as e:  # protobuf raises DecodeError, not always importable.
    raise ValueError(
        f"{spm_path!r} is not a SentencePiece model ({e})."
    ) from e


def _hf_declared_extra_ids(directory: str) -> Optional[int]:
  """The extra-id count a HF checkpoint's tokenizer_config.json declares."""
  config_path = epath.Path(directory) / "tokenizer_config.json"
  if not config_path.exists():
    return None
  config = json.loads(config_path.read_text())
  if "extra_ids" in config:
    return int(config["extra_ids"])
  specials = config.get("additional_special_tokens") or config.get(
      "extra_special_tokens"
  )
  if isinstance(specials, list):
    count = sum(1 for t in specials if _EXTRA_ID_PREFIX in str(t))
    return count or None
  return None


def _hf_model_vocab_size(directory: str) -> Optional[int]:
  """vocab_size from a HF checkpoint's config.json (embedding rows)."""
  config_path = epath.Path(directory) / "config.json"
  if not config_path.exists():
    return None
  return json.loads(config_path.read_text()).get("vocab_size")


def _check_extra_ids(extra_ids: int) -> None:
  if extra_ids != T5_EXTRA_IDS:
    raise ValueError(
        f"Got extra_ids={extra_ids}, but T5 vocabularies have exactly "
        f"{T5_EXTRA_IDS} extra ids (<extra_id_0>..<extra_id_99>); checkpoints "
        "and span corruption assume that layout. Use extra_ids="
        f"{T5_EXTRA_IDS}."
    )


def validate_vocabulary(vocabulary: seqio.Vocabulary) -> None:
  """Checks an already built vocabulary for the T5 layout.

  Args:
    vocabulary: a `seqio.Vocabulary` (typically SentencePiece).

  Raises:
    ValueError: if it does not have 100 extra ids or pad=0/eos=1/unk=2 (ByT5's
      byte vocabulary without extra ids is accepted as it is).
  """
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    validate_sentencepiece_model(  # checks the extra ids too
        vocabulary.sentencepiece_model_file, vocabulary.extra_ids
    )
    return
  if isinstance(vocabulary, seqio.ByteVocabulary) and vocabulary.extra_ids == 0:
    return  # ByT5's layout: sentinels reuse the top byte ids (`byt5_vocabulary`)
  _check_extra_ids(vocabulary.extra_ids)
  if (vocabulary.pad_id, vocabulary.eos_id) != (PAD_ID, EOS_ID):
    raise ValueError(
        f"Vocabulary {vocabulary} has pad={vocabulary.pad_id}, "
        f"eos={vocabulary.eos_id}; T5 needs pad=0, eos=1."
    )


def validate_sentencepiece_model(
    spm_path: str, extra_ids: int = T5_EXTRA_IDS
) -> None:
  """Checks that a SentencePiece model is T5-compatible before extra ids.

  Args:
    spm_path: SentencePiece model file.
    extra_ids: number of extra ids the caller intends to add.

  Raises:
    ValueError: on special ids other than pad=0/eos=1/unk=2 (with no bos), on a
      model that already contains `<extra_id_N>` pieces (adding 100 more would
      shift every sentinel), or on an extra-id count other than 100.
  """
  _check_extra_ids(extra_ids)
  proto = _read_model_proto(spm_path)
  existing = [
      p.piece for p in proto.pieces if _EXTRA_ID_PREFIX in p.piece
  ]
  if existing:
    raise ValueError(
        f"SentencePiece model {spm_path!r} already contains {len(existing)} "
        f"extra-id pieces (e.g. {existing[0]!r}); seqio appends "
        f"{T5_EXTRA_IDS} more at the top, which would give duplicate and "
        "shifted sentinels. Use the base model without extra ids (T5's "
        "spiece.model has none)."
    )
  spec = proto.trainer_spec
  ids = dict(pad=spec.pad_id, eos=spec.eos_id, unk=spec.unk_id, bos=spec.bos_id)
  if (ids["pad"], ids["eos"], ids["unk"]) != (PAD_ID, EOS_ID, UNK_ID) or (
      ids["bos"] >= 0
  ):
    raise ValueError(
        f"SentencePiece model {spm_path!r} has special ids {ids}; T5 needs "
        "pad=0, eos=1, unk=2 and no bos. Retrain it with "
        "--pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1 (train_sentencepiece() "
        "does this)."
    )


# One TensorFlow tokenizer per SentencePiece model and process, whoever asks.
_TF_TOKENIZERS: dict = {}


class SentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """seqio's SentencePiece vocabulary with its TensorFlow tokenizer built once.

  seqio builds a new tf_text tokenizer each time a dataset is traced, and the
  fast one copies the converted model through a Python list of its bytes:
  ~0.6 s each, four times per run (inputs and targets of the train and eval
  pipelines), which was a fifth of a quickstart finetuning stage. The tokenizer
  is built in the eager context (`tf.init_scope`), so every traced dataset
  function can capture it.
  """

  @property
  def tf_tokenizer(self):
    key = (self._use_fast_tokenizer, hashlib.sha256(self.sp_model).digest())
    tokenizer = _TF_TOKENIZERS.get(key)
    if tokenizer is None:
      with tf.init_scope():
        tokenizer = super().tf_tokenizer
      _TF_TOKENIZERS[key] = tokenizer
    return tokenizer


def get_vocabulary(
    path: str = DEFAULT_T5_SPM_PATH,
    extra_ids: int = T5_EXTRA_IDS,
    validate: bool = True,
    use_fast_tokenizer: bool = True,
) -> seqio.SentencePieceVocabulary:
  """Returns the T5 vocabulary stored at `path`.

  Args:
    path: a SentencePiece `.model` file (local or `gs://`), or a Hugging Face
      T5 checkpoint directory containing `spiece.model`.
    extra_ids: number of sentinel ids to add; must be 100 for T5.
    validate: read the model now and check that it is T5-compatible (see
      `validate_sentencepiece_model`). With False nothing is read until the
      vocabulary is first used (for registering tasks offline against a
      `gs://` path).
    use_fast_tokenizer: tokenize in TF with tf_text's
      FastSentencepieceTokenizer. Besides being faster, it breaks ties between
      equally scored segmentations (runs like "=====") the way the Python
      SentencePiece library and transformers do; tf_text's older
      SentencepieceTokenizer does not always.

  Returns:
    A `seqio.SentencePieceVocabulary` with `vocab_size` = pieces + 100.

  Raises:
    FileNotFoundError, ValueError: see `resolve_sentencepiece_path` and
      `validate_sentencepiece_model`; also when a Hugging Face directory
      declares a different number of extra ids or an embedding smaller than
      the vocabulary.
  """
  path = os.fspath(path)
  if validate:
    spm_path = resolve_sentencepiece_path(path)
    validate_sentencepiece_model(spm_path, extra_ids)  # checks extra_ids too
  else:
    _check_extra_ids(extra_ids)
    spm_path = path
    # Only touch the file system for local paths: `gs://` must stay lazy.
    if "://" not in path and os.path.isdir(path):
      spm_path = os.path.join(path, HF_SPM_FILENAME)
  vocabulary = SentencePieceVocabulary(
      spm_path, extra_ids=extra_ids, use_fast_tokenizer=use_fast_tokenizer
  )
  if validate and spm_path != path:  # a Hugging Face checkpoint directory
    declared = _hf_declared_extra_ids(path)
    if declared is not None and declared != extra_ids:
      raise ValueError(
          f"Hugging Face checkpoint {path!r} declares {declared} extra ids in "
          f"tokenizer_config.json but {extra_ids} were requested; its "
          "sentinel ids would not match the model's. Use a T5 checkpoint with "
          f"{T5_EXTRA_IDS} extra ids."
      )
    embedding_rows = _hf_model_vocab_size(path)
    if embedding_rows is not None and embedding_rows < vocabulary.vocab_size:
      raise ValueError(
          f"Hugging Face checkpoint {path!r} has vocab_size={embedding_rows} "
          f"embedding rows but its vocabulary with {extra_ids} extra ids has "
          f"{vocabulary.vocab_size} ids; the sentinels would index past the "
          "embedding. The spiece.model does not belong to this checkpoint."
      )
  return vocabulary


# ByT5's vocabulary name in run settings and checkpoint metadata.
BYT5 = "byt5"


def byt5_vocabulary() -> seqio.ByteVocabulary:
  """ByT5's vocabulary as it was pretrained: UTF-8 bytes, no extra ids.

  Ids: pad 0, eos 1, unk 2, byte b at b + 3 (`ByT5Tokenizer`'s ids), 259 in
  all. ByT5 was pretrained with `ByteVocabulary()` (google-research/byt5,
  tasks.py), so span corruption's sentinels count down from id 258: they reuse
  the top byte values 0xFF, 0xFE, ..., which never occur in UTF-8 text. The
  125 `<extra_id_N>` tokens Hugging Face's ByT5Tokenizer appends (ids 259-383,
  the rest of the 384 embedding rows) were never sentinels in pretraining.
  """
  return seqio.ByteVocabulary()


def checkpoint_vocabulary(directory: str) -> seqio.Vocabulary:
  """The vocabulary a Hugging Face T5-family checkpoint was trained with.

  SentencePiece when the directory holds `spiece.model` (T5, Flan-T5, mT5,
  umT5, UL2; see `get_vocabulary`); bytes when its tokenizer is ByT5's
  (`byt5_vocabulary`, whose ids equal `ByT5Tokenizer`'s: byte + 3).

  Raises:
    ValueError: the directory holds neither (e.g. only a tokenizer.json).
  """
  directory = os.fspath(directory)
  if (epath.Path(directory) / HF_SPM_FILENAME).exists():
    return get_vocabulary(directory)
  tokenizer_class = None
  config_path = epath.Path(directory) / "tokenizer_config.json"
  if config_path.exists():
    tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class")
  if tokenizer_class == "ByT5Tokenizer":
    vocabulary = byt5_vocabulary()
    rows = _hf_model_vocab_size(directory)
    if rows is not None and rows < vocabulary.vocab_size:
      raise ValueError(f"{directory}: a ByT5 tokenizer needs {vocabulary.vocab_size} embedding "
                       f"rows but config.json has vocab_size={rows}.")
    return vocabulary
  raise ValueError(
      f"{directory} holds no vocabulary miniend_jax can read: no {HF_SPM_FILENAME} "
      f"(SentencePiece: T5, mT5, umT5, UL2) and tokenizer_config.json names "
      f"tokenizer_class={tokenizer_class!r}, not ByT5Tokenizer. Copy the model's "
      f"{HF_SPM_FILENAME} into the directory.")


def vocabulary_reference(vocabulary: seqio.Vocabulary) -> Optional[str]:
  """How run metadata names a vocabulary: its SentencePiece file, "byt5", or None."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return BYT5
  return getattr(vocabulary, "sentencepiece_model_file", None)


def vocabulary_from_reference(reference: str) -> seqio.Vocabulary:
  """The vocabulary a reference names: "byt5", a Hugging Face checkpoint
  directory (`checkpoint_vocabulary`) or a SentencePiece `.model` file."""
  if reference == BYT5:
    return byt5_vocabulary()
  if epath.Path(reference).is_dir():
    return checkpoint_vocabulary(reference)
  return get_vocabulary(reference)


def padded_vocab_size(vocabulary: seqio.Vocabulary, multiple: int = 128) -> int:
  """Embedding rows for `vocabulary`, rounded up to `multiple` (T5: 32128)."""
  return -(-vocabulary.vocab_size // multiple) * multiple


def train_sentencepiece(
    texts: Iterable[str],
    output_path: str,
    vocab_size: int = 3000,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    byte_fallback: bool = False,
    input_sentence_size: int = 200_000,
    max_sentence_length: int = 8192,
    num_threads: int = 2,
    seed: int = 0,
) -> str:
  """Trains a T5-compatible SentencePiece model and writes it to `output_path`.

  T5-compatible means pad=0, eos=1, unk=2, no bos, nmt_nfkc normalisation and
  no extra ids in the model itself (seqio adds the 100 sentinels). Byte
  fallback is off by default because Hugging Face's T5 tokenizer does not
  implement it, and the tokenizers would then disagree on unseen characters;
  `character_coverage=1.0` keeps every character of the training text instead.

  Args:
    texts: training text, one sentence / line / paragraph per item.
    output_path: where to write the `.model` file (parent dirs are created).
    vocab_size: number of pieces, including pad/eos/unk.
    model_type: SentencePiece model type (T5 uses "unigram").
    character_coverage: fraction of characters covered by single pieces.
    byte_fallback: decompose unknown characters into byte pieces.
    input_sentence_size: at most this many sentences are sampled.
    max_sentence_length: longer sentences (in bytes) are skipped by the trainer.
    num_threads: trainer threads.
    seed: seed for sentence sampling, so the model is deterministic.

  Returns:
    `output_path`.

  Raises:
    ValueError: if `texts` holds no non-blank text.
  """
  sentences = [t for t in texts if t and t.strip()]
  if not sentences:
    raise ValueError(
        "train_sentencepiece got no non-blank text; pass the corpus lines to "
        "learn the vocabulary from."
    )
  buffer = io.BytesIO()
  # SentencePiece seeds its sentence sampling from a global; fix it so that the
  # same corpus always gives the same model.
  sentencepiece.set_random_generator_seed(seed)
  SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=buffer,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID,
      eos_id=EOS_ID,
      unk_id=UNK_ID,
      bos_id=-1,
      pad_piece="<pad>",
      eos_piece="</s>",
      unk_piece="<unk>",
      character_coverage=character_coverage,
      byte_fallback=byte_fallback,
      normalization_rule_name="nmt_nfkc",
      input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True,
      max_sentence_length=max_sentence_length,
      num_threads=num_threads,
      minloglevel=2,
  )
  output = epath.Path(output_path)
  output.parent.mkdir(parents=True, exist_ok=True)
  # Write atomically so that concurrent readers never see a partial model.
  tmp_path = output.parent / f"{output.name}.tmp{os.getpid()}"
  tmp_path.write_bytes(buffer.getvalue())
  tmp_path.replace(output)
  return output_path


def save_hf_tokenizer(vocabulary_or_path, out_dir: str) -> str:
  """Writes a Hugging Face T5 tokenizer (spiece.model + configs) to `out_dir`.

  Args:
    vocabulary_or_path: a `seqio.SentencePieceVocabulary` or a path accepted
      by `resolve_sentencepiece_path`; a `seqio.ByteVocabulary` or "byt5"
      writes ByT5's tokenizer instead.
    out_dir: directory to write; `transformers.AutoTokenizer` loads it.

  Returns:
    `out_dir`.
  """
  if "://" in os.fspath(out_dir):
    # transformers writes and reads tokenizers on the local disk only: build it
    # there, then copy the files over.
    with tempfile.TemporaryDirectory() as local:
      save_hf_tokenizer(vocabulary_or_path, local)
      out = epath.Path(out_dir)
      out.mkdir(parents=True, exist_ok=True)
      for path in epath.Path(local).iterdir():
        path.copy(out / path.name, overwrite=True)
    return out_dir

  import transformers  # pylint: disable=g-import-not-at-top

  if vocabulary_or_path == BYT5 or isinstance(vocabulary_or_path, seqio.ByteVocabulary):
    os.makedirs(out_dir, exist_ok=True)
    # 125 extra ids: the 384-id layout of Google's ByT5 checkpoints on the hub.
    transformers.ByT5Tokenizer(extra_ids=125).save_pretrained(out_dir)
    return out_dir

  if isinstance(vocabulary_or_path, seqio.SentencePieceVocabulary):
    spm_path = vocabulary_or_path.sentencepiece_model_file
  else:
    spm_path = resolve_sentencepiece_path(vocabulary_or_path)
  os.makedirs(out_dir, exist_ok=True)
  target = epath.Path(out_dir) / HF_SPM_FILENAME
  if "://" in os.fspath(spm_path) or os.path.abspath(spm_path) != os.path.abspath(target):
    epath.Path(spm_path).copy(target, overwrite=True)
  tokenizer = transformers.T5TokenizerFast.from_pretrained(
      out_dir, extra_ids=T5_EXTRA_IDS
  )
  tokenizer.save_pretrained(out_dir)
  return out_dir
