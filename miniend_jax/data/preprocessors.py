"""seqio preprocessors (TF ops): T5 span corruption and text-to-text formats.

Everything here is a re-implementation of what the `t5` package
(`t5.data.preprocessors`, `t5.data.glue_utils`) provides; we do not depend on
`t5` because it pins conflicting nightlies. Behaviour follows T5 exactly where
it matters for checkpoints (noise mask, sentinel order, sequence lengths,
GLUE input strings and label words) so that T5 models distilled or finetuned
here see the data they were trained on.

Shapes: a "token sequence" is a rank-1 int32 tensor of length `[n]`; examples
are dicts of such tensors (or scalar tf.string before tokenization). As in T5,
`select_random_chunk` and `split_tokens` also take rank >= 2 features
`[n, ...]`, whose rows (the first axis) are the unit that is counted, chunked
and split.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import seqio
import tensorflow as tf

# Defaults of T5's span corruption objective.
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# ByT5 corrupts spans of 20 bytes on average (google-research/byt5 tasks.py).
BYT5_MEAN_NOISE_SPAN_LENGTH = 20.0
# Documents longer than this are cut to one random chunk (as in T5), so that
# one huge document cannot dominate a concatenation batch.
MAX_CHUNK_TOKENS = 65536
# Number of documents concatenated before splitting into segments (T5: 128).
CONCAT_BATCH_SIZE = 128


# ----------------------------------------------------------------------------
# Span corruption
# ----------------------------------------------------------------------------


def sentinel_id(vocabulary: seqio.Vocabulary) -> int:
  """Id of `<extra_id_0>`, the first sentinel: the top of the id space.

  Later sentinels count down from it (`<extra_id_1>` = this - 1, ...), which
  is the order `seqio.SentencePieceVocabulary(reverse_extra_ids=True)` and
  Hugging Face's T5 tokenizer assign. ByT5's byte vocabulary has no extra ids:
  its sentinels reuse the top byte ids (258 = byte 0xFF, down), never UTF-8.
  """
  if not num_sentinels(vocabulary):
    raise ValueError(
        f"Vocabulary {vocabulary} has no extra ids; span corruption needs "
        "sentinels. Build it with miniend_jax.data.vocab.get_vocabulary()."
    )
  return vocabulary.vocab_size - 1


# Byte values that never occur in UTF-8 text (0xF5-0xFF): the sentinels ByT5's
# byte vocabulary can take without colliding with text.
_UNUSED_UTF8_BYTES = 11


def num_sentinels(vocabulary: seqio.Vocabulary) -> int:
  """How many distinct sentinels span corruption may use with `vocabulary`:
  its extra ids, or for ByT5's bytes the 11 byte values UTF-8 never uses."""
  if isinstance(vocabulary, seqio.ByteVocabulary) and not vocabulary.extra_ids:
    return _UNUSED_UTF8_BYTES
  return vocabulary.extra_ids


