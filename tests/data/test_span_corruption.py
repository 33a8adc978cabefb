"""T5 span corruption: statistics, sentinel order, exact inversion, seeds.

The "T5 cases" below port the span-corruption cases of T5's own tests
(google-research/text-to-text-transfer-transformer,
t5/data/preprocessors_test.py) to our functions: the same inputs and expected
values, rewritten as pytest functions.
"""

import types

import numpy as np
import pytest
import seqio
import tensorflow as tf

from miniend_jax.data import preprocessors
from miniend_jax.data import tasks
from tests.data.span_testing import undo_span_corruption

FEATURE_LENGTHS = {"inputs": 128, "targets": 32}


def test_random_spans_helper_matches_t5_lengths():
  # T5's pretraining setting: 568 raw tokens -> 512 inputs, 114 targets.
  assert preprocessors.random_spans_helper(512) == (568, 114)
  for inputs_length in (16, 64, 128, 512, 1024):
    tokens, targets = preprocessors.random_spans_helper(inputs_length)
    num_noise, num_spans = preprocessors.span_corruption_lengths(tokens)
    assert tokens - num_noise + num_spans + 1 == inputs_length
    assert num_noise + num_spans + 1 == targets
  assert tasks.span_corruption_feature_lengths(512) == {
      "inputs": 512, "targets": 114}


def test_noise_mask_shape_and_counts():
  for length in (2, 3, 10, 57, 141, 568):
    for seed in range(3):
      seeds = tf.constant([[seed, 1], [seed, 2]])
      mask = preprocessors.random_spans_noise_mask(
          length, 0.15, seeds, 3.0).numpy()
      num_noise, num_spans = preprocessors.span_corruption_lengths(length)
      assert mask.shape == (length,)
      assert mask.sum() == num_noise
      assert not mask[0] and mask[-1]  # non-noise first, noise last
      starts = np.flatnonzero(mask & ~np.pad(mask[:-1], (1, 0)))
      assert len(starts) == num_spans


def test_sentinels_replace_spans_by_hand(pydoc_vocab):
  top = pydoc_vocab.vocab_size - 1  # <extra_id_0>
  tokens = tf.range(10, 20)
  mask = tf.constant([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]) > 0
  inputs = preprocessors.noise_span_to_unique_sentinel(
      tokens, mask, pydoc_vocab).numpy().tolist()
  targets = preprocessors.nonnoise_span_to_unique_sentinel(
      tokens, mask, pydoc_vocab).numpy().tolist()
  assert inputs == [10, 11, top, 14, 15, 16, top - 1, 18, 19]
  assert targets == [top, 12, 13, top - 1, 17, top - 2]
  assert undo_span_corruption(
      inputs, targets, pydoc_vocab) == list(range(10, 20))


def _segments_and_corrupted(vocabulary, seed):
  """The raw segments and their span-corrupted versions, in the same order."""
  task = seqio.get_mixture_or_task("pydoc_span_corruption")
  source = task.source.get_dataset("train", shuffle=False)
  tokenized = source.map(
      lambda x: {"targets": vocabulary.encode_tf(x["text"])})
  tokens_length, _ = preprocessors.random_spans_helper(
      FEATURE_LENGTHS["inputs"])
  segments = preprocessors.split_tokens(
      preprocessors.reduce_concat_tokens(
          preprocessors.select_random_chunk(tokenized)),
      tokens_length)
  corrupted = task.get_dataset(
      FEATURE_LENGTHS, split="train", shuffle=False, seed=seed)
  return segments, corrupted


def test_span_corruption_statistics_and_inversion(pydoc_vocab):
  segments, corrupted = _segments_and_corrupted(pydoc_vocab, seed=0)
  first_sentinel = pydoc_vocab.vocab_size - pydoc_vocab.extra_ids
  eos = pydoc_vocab.eos_id
  n_examples = total_tokens = total_noise = total_spans = 0
  full_rows = 0
  for segment, example in zip(
      segments.as_numpy_iterator(), corrupted.as_numpy_iterator()):
    original = segment["targets"].tolist()
    inputs = example["inputs"].tolist()
    targets = example["targets"].tolist()
    assert inputs[-1] == eos and targets[-1] == eos
    inputs, targets = inputs[:-1], targets[:-1]
    # Merging inputs and targets back gives the original tokens exactly.
    assert undo_span_corruption(
        inputs, targets, pydoc_vocab) == original
    # Sentinels in T5's order: <extra_id_0> (the top id), then counting down.
    input_sentinels = [t for t in inputs if t >= first_sentinel]
    target_sentinels = [t for t in targets if t >= first_sentinel]
    expected = [pydoc_vocab.vocab_size - 1 - i
                for i in range(len(input_sentinels))]
    assert input_sentinels == expected
    assert target_sentinels[: len(expected)] == expected
    n_examples += 1
    total_tokens += len(original)
    total_spans += len(input_sentinels)
    total_noise += len(targets) - len(target_sentinels)
    full_rows += len(example["inputs"]) == FEATURE_LENGTHS["inputs"]
  assert n_examples >= 2000
  assert abs(total_noise / total_tokens - 0.15) <= 0.01
  assert abs(total_noise / total_spans - 3.0) <= 0.3
  # All but the last segment of each 128-document batch fill `inputs`.
  assert full_rows / n_examples > 0.95


