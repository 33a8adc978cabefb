"""Independent float64 numpy references for miniend_jax.distill.losses.

Written from the definitions with explicit loops over batch, heads and rows;
nothing here imports the code under test.
"""

import numpy as np


def to64(x):
  return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def kl64(p, q):
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  keep = p > 0
  return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def relation_kl(ta, tb, sa, sb, heads, qmask, kmask, causal=False, qseg=None,
                kseg=None, a=None):
  ta, tb, sa, sb = map(to64, (ta, tb, sa, sb))
  batch, len_a, tw = ta.shape
  len_b = tb.shape[1]
  sw = sa.shape[2]
  tdh, sdh = tw // heads, sw // heads
  total, rows = 0.0, 0
  for n in range(batch):
    for i in range(len_a):
      if not qmask[n][i]:
        continue
      keys = [j for j in range(len_b)
              if kmask[n][j] and (not causal or j <= i)
              and (qseg is None or qseg[n][i] == kseg[n][j])]
      if not keys:
        continue
      for h in range(heads):
        t_scores = [ta[n, i, h * tdh:(h + 1) * tdh] @ tb[n, j, h * tdh:(h + 1) * tdh]
                    / np.sqrt(tdh) for j in keys]
        s_scores = [sa[n, i, h * sdh:(h + 1) * sdh] @ sb[n, j, h * sdh:(h + 1) * sdh]
                    / np.sqrt(sdh) for j in keys]
        q = softmax64(s_scores)
        if a is None:
          p = softmax64(t_scores)
        else:  # interpolated: the scores are mixed before the softmax
          p = softmax64(a * np.asarray(t_scores) + (1 - a) * np.asarray(s_scores))
        total += kl64(p, q)
        rows += 1
  return total / rows if rows else 0.0


def attention_kl(tp, sp, qmask, kmask, causal=False, a=None):
  tp, sp = to64(tp), to64(sp)
  batch, heads, len_q, len_k = tp.shape
  total, rows = 0.0, 0
  for n in range(batch):
    for i in range(len_q):
      if not qmask[n][i]:
        continue
      keys = [j for j in range(len_k) if kmask[n][j] and (not causal or j <= i)]
      if not keys:
        continue
      for h in range(heads):
        p, q = tp[n, h, i, keys], sp[n, h, i, keys]
        if a is not None:  # log-probabilities as scores: a geometric mixture
          p = softmax64(a * np.log(p) + (1 - a) * np.log(q))
        total += kl64(p, q)
        rows += 1
  return total / rows if rows else 0.0


def logits_kl(tl, sl, weights, temperature, a=None):
  tl, sl = to64(tl), to64(sl)
  weights = to64(weights)
  num, den = 0.0, 0.0
  for n in range(tl.shape[0]):
    for i in range(tl.shape[1]):
      if weights[n, i] == 0:
        continue
      t = tl[n, i] if a is None else a * tl[n, i] + (1 - a) * sl[n, i]
      p = softmax64(t / temperature)
      q = softmax64(sl[n, i] / temperature)
      num += weights[n, i] * kl64(p, q)
      den += weights[n, i]
  return temperature ** 2 * num / den if den else 0.0


def span_corruption(logits, targets, weights, z_coef):
  logits = to64(logits)
  weights = to64(weights)
  ce, z, den = 0.0, 0.0, 0.0
  for n in range(logits.shape[0]):
    for i in range(logits.shape[1]):
      if weights[n, i] == 0:
        continue
      row = logits[n, i]
      log_z = row.max() + np.log(np.sum(np.exp(row - row.max())))
      ce += weights[n, i] * (log_z - row[targets[n][i]])
      z += weights[n, i] * z_coef * log_z ** 2
      den += weights[n, i]
  return (ce + z) / den, ce / den, z / den


def hidden_mse(th, sh, proj, weights):
  th, sh = to64(th), to64(sh)
  weights = to64(weights)
  num, den = 0.0, 0.0
  for n in range(th.shape[0]):
    for i in range(th.shape[1]):
      if weights[n, i] == 0:
        continue
      s = sh[n, i] if proj is None else sh[n, i] @ to64(proj)
      num += weights[n, i] * np.mean((s - th[n, i]) ** 2)
      den += weights[n, i]
  return num / den if den else 0.0