def span_corruption_lengths(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
  """(number of noise tokens, number of noise spans) for `length` tokens.

  Mirrors the rounding in `random_spans_noise_mask` (python ints).
  """
  length = max(length, 2)
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, num_spans


def random_spans_helper(
    inputs_length: int = 512,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
  """Raw segment length that fills `inputs_length` exactly after corruption.

  Re-implements `t5.data.preprocessors.random_spans_helper`: finds the largest
  number of raw tokens whose corrupted inputs (non-noise tokens, one sentinel
  per span, one EOS) fit in `inputs_length`, and the resulting targets length
  (noise tokens, one sentinel per span, one EOS). Packing such examples fills
  the encoder rows exactly.

  Args:
    inputs_length: desired length of the `inputs` feature, EOS included.
    noise_density: fraction of tokens masked.
    mean_noise_span_length: average length of a masked span.
    extra_tokens_per_span_inputs: sentinels per span in the inputs.
    extra_tokens_per_span_targets: sentinels per span in the targets.

  Returns:
    (tokens_length, targets_length): 568 and 114 for T5's (512, 0.15, 3).
  """

  def corrupted_lengths(tokens_length):
    num_noise, num_spans = span_corruption_lengths(
        tokens_length, noise_density, mean_noise_span_length
    )
    inputs = (
        tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs
    )
    targets = num_noise + num_spans * extra_tokens_per_span_targets
    return inputs + 1, targets + 1  # + EOS

  if inputs_length < 2:
    raise ValueError(f"inputs_length must be at least 2, got {inputs_length}.")
  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  targets_length = corrupted_lengths(tokens_length)[1]
  # As T5 does: with density 0.5 make targets no longer than inputs, which is
  # more likely to be a round number.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(
    num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
  """Splits `num_items` into `num_segments` random positive lengths.

  Args:
    num_items: scalar int32, >= num_segments.
    num_segments: scalar int32, >= 1.
    seed: [2] int stateless seed.

  Returns:
    int32 [num_segments] lengths summing to `num_items`, each >= 1.
  """
  # Choose num_segments - 1 of the num_items - 1 gaps between items as cuts.
  is_cut = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  is_cut = seqio.utils.stateless_shuffle(is_cut, seed)
  segment_ids = tf.cumsum(tf.pad(is_cut, [[1, 0]]))
  return tf.math.segment_sum(tf.ones_like(segment_ids), segment_ids)


def random_spans_noise_mask(
    length: tf.Tensor,
    noise_density: float,
    seeds: tf.Tensor,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
  """T5's noise mask: alternating non-noise / noise spans of random lengths.

  Re-implements `t5.data.preprocessors.random_spans_noise_mask` (same rounding
  and the same stateless random segmentation, so for the same seeds the masks
  match). The mask starts with a non-noise span and ends with a noise span;
  `round(length * noise_density)` tokens are noise, in
  `round(num_noise / mean_noise_span_length)` spans.

  Args:
    length: scalar int32, number of tokens.
    noise_density: fraction of noise tokens.
    seeds: [2, 2] int stateless seeds (one per segmentation).
    mean_noise_span_length: average noise span length.

  Returns:
    bool [length], True where the token is noise.
  """
  if noise_density == 0.0:
    return tf.zeros([length], tf.bool)
  orig_length = length
  # Degenerate lengths (0, 1) are computed as 2 and cut back at the end.
  length = tf.maximum(length, 2)
  num_noise = tf.cast(
      tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32
  )
  num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
  num_spans = tf.cast(
      tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
      tf.int32,
  )
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  nonnoise_lengths = _random_segmentation(
      length - num_noise, num_spans, seeds[1]
  )
  # [nonnoise_0, noise_0, nonnoise_1, noise_1, ...]
  interleaved = tf.reshape(
      tf.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2]
  )
  span_starts = tf.cumsum(interleaved)[:-1]
  starts_indicator = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length
  )
  span_index = tf.cumsum(starts_indicator)
  is_noise = tf.equal(span_index % 2, 1)
  return is_noise[:orig_length]


def noise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
  """Replaces each noise span by one sentinel, counting down from the top.

  Re-implements `t5.data.preprocessors.noise_span_to_unique_sentinel`.

  Args:
    tokens: int32 [n].
    noise_mask: bool [n].
    vocabulary: gives the first sentinel id (`sentinel_id`).

  Returns:
    int32 [n - noise tokens + noise spans].
  """
  previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise = tf.logical_and(noise_mask, tf.logical_not(previous_is_noise))
  later_noise = tf.logical_and(noise_mask, previous_is_noise)
  sentinels = sentinel_id(vocabulary) + 1 - tf.cumsum(
      tf.cast(first_noise, tokens.dtype)
  )
  tokens = tf.where(first_noise, sentinels, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocabulary: seqio.Vocabulary
) -> tf.Tensor:
  """The targets side: each non-noise span becomes a sentinel (T5)."""
  return noise_span_to_unique_sentinel(
      tokens, tf.logical_not(noise_mask), vocabulary
  )


def _num_rows(tokens: tf.Tensor) -> tf.Tensor:
  """Length of a token feature along its first axis (T5's unit for rank >= 2)."""
  return tf.shape(tokens)[0]


@seqio.map_over_dataset(num_seeds=1)
def _select_random_chunk(x, seed, feature_key, max_length):
  tokens = x[feature_key]
  num_chunks = (_num_rows(tokens) + max_length - 1) // max_length
  chunk = tf.random.stateless_uniform(
      [], seed=seed, minval=0, maxval=tf.maximum(num_chunks, 1), dtype=tf.int32
  )
  return {feature_key: tokens[chunk * max_length : (chunk + 1) * max_length]}


def select_random_chunk(
    dataset: tf.data.Dataset,
    feature_key: str = "targets",
    max_length: int = MAX_CHUNK_TOKENS,
) -> tf.data.Dataset:
  """Keeps one random `max_length`-token chunk of each non-empty document.

  Re-implements `t5.data.preprocessors.select_random_chunk` (only the
  `feature_key` feature is kept). Input `{feature_key: int32 [n, ...]}`,
  output `{feature_key: int32 [min(n, max_length), ...]}`: the chunk is
  `max_length` rows (first-axis entries, single tokens for rank 1) starting
  at a random multiple of `max_length`, the last one possibly shorter.
  Documents with no elements are dropped.
  """
  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  return _select_random_chunk(  # pylint: disable=no-value-for-parameter
      dataset, feature_key=feature_key, max_length=max_length
  )


def reduce_concat_tokens(
    dataset: tf.data.Dataset,
    feature_key: str = "targets",
    batch_size: int = CONCAT_BATCH_SIZE,
) -> tf.data.Dataset:
  """Concatenates `batch_size` consecutive documents into one token stream.

  Re-implements `t5.data.preprocessors.reduce_concat_tokens`: pads a batch,
  flattens it and drops the padding (id 0 never occurs in tokenized text).
  Output `{feature_key: int32 [sum of lengths]}`.
  """
  dataset = dataset.map(
      lambda x: {feature_key: x[feature_key]},
      num_parallel_calls=tf.data.AUTOTUNE,
  )
  dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

  def _flatten(x):
    tokens = tf.reshape(x[feature_key], [-1])
    return {feature_key: tf.boolean_mask(tokens, tf.not_equal(tokens, 0))}

  return dataset.map(_flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(
    dataset: tf.data.Dataset,
    max_tokens_per_segment: int,
    feature_key: str = "targets",
) -> tf.data.Dataset:
  """Cuts each token stream into consecutive segments of fixed length.

  Re-implements `t5.data.preprocessors.split_tokens` (fixed segment length):
  every segment has `max_tokens_per_segment` tokens except the last one of
  each stream, which keeps the remainder. Input `{feature_key: [n, ...]}`,
  output `{feature_key: [<=L, ...]}`: for rank >= 2 the rows (first axis)
  are split, each row kept whole, as T5 does.
  """
  length = max_tokens_per_segment

  def _split(x):
    tokens = x[feature_key]
    n = _num_rows(tokens)
    num_full = n // length
    remainder = n - num_full * length
    row_lengths = tf.concat(
        [tf.fill([num_full], length), tf.reshape(remainder, [1])], axis=0
    )
    row_lengths = tf.boolean_mask(row_lengths, row_lengths > 0)
    return tf.RaggedTensor.from_row_lengths(tokens, row_lengths)

  return dataset.flat_map(
      lambda x: tf.data.Dataset.from_tensor_slices(_split(x)).map(
          lambda t: {feature_key: t}
      )
  )


@seqio.map_over_dataset(num_seeds=2)
def _denoise(
    x, seeds, vocabulary, noise_density, mean_noise_span_length, feature_key
):
  tokens = x[feature_key]
  noise_mask = random_spans_noise_mask(
      tf.size(tokens), noise_density, seeds, mean_noise_span_length
  )
  return {
      "inputs": noise_span_to_unique_sentinel(tokens, noise_mask, vocabulary),
      "targets": nonnoise_span_to_unique_sentinel(
          tokens, noise_mask, vocabulary
      ),
  }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
    merge_examples_to_reduce_padding: bool = True,
    feature_key: str = "targets",
) -> tf.data.Dataset:
  """T5's span corruption objective as a seqio preprocessor.

  Re-implements `t5.data.preprocessors.span_corruption`. Documents (tokenized,
  no EOS, under `feature_key`) are concatenated and cut into segments of
  `random_spans_helper(sequence_length["inputs"])[0]` tokens; in each,
  ~`noise_density` of the tokens in spans of mean length
  `mean_noise_span_length` are replaced by sentinels in the inputs and kept,
  each after its sentinel, in the targets. After `append_eos_after_trim`,
  full segments have exactly `sequence_length["inputs"]` input tokens.

  Args:
    dataset: examples `{feature_key: int32 [n]}`.
    sequence_length: {"inputs": int, "targets": int}.
    output_features: seqio features; the targets vocabulary gives sentinels.
    noise_density: fraction of tokens masked (T5: 0.15).
    mean_noise_span_length: mean masked span length (T5: 3).
    merge_examples_to_reduce_padding: concatenate documents before splitting.
    feature_key: feature holding the tokenized text.

  Returns:
    Dataset of `{"inputs": int32 [<= L_in - 1], "targets": int32 [<= L_t - 1]}`.

  Raises:
    ValueError: if `sequence_length["targets"]` is too short for the targets,
      or the vocabulary has fewer sentinels than the segments have spans.
  """
  inputs_length = sequence_length["inputs"]
  tokens_length, targets_length = random_spans_helper(
      inputs_length, noise_density, mean_noise_span_length
  )
  if sequence_length["targets"] < targets_length:
    raise ValueError(
        f"Span corruption with inputs length {inputs_length} (noise density "
        f"{noise_density}, mean span {mean_noise_span_length}) makes targets "
        f"of up to {targets_length} tokens, but the targets length is "
        f"{sequence_length['targets']}. Set the targets length to at least "
        f"{targets_length}."
    )
  vocabulary = output_features["targets"].vocabulary
  _, max_spans = span_corruption_lengths(
      tokens_length, noise_density, mean_noise_span_length
  )
  if max_spans > num_sentinels(vocabulary):
    raise ValueError(
        f"Span corruption of {tokens_length}-token segments makes "
        f"{max_spans} noise spans, but the vocabulary has only "
        f"{num_sentinels(vocabulary)} sentinels (extra ids, or for bytes the "
        "values UTF-8 never uses). Use a vocabulary with 100 extra ids, "
        "shorter inputs or longer spans."
    )
  dataset = select_random_chunk(dataset, feature_key=feature_key)
  if merge_examples_to_reduce_padding:
    dataset = reduce_concat_tokens(dataset, feature_key=feature_key)
  dataset = split_tokens(dataset, tokens_length, feature_key=feature_key)
  return _denoise(  # pylint: disable=no-value-for-parameter
      dataset,
      vocabulary=vocabulary,
      noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length,
      feature_key=feature_key,
  )


# ----------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------

# Label words per GLUE config: TFDS's ClassLabel names, which T5 uses as
# targets (t5.data.glue_utils reads them from the TFDS builder config).
GLUE_LABEL_NAMES: Mapping[str, Optional[tuple[str, ...]]] = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
    "stsb": None,  # regression
    "mnli": ("entailment", "neutral", "contradiction"),
    "mnli_mismatched": ("entailment", "neutral", "contradiction"),
    "mnli_matched": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"),
    "ax": ("entailment", "neutral", "contradiction"),
}