def test_same_seed_same_output(pydoc_setup):
  def first(seed, n=40):
    ds = seqio.get_mixture_or_task("pydoc_span_corruption").get_dataset(
        FEATURE_LENGTHS, split="train", shuffle=True, seed=seed)
    return [(tuple(x["inputs"]), tuple(x["targets"]))
            for x in ds.take(n).as_numpy_iterator()]

  assert first(7) == first(7)
  assert first(7) != first(8)


def test_packed_batches_fill_rows(pydoc_setup):
  lengths = tasks.span_corruption_feature_lengths(128)
  ds = tasks.get_dataset("pydoc_span_corruption", lengths, batch_size=16,
                         shuffle=False, seed=0)
  batch = next(ds.as_numpy_iterator())
  assert (batch["encoder_input_tokens"] != 0).mean() > 0.95
  assert (batch["decoder_target_tokens"] != 0).mean() > 0.95


def test_targets_too_short_is_an_error(pydoc_setup):
  with pytest.raises(ValueError, match="targets length to at least 114"):
    tasks.get_dataset("pydoc_span_corruption", {"inputs": 512, "targets": 64},
                      batch_size=2)


def test_too_few_sentinels_is_an_error(pydoc_vocab):
  small = seqio.PassThroughVocabulary(size=pydoc_vocab.vocab_size, eos_id=1)
  ds = tf.data.Dataset.from_tensors({"targets": tf.range(3, 200)})
  with pytest.raises(ValueError, match="sentinel"):
    preprocessors.span_corruption(
        ds, {"inputs": 128, "targets": 32},
        {"targets": seqio.Feature(small)})
  # 2048 inputs need 114 spans per segment: more than the 100 extra ids.
  with pytest.raises(ValueError, match="only 100 sentinels"):
    preprocessors.span_corruption(
        ds, {"inputs": 2048, "targets": 512},
        {"targets": seqio.Feature(pydoc_vocab)})
  # ByT5's bytes: 11 sentinels (0xF5-0xFF); 4096 bytes in 20-byte spans need 31.
  with pytest.raises(ValueError, match="only 11 sentinels"):
    preprocessors.span_corruption(
        ds, {"inputs": 4096, "targets": 1024}, {"targets": seqio.Feature(seqio.ByteVocabulary())},
        mean_noise_span_length=preprocessors.BYT5_MEAN_NOISE_SPAN_LENGTH)


# ---------------------------------------------------------------------------
# T5 cases.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mean_span,expected", [(2.0, (70, 22)), (1.0, (63, 27))])
def test_t5_random_spans_helper(mean_span, expected):
  assert preprocessors.random_spans_helper(64, 0.2, mean_span, 1, 1) == expected


def test_t5_random_spans_noise_mask_is_bit_identical():
  # 32 tokens, density 0.25, mean span 2: 4 noise spans of 8 tokens in all,
  # exactly where T5 puts them for these seeds.
  mask = preprocessors.random_spans_noise_mask(
      32, 0.25, tf.constant([(1, 2), (3, 4)]), 2.0)
  assert tf.cast(mask, tf.int32).numpy().tolist() == [
      0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0,
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]


def test_t5_unique_sentinels():
  # T5's mock vocabulary of 1000 ids: the first sentinel is id 999.
  vocabulary = types.SimpleNamespace(vocab_size=1000, extra_ids=100)
  tokens = tf.constant([10, 11, 12, 13, 14, 15])
  mask = tf.constant([True, True, False, False, True, False])
  inputs = preprocessors.noise_span_to_unique_sentinel(tokens, mask, vocabulary)
  targets = preprocessors.nonnoise_span_to_unique_sentinel(tokens, mask, vocabulary)
  assert inputs.numpy().tolist() == [999, 12, 13, 998, 15]
  assert targets.numpy().tolist() == [10, 11, 999, 14, 998]


def _split(original, length):
  ds = tf.data.Dataset.from_tensors({"targets": original})
  return [x["targets"] for x in
          preprocessors.split_tokens(ds, length).as_numpy_iterator()]


SPLIT_INPUTS = {
    "tokens": list(range(2, 102)),
    # Rank 2 (T5's test_split_tokens_rank2): 100 rows of 2, split by rows.
    "rows": [[i, 2 * i] for i in range(2, 102)],
    # Id 0 is data here, not padding: nothing is dropped.
    "padding_ids": [0] * 100,
}


