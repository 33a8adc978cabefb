"""relation_kl(implementation="blockwise") against the explicit relation_kl
(values and gradients) and the float64 reference, and the claim that it never
forms a [.., len_a, len_b] array (checked in its jaxpr and compiled HLO)."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import distill_reference as ref
from miniend_jax.distill import relations

pytestmark = pytest.mark.lean

BLOCK = 4  # small tiles, so every case below spans several, with a ragged last one


def _rand(rng, shape, dtype=jnp.float32, scale=2.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype=dtype)


def _mask(lengths, length):
  return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def _case(name):
  """(teacher_a, teacher_b, student_a, student_b, keyword arguments) of a case."""
  rng = np.random.default_rng(CASES.index(name))
  batch, heads, tw, sw = 2, 2, 12, 8  # different head widths (6 and 4)
  if name in ("cross_padded", "cross_empty_row", "cross_one_tile"):
    len_a, len_b = 7, 10
    qmask = _mask([7, 5], len_a)
    # cross_empty_row: the second example has no valid key, so its rows
    # see nothing and must not count.
    kmask = _mask([10, 0 if name == "cross_empty_row" else 6], len_b)
    kw = dict(query_mask=qmask, key_mask=kmask)
    if name == "cross_one_tile":
      kw["block_size"] = 64
    ta, tb = _rand(rng, (batch, len_a, tw)), _rand(rng, (batch, len_b, tw))
    sa, sb = _rand(rng, (batch, len_a, sw)), _rand(rng, (batch, len_b, sw))
  else:
    length = 11
    mask = _mask([11, 8], length)
    ta = tb = _rand(rng, (batch, length, tw))
    sa = sb = _rand(rng, (batch, length, sw))
    kw = dict(query_mask=mask, key_mask=mask, causal=True)
    if name == "packed":  # three segments, and two plus padding
      seg = np.array([[1] * 4 + [2] * 5 + [3] * 2, [1] * 3 + [2] * 5 + [0] * 3])
      kw.update(query_segment_ids=seg, key_segment_ids=seg)
    if name == "packed_empty_row":
      # Row 7 of the second example is the only valid position of its
      # segment and is no valid key: the row sees nothing.
      seg = np.array([[1] * 11, [1] * 3 + [2] * 4 + [5] * 4])
      kmask = mask & (np.arange(length) != 7)[None]
      kw.update(query_segment_ids=seg, key_segment_ids=seg, key_mask=kmask,
                causal=False)
  if name.startswith("interpolated"):
    kw["interpolation"] = jnp.float32(float(name.split("_")[1]))
  return ta, tb, sa, sb, dict(num_relation_heads=heads, **kw)


CASES = ["cross_padded", "cross_empty_row", "cross_one_tile", "self_causal", "packed",
         "packed_empty_row", "interpolated_0.3"]


def _value_and_grads(implementation, ta, tb, sa, sb, kw):
  kw = dict(kw)
  block = kw.pop("block_size", BLOCK)
  if ta is tb:  # a self-relation: a and b are one tensor, as the callers pass it

    def loss(t, s):
      return relations.relation_kl(t, t, s, s, implementation=implementation,
                                   block_size=block, **kw)

    value, (g_t, g_s) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(ta, sa)
    return value, (g_t,), (g_s,)

  def loss(ta, tb, sa, sb):
    return relations.relation_kl(ta, tb, sa, sb, implementation=implementation,
                                 block_size=block, **kw)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(ta, tb, sa, sb)
  return value, grads[:2], grads[2:]


@pytest.mark.parametrize("name", CASES)
def test_blockwise_equals_explicit_and_reference(name):
  ta, tb, sa, sb, kw = _case(name)
  value, teacher_grads, student_grads = _value_and_grads("blockwise", ta, tb, sa, sb, kw)
  want, _, want_grads = _value_and_grads("explicit", ta, tb, sa, sb, kw)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  for got_g, want_g in zip(student_grads, want_grads):
    assert got_g.shape == want_g.shape
    assert float(jnp.max(jnp.abs(want_g))) > 1e-3  # a gradient that could be wrong
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)
  for g in teacher_grads:  # the teacher is a fixed target
    np.testing.assert_array_equal(g, 0.0)
  a = kw.get("interpolation")
  reference = ref.relation_kl(
      ta, tb, sa, sb, kw["num_relation_heads"], kw["query_mask"], kw["key_mask"],
      causal=kw.get("causal", False), qseg=kw.get("query_segment_ids"),
      kseg=kw.get("key_segment_ids"), a=None if a is None else float(a))
  assert reference > 1e-3
  np.testing.assert_allclose(value, reference, rtol=2e-5, atol=1e-6)


def test_blockwise_bfloat16_and_jit():
  """bf16 inputs (the teacher's storage dtype), a traced interpolation under
  jit: the gradients come back in the inputs' dtype and match the explicit
  version's."""
  ta, tb, sa, sb, kw = _case("interpolated_0.3")
  ta, sa = ta.astype(jnp.bfloat16), sa.astype(jnp.bfloat16)
  kw.pop("interpolation")

  def loss(s, a, implementation):
    return relations.relation_kl(ta, ta, s, s, interpolation=a, block_size=BLOCK,
                                 implementation=implementation, **kw)

  for a in (0.0, 0.6):
    got = jax.jit(jax.value_and_grad(lambda s, a: loss(s, a, "blockwise")))(sa, a)
    want = jax.jit(jax.value_and_grad(lambda s, a: loss(s, a, "explicit")))(sa, a)
    assert got[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1], np.float32),
                               np.asarray(want[1], np.float32), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("name", ["cross_empty_row", "packed", "interpolated_0.3"])