def glue_benchmark_name(config_name: str) -> str:
  """The task prefix T5 writes: MNLI variants and AX are all "mnli"."""
  if "mnli" in config_name or config_name == "ax":
    return "mnli"
  return config_name


@seqio.map_over_dataset
def glue(
    x: Mapping[str, tf.Tensor],
    benchmark_name: str,
    label_names: Sequence[str],
    feature_names: Optional[Sequence[str]] = None,
    id_key: Optional[str] = "idx",
) -> dict[str, tf.Tensor]:
  """GLUE example -> T5 text-to-text (re-implements `t5...preprocessors.glue`).

  `{"sentence1": "A", "sentence2": "B", "label": 1, "idx": 7}` with
  benchmark "rte" becomes `{"inputs": "rte sentence1: A sentence2: B",
  "targets": "not_entailment", "idx": 7}`; an unlabelled example (label -1,
  test splits) gets the target "<unk>".

  Args:
    x: a GLUE example (scalars).
    benchmark_name: prefix of the inputs.
    label_names: label word for each class id.
    feature_names: text features in order; default: sorted non-label keys.
    id_key: feature copied to the output as "idx" (None: none).

  Returns:
    {"inputs": tf.string [], "targets": tf.string [], "idx": int32 []}.
  """
  feature_names = feature_names or sorted(
      set(x.keys()).difference(["label", "idx"])
  )
  pieces = [benchmark_name]
  for key in feature_names:
    pieces += [f"{key}:", x[key]]
  label = x["label"]
  targets = tf.cond(
      tf.equal(label, -1),
      lambda: tf.constant("<unk>"),
      lambda: tf.gather(tf.constant(list(label_names)), label),
  )
  ex = {"inputs": tf.strings.join(pieces, separator=" "), "targets": targets}
  if id_key:
    ex["idx"] = x[id_key]
  return ex


