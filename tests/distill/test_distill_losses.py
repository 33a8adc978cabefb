"""miniend_jax.distill.losses against float64 numpy references, and properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_reference as ref
from miniend_jax.distill import losses

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

RTOL = 2e-5
ATOL = 1e-6


def _rand(rng, shape, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype=dtype)


def _mask(lengths, length):
  return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


# ---------------------------------------------------------------------------
# relation_kl
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,heads,tw,sw,causal",
    [
        (jnp.float32, 2, 8, 8, False),
        (jnp.float32, 4, 16, 8, False),  # different widths (head sizes)
        (jnp.float32, 3, 12, 6, True),  # causal decoder rows
        (jnp.bfloat16, 2, 12, 8, True),  # bf16 teacher and student
    ])
def test_relation_kl_self_matches_reference(dtype, heads, tw, sw, causal):
  rng = np.random.default_rng(0)
  batch, length = 3, 7
  t = _rand(rng, (batch, length, tw), dtype, 2.0)
  s = _rand(rng, (batch, length, sw), dtype, 2.0)
  mask = _mask([7, 4, 1], length)
  got = losses.relation_kl(t, t, s, s, num_relation_heads=heads,
                           query_mask=mask, key_mask=mask, causal=causal)
  assert got.dtype == jnp.float32
  want = ref.relation_kl(t, t, s, s, heads, mask, mask, causal=causal)
  assert want > 1e-3  # a non-trivial comparison
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relation_kl_cross_attention_different_lengths(dtype):
  """Q-K relation: decoder queries over encoder keys, len_a != len_b."""
  rng = np.random.default_rng(1)
  batch, len_q, len_k, tw, sw, heads = 2, 5, 9, 16, 8, 4
  tq, tk = _rand(rng, (batch, len_q, tw), dtype), _rand(rng, (batch, len_k, tw), dtype)
  sq, sk = _rand(rng, (batch, len_q, sw), dtype), _rand(rng, (batch, len_k, sw), dtype)
  qmask, kmask = _mask([5, 3], len_q), _mask([6, 9], len_k)
  got = losses.relation_kl(tq, tk, sq, sk, num_relation_heads=heads,
                           query_mask=qmask, key_mask=kmask)
  want = ref.relation_kl(tq, tk, sq, sk, heads, qmask, kmask)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_relation_kl_segments_and_empty_rows():
  rng = np.random.default_rng(2)
  batch, length, w, heads = 2, 6, 8, 2
  t, s = _rand(rng, (batch, length, w)), _rand(rng, (batch, length, w))
  mask = _mask([6, 5], length)
  seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 2, 2, 2, 0]])
  got = losses.relation_kl(t, t, s, s, num_relation_heads=heads, query_mask=mask,
                           key_mask=mask, query_segment_ids=seg,
                           key_segment_ids=seg, causal=True)
  want = ref.relation_kl(t, t, s, s, heads, mask, mask, causal=True, qseg=seg,
                         kseg=seg)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Cross rows with no valid key do not count (second example has no keys).
  kmask = np.array([[1, 1, 0, 0, 0, 0], [0] * 6], bool)
  got = losses.relation_kl(t, t, s, s, num_relation_heads=heads, query_mask=mask,
                           key_mask=kmask)
  want = ref.relation_kl(t, t, s, s, heads, mask, kmask)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  # Nothing valid at all: zero, not NaN.
  none = np.zeros((batch, length), bool)
  assert losses.relation_kl(t, t, s, s, num_relation_heads=heads, query_mask=none,
                            key_mask=none) == 0.0


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_relation_kl_interpolation(a):
  rng = np.random.default_rng(3)
  t, s = _rand(rng, (2, 5, 8)), _rand(rng, (2, 5, 4))
  mask = _mask([5, 3], 5)
  kw = dict(num_relation_heads=2, query_mask=mask, key_mask=mask, causal=True)
  got = losses.relation_kl(t, t, s, s, interpolation=jnp.float32(a), **kw)
  want = ref.relation_kl(t, t, s, s, 2, mask, mask, causal=True, a=a)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  if a == 1.0:
    np.testing.assert_array_equal(got, losses.relation_kl(t, t, s, s, **kw))
  if a == 0.0:  # the target is the student: zero up to float32 rounding
    np.testing.assert_allclose(got, 0.0, atol=1e-7)


def _cosine(x, y):
  x, y = (np.ravel(np.asarray(v, np.float64)) for v in (x, y))
  return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize("a", [0.1, 0.3, 0.6])
def test_interpolation_changes_the_gradient_direction(a):
  """Mixing the teacher's and the student's probabilities after the softmax made
  the student's gradient exactly a * the plain one (cosine 1.000000), a step size
  Adam divides out. Mixed before the softmax it points elsewhere, for logits
  (whole and chunked) and relations alike; at a = 1 it is the plain gradient."""
  rng = np.random.default_rng(14)
  mask = _mask([6, 4], 6)
  tl, sl = _rand(rng, (2, 6, 11), scale=3.0), _rand(rng, (2, 6, 11), scale=3.0)
  t, s = _rand(rng, (2, 6, 8), scale=2.0), _rand(rng, (2, 6, 4), scale=2.0)

  def logits_grad(chunk):
    return lambda alpha: jax.grad(lambda x: losses.logits_kl(
        tl, x, mask, 2.0, chunk_size=chunk, interpolation=alpha))(sl)

  def relation_grad(alpha):
    return jax.grad(lambda x: losses.relation_kl(
        t, t, x, x, num_relation_heads=2, query_mask=mask, key_mask=mask, causal=True,
        interpolation=alpha))(s)

  for grad in (logits_grad(None), logits_grad(4), relation_grad):
    plain = grad(None)
    assert _cosine(grad(a), plain) < 0.995, _cosine(grad(a), plain)
    np.testing.assert_array_equal(grad(1.0), plain)


def test_relation_kl_properties():
  rng = np.random.default_rng(4)
  batch, length, heads = 2, 6, 2
  t, s = _rand(rng, (batch, length, 8)), _rand(rng, (batch, length, 4))
  lengths = [6, 3]
  mask = _mask(lengths, length)
  kw = dict(num_relation_heads=heads, causal=True)
  base = losses.relation_kl(t, t, s, s, query_mask=mask, key_mask=mask, **kw)
  # Copy of the teacher: zero.
  np.testing.assert_allclose(
      losses.relation_kl(t, t, t, t, query_mask=mask, key_mask=mask, **kw), 0.0,
      atol=1e-6)
  # Garbage in padded positions changes nothing.
  pad = ~mask[..., None]
  t2 = jnp.where(pad, 1e3 * _rand(rng, t.shape), t)
  s2 = jnp.where(pad, -1e3 * _rand(rng, s.shape), s)
  np.testing.assert_allclose(
      losses.relation_kl(t2, t2, s2, s2, query_mask=mask, key_mask=mask, **kw),
      base, rtol=1e-6)
  # Extra padding changes nothing.
  extra = lambda x: jnp.pad(x, [(0, 0), (0, 4), (0, 0)], constant_values=7.0)
  mask_x = _mask(lengths, length + 4)
  np.testing.assert_allclose(
      losses.relation_kl(extra(t), extra(t), extra(s), extra(s), query_mask=mask_x,
                         key_mask=mask_x, **kw), base, rtol=1e-6)
  # No gradient into the teacher; some into the student.
  g = jax.grad(lambda ta, tb, sa, sb: losses.relation_kl(
      ta, tb, sa, sb, query_mask=mask, key_mask=mask, **kw), argnums=(0, 1, 2, 3))(
          t, t, s, s)
  assert not np.any(g[0]) and not np.any(g[1])
  assert np.any(g[2]) and np.all(np.isfinite(g[2]))
  # ...and none into padded student positions.
  assert not np.any(np.asarray(g[2])[~mask])


def test_relation_kl_errors():
  x8, x6 = jnp.zeros((1, 3, 8)), jnp.zeros((1, 3, 6))
  m = np.ones((1, 3), bool)
  with pytest.raises(ValueError, match="does not divide the student width 6"):
    losses.relation_kl(x8, x8, x6, x6, num_relation_heads=4, query_mask=m,
                       key_mask=m)
  with pytest.raises(ValueError, match="student_a has shape"):
    losses.relation_kl(x8, x8, jnp.zeros((1, 4, 8)), x8, num_relation_heads=2,
                       query_mask=m, key_mask=m)
  with pytest.raises(ValueError, match="causal=True"):
    losses.relation_kl(x8, jnp.zeros((1, 4, 8)), x8, jnp.zeros((1, 4, 8)),
                       num_relation_heads=2, query_mask=m,
                       key_mask=np.ones((1, 4), bool), causal=True)


# ---------------------------------------------------------------------------
# attention_kl
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,causal,a", [(jnp.float32, False, None),
                                            (jnp.bfloat16, True, None),
                                            (jnp.float32, True, 0.4)])
def test_attention_kl_matches_reference(dtype, causal, a):
  rng = np.random.default_rng(5)
  batch, heads, len_q, len_k = 2, 3, 4, 6 if not causal else 4
  tp = jax.nn.softmax(_rand(rng, (batch, heads, len_q, len_k), scale=2.0)).astype(dtype)
  sp = jax.nn.softmax(_rand(rng, (batch, heads, len_q, len_k), scale=2.0)).astype(dtype)
  qmask, kmask = _mask([4, 2], len_q), _mask([len_k, 3], len_k)
  got = losses.attention_kl(tp, sp, query_mask=qmask, key_mask=kmask,
                            causal=causal, interpolation=a)
  want = ref.attention_kl(tp, sp, qmask, kmask, causal=causal, a=a)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      losses.attention_kl(tp, tp, query_mask=qmask, key_mask=kmask), 0.0, atol=1e-7)
  g = jax.grad(lambda t: losses.attention_kl(t, sp, query_mask=qmask, key_mask=kmask))(
      tp.astype(jnp.float32))
  assert not np.any(g)
  # Probability mass on masked keys and content of masked rows are ignored.
  pad = ~(qmask[:, None, :, None] & kmask[:, None, None, :])
  junk = lambda p: jnp.where(pad, 0.9, p)
  np.testing.assert_allclose(
      losses.attention_kl(junk(tp), junk(sp), query_mask=qmask, key_mask=kmask,
                          causal=causal, interpolation=a), got, rtol=1e-6)
  with pytest.raises(ValueError, match="same head count"):
    losses.attention_kl(tp, sp[:, :2], query_mask=qmask, key_mask=kmask)


# ---------------------------------------------------------------------------
# logits_kl
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,temperature,chunk", [
    (jnp.float32, 1.0, None),
    (jnp.float32, 2.0, 3),  # 7 positions in chunks of 3: a shorter last chunk
    (jnp.bfloat16, 1.5, 2),
])
def test_logits_kl_matches_reference(dtype, temperature, chunk):
  rng = np.random.default_rng(6)
  batch, length, vocab = 2, 7, 11
  tl = _rand(rng, (batch, length, vocab), dtype, 3.0)
  sl = _rand(rng, (batch, length, vocab), dtype, 3.0)
  weights = _mask([7, 4], length).astype(np.float32)
  weights[0, 2] = 0.5  # float loss weights are honoured
  got = losses.logits_kl(tl, sl, weights, temperature, chunk_size=chunk)
  want = ref.logits_kl(tl, sl, weights, temperature)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  for a in (0.0, 0.25, 1.0):
    got_a = losses.logits_kl(tl, sl, weights, temperature, chunk_size=chunk,
                             interpolation=a)
    np.testing.assert_allclose(got_a, ref.logits_kl(tl, sl, weights, temperature, a=a),
                               rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      losses.logits_kl(tl, sl, weights, temperature, interpolation=0.0, chunk_size=chunk),
      0.0, atol=1e-7)
  np.testing.assert_allclose(
      losses.logits_kl(tl, tl, weights, temperature, chunk_size=chunk), 0.0, atol=1e-6)


def _naive_logits_kl(t, s, w, temperature, a=None):
  """Plain-autodiff jnp formula, the gradient reference for the custom VJP: the
  target reads the student's logits only through a stop-gradient."""
  t = jax.lax.stop_gradient(t)
  if a is not None:
    t = a * t + (1 - a) * jax.lax.stop_gradient(s)
  p = jax.nn.softmax(t / temperature)
  sl = jax.nn.log_softmax(s / temperature)
  kl = jnp.sum(p * (jnp.log(p) - sl), -1)
  return temperature ** 2 * jnp.sum(kl * w) / jnp.sum(w)