def test_kernel_equals_blockwise(name):
  """The Pallas TPU kernel, run by Pallas' interpreter, against the blockwise
  version: values and the student's gradients (its own fused backward)."""
  ta, tb, sa, sb, kw = _case(name)
  kw.pop("block_size", None)
  value, teacher_grads, student_grads = _value_and_grads("kernel_interpret", ta, tb, sa, sb, kw)
  want, _, want_grads = _value_and_grads("blockwise", ta, tb, sa, sb, kw)
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  for got_g, want_g in zip(student_grads, want_grads):
    assert float(jnp.max(jnp.abs(want_g))) > 1e-3
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)
  for g in teacher_grads:
    np.testing.assert_array_equal(g, 0.0)
  if name != "interpolated_0.3":
    return
  # The value alone (no gradient wanted) runs the kernel without its gradient part.
  alone = jax.jit(lambda: relations.relation_kl(ta, tb, sa, sb, implementation="kernel_interpret",
                                                **kw))()
  np.testing.assert_allclose(alone, want, rtol=1e-5, atol=1e-6)


def _shapes_in_jaxpr(jaxpr):
  """Every shape an equation of `jaxpr` (or of a jaxpr inside it) produces."""
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _shapes_in_jaxpr(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _shapes_in_jaxpr(sub)


def _shapes_in_hlo(text):
  for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", text):
    yield tuple(int(d) for d in dims.split(",") if d)


def _relation_sized(shapes, lengths):
  """The shapes with two axes that are sequence lengths (a len_a x len_b array)."""
  return sorted({s for s in shapes if sum(d in lengths for d in s) >= 2})


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_forms_no_relation_sized_array(causal):
  """The value and gradient program holds tiles, never [.., len_a, len_b].

  Lengths (24 and 40, padded: 24 and 40) are multiples of neither the batch,
  the heads nor the widths, so a shape with two of them is a relation-sized
  array; the explicit version is checked to have such arrays, so the check
  can fail.
  """
  rng = np.random.default_rng(3)
  len_a, len_b = (40, 40) if causal else (24, 40)
  block = 8
  ta, tb = _rand(rng, (2, len_a, 12)), _rand(rng, (2, len_b, 12))
  sa, sb = _rand(rng, (2, len_a, 6)), _rand(rng, (2, len_b, 6))
  kw = dict(num_relation_heads=3, query_mask=_mask([len_a, 20], len_a),
            key_mask=_mask([len_b, 17], len_b), causal=causal,
            interpolation=jnp.float32(0.5), block_size=block)

  def step(implementation):
    return jax.value_and_grad(
        lambda sa, sb: relations.relation_kl(ta, tb, sa, sb, implementation=implementation,
                                             **kw), argnums=(0, 1))

  lengths = {len_a, len_b}
  for implementation, expect_relation_sized in (("explicit", True), ("blockwise", False)):
    fn = step(implementation)
    jaxpr_shapes = _relation_sized(_shapes_in_jaxpr(jax.make_jaxpr(fn)(sa, sb).jaxpr), lengths)
    hlo = jax.jit(fn).lower(sa, sb).compile().as_text()
    hlo_shapes = _relation_sized(_shapes_in_hlo(hlo), lengths)
    assert bool(jaxpr_shapes) == expect_relation_sized, (implementation, jaxpr_shapes)
    assert bool(hlo_shapes) == expect_relation_sized, (implementation, hlo_shapes)


def test_auto_tiles_long_relations_only():
  """"auto" forms short relations whole and tiles long ones."""
  rng = np.random.default_rng(4)
  # Twice the default tile, so that tiling shows in the shapes.
  for length, tiled in ((8, False), (2 * relations.DEFAULT_BLOCK_SIZE, True)):
    assert (length * length >= relations.BLOCKWISE_MIN_SCORES) == tiled
    x = _rand(rng, (1, length, 4))
    mask = np.ones((1, length), bool)
    fn = jax.grad(lambda s: relations.relation_kl(x, x, s, s, num_relation_heads=2,
                                                  query_mask=mask, key_mask=mask))
    shapes = _relation_sized(_shapes_in_jaxpr(jax.make_jaxpr(fn)(x).jaxpr), {length})
    assert bool(shapes) != tiled, (length, shapes)


def test_blockwise_errors():
  x = jnp.zeros((1, 4, 8))
  m = np.ones((1, 4), bool)
  with pytest.raises(ValueError, match="implementation"):
    relations.relation_kl(x, x, x, x, num_relation_heads=2, query_mask=m, key_mask=m,
                          implementation="flash")
  with pytest.raises(ValueError, match="block_size"):
    relations.relation_kl(x, x, x, x, num_relation_heads=2, query_mask=m, key_mask=m,
                          implementation="blockwise", block_size=0)
  rows, keys = jnp.zeros((1, 128, 8)), jnp.zeros((1, 4096, 8))  # 128 x 4096 f32 x 6 > 8 MiB
  with pytest.raises(ValueError, match="VMEM"):
    relations.relation_kl(rows, keys, rows, keys, num_relation_heads=2,
                          query_mask=np.ones((1, 128), bool), key_mask=np.ones((1, 4096), bool),
                          implementation="kernel_interpret")
  with pytest.raises(ValueError, match="causal"):
    y = jnp.zeros((1, 5, 8))
    relations.relation_kl(x, y, x, y, num_relation_heads=2, query_mask=m,
                          key_mask=np.ones((1, 5), bool), causal=True,
                          implementation="blockwise")


@pytest.mark.parametrize("name", ["cross_empty_row", "packed", "interpolated_0.3"])
def test_kernel_per_batch_shard_equals_blockwise(name):
  """Under a mesh the kernel runs on each shard's examples (`shard_map`) and the
  mean is over the whole batch: with one example per shard, and an example that
  has no valid row ("cross_empty_row"), and with the interpolation coefficient
  replicated to every shard, value and student gradients equal the
  blockwise version's on the whole batch. So they do with the relation heads
  split over a second mesh axis (each device its own head), when that split
  does not divide the heads (the widths gathered), and with no batch axes
  (every device computes the whole batch)."""
  ta, tb, sa, sb, kw = _case(name)
  kw.pop("block_size", None)
  assert kw["num_relation_heads"] == 2

  def value_and_grads(implementation, batch_axes=None, head_axes=None):
    loss = lambda sa, sb: relations.relation_kl(
        ta, tb, sa, sb, implementation=implementation, batch_axes=batch_axes,
        head_axes=head_axes, **kw)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(sa, sb)

  want, want_grads = value_and_grads("blockwise")
  mesh = jax.make_mesh((2, 2, 2), ("data", "model", "rest"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  # ("data", "data"): head axes that repeat a batch axis are not split over.
  for axes in (("data", None), ("data", "model"), ("data", ("model", "rest")),
               ("data", "data"), (None, None)):
    with jax.set_mesh(mesh):
      value, grads = value_and_grads("kernel_interpret", *axes)
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=str(axes))
    for got_g, want_g in zip(grads, want_grads):
      assert float(jnp.max(jnp.abs(want_g))) > 1e-3
      np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6, err_msg=str(axes))
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not split"):
    relations.relation_kl(ta, tb, sa, sb, implementation="kernel_interpret",
                          batch_axes=("data", "model"), **kw)