@pytest.mark.parametrize("kind", sorted(SPLIT_INPUTS))
@pytest.mark.parametrize("length,num_segments", [(25, 4), (30, 4), (100, 1),
                                                 (1000, 1)])
def test_t5_split_tokens(kind, length, num_segments):
  original = np.asarray(SPLIT_INPUTS[kind])
  segments = _split(original, length)
  assert len(segments) == num_segments
  assert all(len(s) == length for s in segments[:-1])
  assert 0 < len(segments[-1]) <= length
  assert all(s.shape[1:] == original.shape[1:] for s in segments)
  np.testing.assert_array_equal(np.concatenate(segments), original)


def test_split_tokens_of_an_empty_stream_gives_nothing():
  assert _split(np.zeros([0, 2], np.int32), 4) == []
  assert _split(np.zeros([0], np.int32), 4) == []


def _chunks(example, max_length, seeds=range(12)):
  """select_random_chunk's output for each seed."""
  ds = tf.data.Dataset.from_tensors(example)
  out = []
  for seed in seeds:
    with seqio.map_seed_manager(seed):
      out.append(list(preprocessors.select_random_chunk(
          ds, max_length=max_length).as_numpy_iterator()))
  return out


@pytest.mark.parametrize("targets", [
    [0, 1, 2, 3],  # T5's test_select_random_chunk
    [[0, 9], [1, 8], [2, 7], [3, 6]],  # ... and its rank-2 twin
])
def test_t5_select_random_chunk(targets):
  # max_length = the number of rows: the chunk is the whole feature, for every
  # seed (before rows were counted, a [4, 2] input gave an empty chunk for
  # some seeds); other features are dropped.
  for out in _chunks({"targets": targets, "inputs": [4, 5, 6, 7]}, max_length=4):
    assert len(out) == 1 and list(out[0]) == ["targets"]
    np.testing.assert_array_equal(out[0]["targets"], targets)


def test_select_random_chunk_counts_rows_of_rank2_features():
  rows = np.arange(10).reshape(5, 2)
  starts = set()
  for out in _chunks({"targets": rows}, max_length=2):
    chunk = out[0]["targets"]
    assert chunk.shape in ((2, 2), (1, 2))
    start = int(chunk[0, 0]) // 2
    np.testing.assert_array_equal(chunk, rows[start:start + 2])
    starts.add(start)
  assert starts == {0, 2, 4}  # every chunk, each a multiple of max_length
  # A document with no rows is dropped.
  assert _chunks({"targets": np.zeros([0, 2], np.int32)}, 2, seeds=[0]) == [[]]


def test_byt5_span_corruption_on_the_teachers_bytes(pydoc_setup):
  """A task re-tokenised with ByT5's vocabulary: byte ids (ByT5Tokenizer's), 20-byte
  mean noise spans, sentinels from 258 down that never collide with UTF-8 text."""
  from miniend_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
  vocabulary = vocab_lib.byt5_vocabulary()
  name = tasks.retokenized("pydoc_span_corruption", vocabulary)
  assert name == "pydoc_span_corruption.byt5"
  assert tasks.retokenized("pydoc_span_corruption", vocabulary) == name  # idempotent
  assert tasks.retokenized(name, vocabulary) == name  # already bytes
  lengths = tasks.span_corruption_feature_lengths(
      512, mean_noise_span_length=preprocessors.BYT5_MEAN_NOISE_SPAN_LENGTH)
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=False)
  total = noise = spans = 0
  for example in ds.take(300).as_numpy_iterator():
    inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
    assert inputs[-1] == targets[-1] == vocabulary.eos_id
    assert max(inputs + targets) <= 258
    input_sentinels = [t for t in inputs if t >= 248]
    assert input_sentinels == [258 - i for i in range(len(input_sentinels))]
    original = undo_span_corruption(inputs, targets, vocabulary)
    # The text itself holds no sentinel-range byte (0xF5-0xFF never occur in UTF-8).
    assert max(original) < 248
    total += len(original)
    spans += len(input_sentinels)
    noise += len(targets) - 1 - len(input_sentinels)
  assert abs(noise / total - 0.15) <= 0.01
  assert abs(noise / spans - 20.0) <= 3.0
  # A text-to-text task keeps its text: targets decode to the summary's bytes.
  summary = seqio.get_mixture_or_task(tasks.retokenized("pydoc_summary", vocabulary))
  plain = seqio.get_mixture_or_task("pydoc_summary")
  ours = next(summary.get_dataset({"inputs": 1024, "targets": 256}, split="validation",
                                  shuffle=False).as_numpy_iterator())
  theirs = next(plain.get_dataset({"inputs": 1024, "targets": 256}, split="validation",
                                  shuffle=False).as_numpy_iterator())
  assert vocabulary.decode(ours["targets"].tolist()) == plain.output_features[
      "targets"].vocabulary.decode(theirs["targets"].tolist())
  assert all(0 < t < 259 for t in ours["inputs"].tolist())