def _naive_ce(x, y, w, z):
  lse = jax.nn.logsumexp(x, -1)
  per = lse - jnp.take_along_axis(x, y[..., None], -1)[..., 0] + z * lse ** 2
  return jnp.sum(per * w) / jnp.sum(w)


@pytest.mark.parametrize("chunk,a", [(None, None), (4, None), (4, 0.3), (20, 0.7)])
def test_logits_kl_gradient_and_properties(chunk, a):
  rng = np.random.default_rng(7)
  batch, length, vocab = 2, 9, 13
  tl, sl = _rand(rng, (batch, length, vocab)), _rand(rng, (batch, length, vocab))
  mask = _mask([9, 5], length)
  weights = mask.astype(np.float32)
  weights[0, 1] = 0.25
  grad = jax.jit(jax.grad(
      lambda t, s: losses.logits_kl(t, s, weights, 2.0, chunk_size=chunk,
                                    interpolation=a), argnums=(0, 1)))
  gt, gs = grad(tl, sl)
  want = jax.grad(_naive_logits_kl, argnums=1)(tl, sl, weights, 2.0, a)
  assert not np.any(gt)
  np.testing.assert_allclose(gs, want, rtol=1e-5, atol=1e-7)
  assert not np.any(np.asarray(gs)[~mask]) and np.any(gs)
  # bf16 logits get a bf16 gradient.
  gs16 = jax.grad(lambda s: losses.logits_kl(tl, s, weights, 2.0, chunk_size=chunk))(
      sl.astype(jnp.bfloat16))
  assert gs16.dtype == jnp.bfloat16
  base = losses.logits_kl(tl, sl, mask, 2.0, chunk_size=chunk)
  pad = ~mask[..., None]
  np.testing.assert_allclose(
      losses.logits_kl(jnp.where(pad, 1e4, tl), jnp.where(pad, -1e4, sl), mask, 2.0,
                       chunk_size=chunk), base, rtol=1e-6)
  extra = lambda x: jnp.pad(x, [(0, 0), (0, 3), (0, 0)])
  np.testing.assert_allclose(
      losses.logits_kl(extra(tl), extra(sl), _mask([9, 5], length + 3), 2.0,
                       chunk_size=chunk), base, rtol=1e-6)


