"""GLUE metrics and ROUGE: hand-computed values and the libraries directly."""

import math

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics
from rouge_score import rouge_scorer

from miniend_jax.data import metrics


def test_accuracy_by_hand():
  assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
  assert metrics.accuracy(["a", "b"], ["a", "b"]) == {"accuracy": 100.0}


def test_f1_with_invalid_by_hand():
  # The invalid -1 (target 1) counts as the wrong class 0: TP=1, FP=1, FN=2.
  # precision 1/2, recall 1/3 -> F1 = 2 * (1/6) / (5/6) = 0.4.
  result = metrics.f1_score_with_invalid([1, 1, 0, 0, 1], [1, 0, 0, 1, -1])
  assert result["f1"] == pytest.approx(40.0)


def test_matthews_by_hand():
  # TP=1, TN=2, FP=0, FN=1: (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3) = 2 / sqrt(12).
  result = metrics.matthews_corrcoef([1, 1, 0, 0], [1, 0, 0, 0])
  assert result["matthews_corrcoef"] == pytest.approx(100 * 2 / math.sqrt(12))


def test_pearson_and_spearman_by_hand():
  # x = [1, 2, 3], y = [1, 2, 4]: cov sum 3, |dx| = sqrt(2), |dy| = sqrt(42)/3.
  assert metrics.pearson_corrcoef([1, 2, 3], [1, 2, 4])[
      "pearson_corrcoef"] == pytest.approx(100 * 9 / math.sqrt(84))
  # Ranks [1,2,3,4] vs [1,3,2,4]: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
  assert metrics.spearman_corrcoef([1, 2, 3, 4], [1, 3, 2, 4])[
      "spearman_corrcoef"] == pytest.approx(80.0)


def test_metrics_equal_the_libraries():
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 2, 200)
  predictions = rng.randint(0, 2, 200)
  assert metrics.accuracy(labels, predictions)["accuracy"] == pytest.approx(
      100 * sklearn.metrics.accuracy_score(labels, predictions))
  assert metrics.f1_score_with_invalid(labels, predictions)["f1"] == (
      pytest.approx(100 * sklearn.metrics.f1_score(labels, predictions)))
  assert metrics.matthews_corrcoef(labels, predictions)[
      "matthews_corrcoef"] == pytest.approx(
          100 * sklearn.metrics.matthews_corrcoef(labels, predictions))
  x, y = rng.rand(50) * 5, rng.rand(50) * 5
  assert metrics.pearson_corrcoef(x, y)["pearson_corrcoef"] == pytest.approx(
      100 * scipy.stats.pearsonr(x, y)[0])
  assert metrics.spearman_corrcoef(x, y)["spearman_corrcoef"] == (
      pytest.approx(100 * scipy.stats.spearmanr(x, y)[0]))


def test_rouge_by_hand():
  # Unigrams: 2 of 3 shared; bigrams: "the cat" of 2; LCS "the cat" = 2.
  result = metrics.rouge(["the cat sat"], ["the cat ran"])
  assert result["rouge1"] == pytest.approx(100 * 2 / 3)
  assert result["rouge2"] == pytest.approx(50.0)
  assert result["rougeLsum"] == pytest.approx(100 * 2 / 3)


def test_rouge_equals_rouge_score():
  targets = [
      "The quick brown fox jumps over the lazy dog. It was not amused.",
      "Return a new event loop.\nIt is not running yet.",
      "Send the message to all handlers.",
  ]
  predictions = [
      "A quick fox jumped over a dog. The dog was amused.",
      "Create a new event loop. It runs forever.",
      "Send the message.",
  ]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"])
  expected = {k: 0.0 for k in ("rouge1", "rouge2", "rougeLsum")}
  for target, prediction in zip(targets, predictions):
    # rougeLsum reads one sentence per line.
    scores = scorer.score(
        target.replace(". ", ".\n"), prediction.replace(". ", ".\n"))
    for key in expected:
      expected[key] += 100 * scores[key].fmeasure / len(targets)
  result = metrics.rouge(targets, predictions)
  assert result == pytest.approx(expected)


def test_postprocessors():
  labels = ["entailment", "not_entailment"]
  assert metrics.string_label_to_class_id("not_entailment", labels) == 1
  assert metrics.string_label_to_class_id(b" entailment ", labels) == 0
  assert metrics.string_label_to_class_id("maybe", labels) == -1
  assert metrics.string_to_float("3.2") == pytest.approx(3.2)
  assert metrics.string_to_float("three") == -1.0
  assert metrics.strip_text(b" summary \n") == "summary"


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="zero examples"):
    metrics.rouge([], [])