@seqio.map_over_dataset
def stsb(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """STS-B as T5 does it: the score rounded to 0.2, one decimal, as text.

  `{"sentence1": "A", "sentence2": "B", "label": 3.27, "idx": 0}` becomes
  `{"inputs": "stsb sentence1: A sentence2: B", "targets": "3.2", "idx": 0}`.
  Re-implements `t5.data.preprocessors.stsb`.
  """
  inputs = tf.strings.join(
      ["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]],
      separator=" ",
  )
  label = tf.cast(x["label"], tf.float32)
  targets = tf.strings.as_string(tf.round(label * 5.0) / 5.0, precision=1)
  return {"inputs": inputs, "targets": targets, "idx": x["idx"]}


def glue_text_preprocessor(config_name: str):
  """The text preprocessor for a TFDS `glue/<config_name>` dataset."""
  if config_name not in GLUE_LABEL_NAMES:
    raise ValueError(
        f"Unknown GLUE config {config_name!r}; known: "
        f"{sorted(GLUE_LABEL_NAMES)}."
    )
  if config_name == "stsb":
    return stsb
  return functools.partial(
      glue,
      benchmark_name=glue_benchmark_name(config_name),
      label_names=GLUE_LABEL_NAMES[config_name],
  )


# ----------------------------------------------------------------------------
# Summarization and classification
# ----------------------------------------------------------------------------


@seqio.map_over_dataset
def summarize(
    x: Mapping[str, tf.Tensor], article_key: str, summary_key: str
) -> dict[str, tf.Tensor]:
  """`{"inputs": "summarize: " + article, "targets": summary}` (as T5).

  Re-implements `t5.data.preprocessors.summarize`; inputs/targets are
  tf.string scalars.
  """
  return {
      "inputs": tf.strings.join(["summarize:", x[article_key]], separator=" "),
      "targets": x[summary_key],
  }


@seqio.map_over_dataset
def text_line_to_example(line: tf.Tensor, key: str = "text") -> dict:
  """A line of a text file (tf.string scalar) -> {key: line}."""
  return {key: line}


@seqio.map_over_dataset
def classify_text(
    x: Mapping[str, tf.Tensor], prefix: str, text_key: str, label_key: str
) -> dict[str, tf.Tensor]:
  """`{"inputs": prefix + " " + text, "targets": label word}` (strings)."""
  return {
      "inputs": tf.strings.join([prefix, x[text_key]], separator=" "),
      "targets": x[label_key],
  }
