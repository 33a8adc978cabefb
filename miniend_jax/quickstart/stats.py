"""Seeds to numbers: mean, standard deviation, and when a path beats the baseline.

The rule (the same in `miniend quickstart` and `miniend sweep`): over the
seeds, a metric's spread is its sample standard deviation (numpy's
`std(ddof=1)`). A path is *better* than the baseline (scratch) on a metric
when its mean is on the better side of the baseline's mean by more than the
sum of the two standard deviations, i.e. when the intervals mean +- std do not
overlap; *worse* in the mirror case; *tie* otherwise. With fewer than two
finite values on either side there is no spread, and nothing is marked
("n/a"). Which side is better is the metric's `direction`: losses lower,
scores (accuracy, ROUGE, F1, ...) higher; other metrics are not compared.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

BETTER, WORSE, TIE, NOT_AVAILABLE = "better", "worse", "tie", "n/a"
MARKS = {BETTER: "▲", WORSE: "▼"}  # shown after a table cell
_HIGHER = ("accuracy", "rouge", "f1", "bleu", "corrcoef", "exact_match")


@dataclasses.dataclass(frozen=True)
class Spread:
  """Mean and sample standard deviation of a metric over `n` seeds (NaN when undefined)."""

  mean: float
  std: float
  n: int


def _finite(values: Iterable[Any]) -> list[float]:
  out = []
  for v in values:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out.append(float(v))
  return out


def spread(values: Iterable[Any]) -> Spread:
  """Mean and standard deviation (ddof=1) of the finite numbers in `values`."""
  xs = _finite(values)
  n = len(xs)
  if not n:
    return Spread(math.nan, math.nan, 0)
  mean = math.fsum(xs) / n
  std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
  return Spread(mean, std, n)


def direction(metric: str) -> bool | None:
  """True when higher is better, False when lower is, None when the metric is not a score."""
  name = metric.lower()
  if "loss" in name or "perplexity" in name:
    return False
  if any(word in name for word in _HIGHER):
    return True
  return None


def compare(candidate: Spread, baseline: Spread, higher_is_better: bool) -> str:
  """BETTER / WORSE when the means differ by more than the two standard deviations
  together, TIE when they do not, NOT_AVAILABLE without two seeds on both sides."""
  if candidate.n < 2 or baseline.n < 2:
    return NOT_AVAILABLE
  gain = candidate.mean - baseline.mean
  if not higher_is_better:
    gain = -gain
  margin = candidate.std + baseline.std
  if gain > margin:
    return BETTER
  if -gain > margin:
    return WORSE
  return TIE


def aggregate(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str],
              metrics: Sequence[str], *, baseline: Mapping[str, Any] | None = None,
              match: Sequence[str] = ()) -> list[dict]:
  """One row per group of `rows` (equal values of `group_by`, in first-seen order).

  Each output row has the `group_by` values, `seeds` (rows in the group), and
  per metric m: `m` (mean), `m/std`, `m/n` (finite values) and, when
  `baseline` is given and m has a direction, `m/vs_baseline`: the `compare`
  verdict against the group whose `group_by` values include `baseline`
  ({key: value}) and whose `match` keys equal this group's (e.g. the other
  sweep bindings). The baseline's own row gets no verdict.
  """
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
  spreads = {key: {m: spread(r.get(m) for r in members) for m in metrics}
             for key, members in groups.items()}

  def baseline_of(key: tuple) -> tuple | None:
    if not baseline:
      return None
    values = dict(zip(group_by, key))
    for other in groups:
      candidate = dict(zip(group_by, other))
      if (all(candidate.get(k) == v for k, v in baseline.items())
          and all(candidate.get(k) == values.get(k) for k in match)):
        return other
    return None

  out = []
  for key, members in groups.items():
    row: dict[str, Any] = dict(zip(group_by, key))
    row["seeds"] = len(members)
    base = baseline_of(key)
    for m in metrics:
      sp = spreads[key][m]
      row[m], row[f"{m}/std"], row[f"{m}/n"] = sp.mean, sp.std, sp.n
      higher = direction(m)
      if base is not None and base != key and higher is not None:
        row[f"{m}/vs_baseline"] = compare(sp, spreads[base][m], higher)
    out.append(row)
  return out


def format_spread(mean: float, std: float, spec: str = ".2f", verdict: str | None = None) -> str:
  """'5.21 ± 0.03 ▲' (`spec` formats both numbers; no '±' part without a std; '-' for a
  missing mean)."""
  if not isinstance(mean, (int, float)) or not math.isfinite(mean):
    return "-"
  text = format(mean, spec)
  if isinstance(std, (int, float)) and math.isfinite(std):
    text += f" ± {format(std, spec)}"
  mark = MARKS.get(verdict or "")
  return f"{text} {mark}" if mark else text
