"""Postprocessors and metrics for seqio tasks (GLUE, summarization).

Metric functions have seqio's signature `fn(targets, predictions) -> dict`
over equally long lists of postprocessed values and, like T5, report
percentages (x100). The computations are delegated to scikit-learn, scipy
and rouge-score; only the T5 conventions around them live here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics
from rouge_score import rouge_scorer

DEFAULT_ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


# ----------------------------------------------------------------------------
# Postprocessors: decoded model output (or target string) -> metric input.
# seqio calls them as fn(text, example=..., is_target=...).
# ----------------------------------------------------------------------------


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def string_label_to_class_id(
    string_label: Any,
    label_classes: Sequence[str],
    default: int = -1,
    **unused_kwargs,
) -> int:
  """Index of `string_label` in `label_classes`, else `default` (invalid)."""
  text = _as_text(string_label).strip()
  return label_classes.index(text) if text in label_classes else default


def string_to_float(
    string: Any, default: float = -1.0, **unused_kwargs
) -> float:
  """Parses a float; an unparsable prediction becomes `default`."""
  try:
    return float(_as_text(string).strip())
  except ValueError:
    return default


def strip_text(text: Any, **unused_kwargs) -> str:
  """Decoded text with surrounding whitespace removed (summaries)."""
  return _as_text(text).strip()


# ----------------------------------------------------------------------------
# Classification / regression metrics
# ----------------------------------------------------------------------------


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(
        f"Got {len(targets)} targets but {len(predictions)} predictions; "
        "metrics need one prediction per target."
    )
  if not len(targets):
    raise ValueError("Cannot compute a metric over zero examples.")


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
  """{"accuracy": 100 * fraction of exact matches}."""
  _check_lengths(targets, predictions)
  return {
      "accuracy": 100.0
      * sklearn.metrics.accuracy_score(
          np.asarray(targets), np.asarray(predictions)
      )
  }


def f1_score_with_invalid(
    targets: Sequence[int], predictions: Sequence[int]
) -> dict:
  """Binary F1 (positive class 1) where invalid predictions count as wrong.

  A prediction that is neither 0 nor 1 (e.g. -1 from an unparsable label) is
  replaced by the opposite of its target, as T5 does.
  """
  _check_lengths(targets, predictions)
  targets = np.asarray(targets)
  predictions = np.asarray(predictions).copy()
  invalid = np.logical_and(predictions != 0, predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {"f1": 100.0 * sklearn.metrics.f1_score(targets, predictions)}


def matthews_corrcoef(
    targets: Sequence[int], predictions: Sequence[int]
) -> dict:
  """{"matthews_corrcoef": 100 * Matthews correlation} (CoLA, AX)."""
  _check_lengths(targets, predictions)
  return {
      "matthews_corrcoef": 100.0
      * sklearn.metrics.matthews_corrcoef(targets, predictions)
  }


def pearson_corrcoef(
    targets: Sequence[float], predictions: Sequence[float]
) -> dict:
  """{"pearson_corrcoef": 100 * Pearson r} (STS-B)."""
  _check_lengths(targets, predictions)
  return {
      "pearson_corrcoef": 100.0
      * float(scipy.stats.pearsonr(targets, predictions)[0])
  }


def spearman_corrcoef(
    targets: Sequence[float], predictions: Sequence[float]
) -> dict:
  """{"spearman_corrcoef": 100 * Spearman rho} (STS-B)."""
  _check_lengths(targets, predictions)
  return {
      "spearman_corrcoef": 100.0
      * float(scipy.stats.spearmanr(targets, predictions)[0])
  }


# GLUE's official metrics per TFDS config (as in t5.data.glue_utils). AX only
# has an unlabelled test split in TFDS; its GLUE metric is Matthews corr.
GLUE_METRICS: Mapping[str, tuple] = {
    "cola": (matthews_corrcoef,),
    "sst2": (accuracy,),
    "mrpc": (f1_score_with_invalid, accuracy),
    "qqp": (f1_score_with_invalid, accuracy),
    "stsb": (pearson_corrcoef, spearman_corrcoef),
    "mnli": (accuracy,),
    "mnli_mismatched": (accuracy,),
    "mnli_matched": (accuracy,),
    "qnli": (accuracy,),
    "rte": (accuracy,),
    "wnli": (accuracy,),
    "ax": (matthews_corrcoef,),
}


# ----------------------------------------------------------------------------
# ROUGE
# ----------------------------------------------------------------------------

# Sentence end: ., ! or ? followed by whitespace. rougeLsum needs one sentence
# per line and generated summaries have none, so split them here (T5 does the
# same for " . "); texts that already have newlines are left alone.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_on_lines(text: str) -> str:
  """Puts one sentence per line, as rougeLsum expects."""
  if "\n" in text:
    return text
  return _SENTENCE_END.sub("\n", text.strip())


def rouge(
    targets: Sequence[str],
    predictions: Sequence[str],
    score_keys: Sequence[str] = DEFAULT_ROUGE_KEYS,
    use_stemmer: bool = False,
) -> dict:
  """Mean ROUGE F-measures (x100) over examples, computed by rouge-score.

  Args:
    targets: reference summaries.
    predictions: generated summaries.
    score_keys: rouge-score types ("rouge1", "rouge2", "rougeL", "rougeLsum").
    use_stemmer: Porter-stem tokens (T5's default: no).

  Returns:
    {key: 100 * mean over examples of that key's F-measure}.
  """
  _check_lengths(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(score_keys), use_stemmer=use_stemmer)
  totals = {key: 0.0 for key in score_keys}
  for target, prediction in zip(targets, predictions):
    scores = scorer.score(
        target=sentences_on_lines(_as_text(target)),
        prediction=sentences_on_lines(_as_text(prediction)),
    )
    for key in score_keys:
      totals[key] += scores[key].fmeasure
  return {key: 100.0 * total / len(targets) for key, total in totals.items()}
