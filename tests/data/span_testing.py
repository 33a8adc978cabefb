"""Test helpers of span corruption: its inverse, to check that nothing is lost."""

from typing import Sequence

import numpy as np
import seqio

from miniend_jax.data import preprocessors


def undo_span_corruption(
    inputs: Sequence[int],
    targets: Sequence[int],
    vocabulary: seqio.Vocabulary,
) -> list[int]:
  """Puts the target spans back in place of the input sentinels (numpy).

  The inverse of span corruption, for checks and debugging.

  Args:
    inputs: corrupted input ids (a trailing EOS / padding is dropped).
    targets: target ids (a trailing EOS / padding is dropped).
    vocabulary: the vocabulary that assigned the sentinels.

  Returns:
    The original token ids.

  Raises:
    ValueError: if the sentinels of inputs and targets do not correspond.
  """
  first_sentinel = vocabulary.vocab_size - preprocessors.num_sentinels(vocabulary)

  def _strip(ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    while ids and ids[-1] in (0, vocabulary.eos_id):
      ids.pop()
    return ids

  spans: dict[int, list[int]] = {}
  current = None
  for token in _strip(targets):
    if token >= first_sentinel:
      current = token
      spans[current] = []
    elif current is None:
      raise ValueError("targets do not start with a sentinel")
    else:
      spans[current].append(token)
  merged = []
  for token in _strip(inputs):
    if token >= first_sentinel:
      if token not in spans:
        raise ValueError(f"sentinel {token} of the inputs is not in targets")
      merged.extend(spans.pop(token))
    else:
      merged.append(token)
  # The targets' sentinel for a final non-noise span has no noise after it.
  if any(spans.values()):
    raise ValueError(f"target spans not used by the inputs: {sorted(spans)}")
  return merged