@pytest.mark.parametrize("chunk,z", [(None, 0.0), (4, 1e-2), (5, 0.0)])
def test_span_corruption_gradient(chunk, z):
  rng = np.random.default_rng(8)
  x = _rand(rng, (2, 9, 13), scale=3.0)
  y = jnp.asarray(rng.integers(0, 13, size=(2, 9)))
  w = _mask([9, 4], 9).astype(np.float32)
  f = lambda x: losses.span_corruption_loss(x, y, w, z_loss=z, chunk_size=chunk)
  # Every output is differentiable: the total and each of its parts.
  for i in range(3):
    got = jax.jit(jax.grad(lambda x: f(x)[i]))(x)
    if i == 2 and z == 0.0:
      assert not np.any(got)
      continue
    want = jax.grad(lambda x: [_naive_ce(x, y, w, z), _naive_ce(x, y, w, 0.0),
                               _naive_ce(x, y, w, z) - _naive_ce(x, y, w, 0.0)][i])(x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_vocabulary_losses_are_memory_aware():
  """XLA's own accounting: chunked temporaries stay below one [b, L, V] f32."""
  batch, length, vocab = 2, 256, 4096
  logits = jax.ShapeDtypeStruct((batch, length, vocab), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)
  one_copy = batch * length * vocab * 4

  def temp_bytes(chunk):
    f = jax.jit(jax.value_and_grad(
        lambda t, s, m: losses.logits_kl(t, s, m, 2.0, chunk_size=chunk), argnums=1))
    return f.lower(logits, logits, mask).compile().memory_analysis().temp_size_in_bytes

  unchunked, chunked = temp_bytes(None), temp_bytes(16)
  assert unchunked >= 2 * one_copy  # what chunking avoids
  assert chunked <= 0.4 * one_copy


def _hidden_and_kernel(rng, batch, length, width, vocab, dtype=jnp.float32):
  hidden = _rand(rng, (batch, length, width), dtype)
  kernel = _rand(rng, (width, vocab), dtype, width ** -0.5 * 3.0)
  return hidden, kernel


def _formed(hidden, kernel):
  """The logits a ProjectedLogits stands for, formed whole in float32."""
  return jnp.einsum("bld,dv->blv", hidden.astype(jnp.float32), kernel.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("chunk,a,temperature", [(None, None, 1.0), (4, None, 2.0),
                                                 (4, 0.3, 1.0), (20, 0.7, 1.5)])
def test_projected_logits_kl_values_and_gradients(chunk, a, temperature):
  """hidden @ kernel formed chunk by chunk: the value against float64 numpy, and the
  gradients of the student's hidden states and kernel against plain autodiff."""
  rng = np.random.default_rng(11)
  batch, length, width, vocab = 2, 9, 6, 13
  th, tk = _hidden_and_kernel(rng, batch, length, 8, vocab)  # another teacher width
  sh, sk = _hidden_and_kernel(rng, batch, length, width, vocab)
  mask = _mask([9, 5], length)
  weights = mask.astype(np.float32)
  weights[0, 1] = 0.25
  loss = lambda sh, sk: losses.logits_kl(losses.ProjectedLogits(th, tk),
                                         losses.ProjectedLogits(sh, sk), weights,
                                         temperature, chunk_size=chunk, interpolation=a)
  want = ref.logits_kl(_formed(th, tk), _formed(sh, sk), weights, temperature,
                       **({} if a is None else {"a": a}))
  np.testing.assert_allclose(loss(sh, sk), want, rtol=RTOL, atol=ATOL)
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(sh, sk)
  naive = jax.grad(lambda sh, sk: _naive_logits_kl(_formed(th, tk), _formed(sh, sk), weights,
                                                   temperature, a), argnums=(0, 1))(sh, sk)
  for g, w in zip(got, naive):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)
  assert not np.any(np.asarray(got[0])[~mask]) and np.any(got[0])
  # The teacher's side gets no gradient even if a caller forgets to freeze it.
  teacher_grads = jax.grad(lambda th, tk: losses.logits_kl(
      losses.ProjectedLogits(th, tk), losses.ProjectedLogits(sh, sk), weights,
      chunk_size=chunk), argnums=(0, 1))(th, tk)
  assert not any(np.any(g) for g in teacher_grads)
  # Mixed operands: formed teacher logits with a projected student.
  np.testing.assert_allclose(
      losses.logits_kl(_formed(th, tk), losses.ProjectedLogits(sh, sk), weights, temperature,
                       chunk_size=chunk, interpolation=a), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("chunk,z", [(None, 0.0), (4, 1e-2), (5, 1e-4)])
def test_projected_span_corruption_values_and_gradients(chunk, z):
  rng = np.random.default_rng(12)
  hidden, kernel = _hidden_and_kernel(rng, 3, 9, 6, 17)
  targets = jnp.asarray(rng.integers(1, 17, size=(3, 9)))
  weights = _mask([9, 4, 7], 9).astype(np.float32)
  f = lambda h, k: losses.span_corruption_loss(losses.ProjectedLogits(h, k), targets,
                                               weights, z_loss=z, chunk_size=chunk)
  np.testing.assert_allclose(f(hidden, kernel),
                             ref.span_corruption(_formed(hidden, kernel), targets, weights, z),
                             rtol=RTOL, atol=ATOL)
  got = jax.jit(jax.grad(lambda h, k: f(h, k).total, argnums=(0, 1)))(hidden, kernel)
  want = jax.grad(lambda h, k: _naive_ce(_formed(h, k), targets, weights, z),
                  argnums=(0, 1))(hidden, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


def test_projected_logits_bf16_follow_the_model_head():
  """bf16 hidden states and kernel: the gradients come back in bf16, within bf16
  rounding of autodiff through the model's own head (float32 logits)."""
  from miniend_jax.model.t5 import matmul
  rng = np.random.default_rng(13)
  hidden, kernel = _hidden_and_kernel(rng, 2, 12, 16, 64, jnp.bfloat16)
  targets = jnp.asarray(rng.integers(1, 64, size=(2, 12)))
  weights = _mask([12, 7], 12).astype(np.float32)
  fused = jax.grad(lambda h, k: losses.span_corruption_loss(
      losses.ProjectedLogits(h, k), targets, weights, chunk_size=5).total,
      argnums=(0, 1))(hidden, kernel)
  formed = jax.grad(lambda h, k: losses.span_corruption_loss(
      matmul(h, k, 1, jnp.float32), targets, weights, chunk_size=None).total,
      argnums=(0, 1))(hidden, kernel)
  for g, w in zip(fused, formed):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=2e-2, atol=2e-2 * float(np.abs(np.asarray(w, np.float32)).max()))


def test_projected_logits_never_form_the_vocabulary_array():
  """XLA's accounting for the training-time use (KL and cross-entropy, gradients of
  the student's hidden states and head). Forming the logits first costs ~5 float32
  [batch, length, vocab] arrays; from ProjectedLogits the temporaries are a few
  kernel-sized float32 gradients plus a few chunks of logits, whatever the length."""
  batch, width, chunk = 2, 64, 16

  def temp_bytes(projected, length, vocab):
    hidden = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
    kernel = jax.ShapeDtypeStruct((width, vocab), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.float32)
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def loss(sh, sk, th, tk, m, y):
      if projected:
        student, teacher = losses.ProjectedLogits(sh, sk), losses.ProjectedLogits(th, tk)
      else:
        student, teacher = sh @ sk, th @ tk
      return (losses.logits_kl(teacher, student, m, chunk_size=chunk)
              + losses.span_corruption_loss(student, y, m, chunk_size=chunk).total)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = f.lower(hidden, kernel, hidden, kernel, mask, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  for vocab in (4096, 32768):
    one_copy = batch * 256 * vocab * 4
    assert temp_bytes(False, 256, vocab) >= 4 * one_copy
    kernel_f32, chunk_f32 = width * vocab * 4, batch * chunk * vocab * 4
    short, long = temp_bytes(True, 256, vocab), temp_bytes(True, 1024, vocab)
    assert short <= 4 * kernel_f32 + 4 * chunk_f32, (short, kernel_f32, chunk_f32)
    # 4x the length adds hidden-sized arrays only, never vocabulary-sized ones.
    assert long - short <= 4 * batch * (1024 - 256) * width * 4, (long, short)


def test_projected_logits_shape_errors():
  with pytest.raises(ValueError, match="do not contract"):
    losses.span_corruption_loss(losses.ProjectedLogits(jnp.zeros((1, 2, 4)), jnp.zeros((5, 9))),
                                np.ones((1, 2), np.int32), np.ones((1, 2)))
  with pytest.raises(ValueError, match="vocabulary"):
    losses.logits_kl(losses.ProjectedLogits(jnp.zeros((1, 2, 4)), jnp.zeros((4, 9))),
                     jnp.zeros((1, 2, 10)), np.ones((1, 2)))


def test_logits_kl_vocab_mismatch():
  with pytest.raises(ValueError, match="vocabulary"):
    losses.logits_kl(jnp.zeros((1, 2, 10)), jnp.zeros((1, 2, 12)), np.ones((1, 2)))


# ---------------------------------------------------------------------------
# span_corruption_loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,z,chunk", [(jnp.float32, 0.0, None),
                                           (jnp.float32, 1e-2, 4),
                                           (jnp.bfloat16, 1e-4, 3)])
def test_span_corruption_matches_reference(dtype, z, chunk):
  rng = np.random.default_rng(8)
  batch, length, vocab = 3, 6, 17
  logits = _rand(rng, (batch, length, vocab), dtype, 3.0)
  targets = rng.integers(1, vocab, size=(batch, length))
  weights = _mask([6, 2, 5], length).astype(np.float32)
  out = losses.span_corruption_loss(logits, targets, weights, z_loss=z,
                                    chunk_size=chunk)
  want = ref.span_corruption(logits, targets, weights, z)
  np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
  assert all(v.dtype == jnp.float32 for v in out)
  if z == 0.0:
    assert out.z_loss == 0.0
  # Padding content and extra padding are irrelevant.
  garbage = jnp.where(~(weights > 0)[..., None], 50.0, logits)
  np.testing.assert_allclose(
      losses.span_corruption_loss(garbage, targets, weights, z_loss=z,
                                  chunk_size=chunk).total, out.total, rtol=1e-6)
  g = jax.grad(lambda x: losses.span_corruption_loss(x, targets, weights, z_loss=z,
                                                     chunk_size=chunk).total)(
                                                         logits.astype(jnp.float32))
  assert not np.any(np.asarray(g)[weights == 0]) and np.any(g)


# ---------------------------------------------------------------------------
# hidden_mse
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hidden_mse_matches_reference(dtype):
  rng = np.random.default_rng(9)
  batch, length, tw, sw = 2, 5, 12, 8
  th, sh = _rand(rng, (batch, length, tw), dtype), _rand(rng, (batch, length, sw), dtype)
  proj = _rand(rng, (sw, tw), scale=0.3)
  mask = _mask([5, 2], length)
  got = losses.hidden_mse(th, sh, proj, mask)
  np.testing.assert_allclose(got, ref.hidden_mse(th, sh, proj, mask),
                             rtol=RTOL, atol=ATOL)
  # Copy of the teacher through an identity projection (or none): zero.
  assert losses.hidden_mse(th, th, jnp.eye(tw), mask) == 0.0
  assert losses.hidden_mse(th, th, None, mask) == 0.0
  # Padding content / extra padding.
  pad = ~mask[..., None]
  np.testing.assert_allclose(
      losses.hidden_mse(jnp.where(pad, 9.0, th), jnp.where(pad, -9.0, sh), proj, mask),
      got, rtol=1e-6)
  extra = lambda x: jnp.pad(x, [(0, 0), (0, 2), (0, 0)])
  np.testing.assert_allclose(
      losses.hidden_mse(extra(th), extra(sh), proj, _mask([5, 2], length + 2)), got,
      rtol=1e-6)
  gt, gs, gp = jax.grad(lambda t, s, p: losses.hidden_mse(t, s, p, mask),
                        argnums=(0, 1, 2))(th.astype(jnp.float32),
                                           sh.astype(jnp.float32), proj)
  assert not np.any(gt) and np.any(gs) and np.any(gp)
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_mse(th, sh, None, mask)


def test_losses_under_batch_sharding():
  """Batch-sharded inputs (fake CPU devices) give the unsharded values."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(10)
  batch, length, vocab, width = 4, 10, 12, 8
  tl, sl = _rand(rng, (batch, length, vocab)), _rand(rng, (batch, length, vocab))
  th, sh = _rand(rng, (batch, length, width)), _rand(rng, (batch, length, width))
  mask = _mask([10, 7, 3, 9], length)

  def all_losses(tl, sl, th, sh, mask):
    return jnp.stack([
        losses.logits_kl(tl, sl, mask, 2.0, chunk_size=4),
        losses.span_corruption_loss(sl, jnp.argmax(tl, -1), mask, z_loss=1e-3,
                                    chunk_size=3).total,
        losses.relation_kl(th, th, sh, sh, num_relation_heads=2, query_mask=mask,
                           key_mask=mask, causal=True),
        losses.hidden_mse(th, sh, None, mask),
    ])

  want = all_losses(tl, sl, th, sh, mask)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
  got = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(all_losses(*a)), argnums=1))(
      *map(shard, (tl, sl, th, sh, mask)))
  np.testing.assert_allclose(got[0], jnp.sum(want), rtol=1e-5)
  assert got[1].sharding.spec == P("data")  # the gradient stays batch-sharded
