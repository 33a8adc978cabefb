"""Recipes: presets, gin files, configuration errors, schedules, recipe_loss."""

import dataclasses
import glob
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_reference as ref
import distill_tiny_models as tiny
from miniend_jax.distill import recipe as R
from miniend_jax.model.t5 import AttentionTap, T5Output, Taps

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

RECIPE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "gin_configs",
                          "recipes")
REQUIRED = ("scratch", "kd_logits", "minilm", "kd_logits_minilm", "implicit",
            "hidden_mse", "miniend_d", "miniend_d_nologit", "miniend_e",
            "miniend_e_nologit", "miniend_e_interpolated", "minilm_encdec")
# Named recipes that are objectives of their own (aliases excluded).
CANONICAL = sorted(n for n in R.RECIPES if n not in R.ALIASES)


# ---------------------------------------------------------------------------
# Presets and gin.
# ---------------------------------------------------------------------------


def test_presets_exist_and_have_gin_files():
  assert set(REQUIRED) <= set(R.RECIPES)
  names = {os.path.basename(f)[:-4] for f in glob.glob(f"{RECIPE_DIR}/*.gin")}
  assert names == set(R.RECIPES)


@pytest.mark.parametrize("name", REQUIRED)
def test_gin_file_builds_the_preset(name):
  gin.parse_config_file(os.path.join(RECIPE_DIR, f"{name}.gin"))
  built = R.recipe_from_gin()
  assert type(built) is R.Recipe
  assert built == R.get_recipe(name)
  if name in R.ALIASES:  # an alias's file names the preset: the same object
    assert built is R.get_recipe(R.ALIASES[name])


# What the paper does not fix, per kind of term: each named recipe's gin file binds
# all of it, with its source in a comment, so every default is visible where the
# recipe is defined (README, "Recipe settings").
_UNFIXED = {
    "logits": ("temperature", "weight"),
    "relation": ("pairs", "pair_reduction", "relation_heads", "teacher_layer",
                 "student_layer", "weight"),
    "hidden": ("teacher_layer", "student_layer", "weight"),
}
_SOURCES = ("MiniLMv2", "first author's code", "ours")


@pytest.mark.parametrize("name", [n for n in CANONICAL if n != "scratch"])
def test_gin_files_bind_every_setting_the_paper_does_not_fix(name):
  path = os.path.join(RECIPE_DIR, f"{name}.gin")
  gin.parse_config_file(path)
  assert gin.query_parameter(f"{name}/Recipe.ce_weight") == 0.0
  for term in gin.query_parameter(f"{name}/Recipe.terms"):
    selector = term.scoped_selector
    kind = gin.query_parameter(f"{selector}.kind")
    group = ("logits" if kind == "logits" else
             "hidden" if kind in R.HIDDEN_KINDS else "relation")
    settings = _UNFIXED[group] + (("causal",) if kind in R.CAUSAL_KINDS else ())
    for setting in settings:
      gin.query_parameter(f"{selector}.{setting}")  # raises when the file leaves it out
  with open(path) as f:
    sourced = [line for line in f if re.match(
        r"\s*(ce_weight|pairs|pair_reduction|relation_heads|teacher_layer|causal|"
        r"temperature) =", line)]
  unsourced = [line for line in sourced
               if "#" not in line or not any(src in line.split("#", 1)[1] for src in _SOURCES)]
  assert sourced and not unsourced, unsourced


def _kinds(name):
  return [t.kind for t in R.get_recipe(name).terms]


def test_preset_contents():
  """The paper's rows (Figure 1 / poster), each carried over unchanged."""
  assert _kinds("scratch") == [] and R.get_recipe("scratch").ce_weight == 1.0
  # Prior methods as for a decoder-only LM: no encoder or cross term.
  assert _kinds("kd_logits") == ["logits"]
  assert _kinds("minilm") == ["decoder_self"]
  assert _kinds("kd_logits_minilm") == ["logits", "decoder_self"]
  assert _kinds("miniend_d") == ["logits", "decoder_self", "decoder_cross"]
  assert _kinds("miniend_d_nologit") == ["decoder_self", "decoder_cross"]
  assert _kinds("miniend_e") == ["logits", "decoder_self", "encoder_self"]
  assert _kinds("miniend_e_nologit") == ["decoder_self", "encoder_self"]
  assert _kinds("hidden_mse") == ["encoder_hidden", "decoder_hidden"]
  assert all(R.get_recipe(n).ce_weight == 0.0 for n in CANONICAL if n != "scratch")
  interp = R.get_recipe("miniend_e_interpolated")
  nolog = R.get_recipe("miniend_e_nologit")
  assert [t.kind for t in interp.terms] == [t.kind for t in nolog.terms]
  assert all(isinstance(t.interpolation, R.LinearRamp) and t.teacher_layer == -4
             for t in interp.terms)
  for t in R.get_recipe("miniend_d").terms:
    if t.kind != "logits":
      assert t.pairs == ("qq", "kk", "vv") and t.teacher_layer == -1
  # Relations over decoder positions are causal: self-attention and cross Q-Q.
  dec_self, dec_cross = R.get_recipe("miniend_d").terms[1:]
  assert dec_self.causal and dec_cross.causal
  assert not R.get_recipe("miniend_e").terms[2].causal  # encoder: bidirectional


def test_aliases_are_the_same_recipe():
  assert R.ALIASES == {"implicit": "kd_logits_minilm",
                       "minilm_encdec": "miniend_e_nologit"}
  for alias, target in R.ALIASES.items():
    assert R.get_recipe(alias) is R.get_recipe(target)
    assert R.get_recipe(alias).name == target


def _objective(recipe, teacher_cfg, student_cfg):
  """What a recipe optimises: its resolved terms as a set (labels dropped),
  and the weight of the student's own loss."""
  resolved = recipe.resolve(teacher_cfg, student_cfg)
  terms = frozenset(dataclasses.replace(t, name=None) for t in resolved.terms)
  return terms, resolved.ce_weight, resolved.z_loss if resolved.ce_weight else 0.0


def test_no_two_named_recipes_define_the_same_objective():
  # A 4-layer teacher (so layer -4 exists) and a 64-wide student (64 relation
  # heads divide it); on these configs -1 and -4 are different layers.
  teacher, student = tiny.DEEP, tiny.config(num_heads=4, d_kv=16)
  objectives = {}
  for name in CANONICAL:
    key = _objective(R.get_recipe(name), teacher, student)
    assert key not in objectives, (
        f"{name!r} defines the same objective as {objectives.get(key)!r}")
    objectives[key] = name
  assert len(objectives) == len(CANONICAL) >= 10
  # The check can fail: an undeclared copy of a recipe is caught.
  copy = dataclasses.replace(R.get_recipe("miniend_e_nologit"), name="copy",
                             terms=tuple(reversed(R.get_recipe("miniend_e_nologit").terms)))
  assert _objective(copy, teacher, student) in objectives


def test_gin_overrides_and_preset_name_macro():
  gin.parse_config_file(os.path.join(RECIPE_DIR, "miniend_d.gin"))
  gin.parse_config(["miniend_d/Recipe.ce_weight = 0.5",
                    "miniend_d/dec_cross/Term.pairs = ['qq', 'qk']"])
  built = R.recipe_from_gin()
  assert built.ce_weight == 0.5 and built.terms[2].pairs == ("qq", "qk")
  gin.clear_config()
  gin.parse_config("RECIPE = 'minilm'")
  assert R.recipe_from_gin() == R.get_recipe("minilm")
  gin.clear_config()
  gin.parse_config("""
    RECIPE = @Recipe()
    Recipe.terms = [@a/Term(), @b/Term()]
    a/Term.kind = 'encoder_hidden'
    b/Term.kind = 'decoder_cross'
    b/Term.interpolation = @AdaptiveSchedule()
  """)
  built = R.recipe_from_gin()
  assert built.terms[1].interpolation == R.AdaptiveSchedule()
  gin.clear_config()
  with pytest.raises(ValueError, match="No gin macro"):
    R.recipe_from_gin()
  with pytest.raises(ValueError, match="Unknown recipe 'nope'"):
    R.get_recipe("nope")


# ---------------------------------------------------------------------------
# Configuration-time errors (pure Python on configs: nothing is traced).
# ---------------------------------------------------------------------------


def test_bad_terms_rejected_at_construction():
  with pytest.raises(ValueError, match="unknown kind"):
    R.Term("decoder_attention")
  with pytest.raises(ValueError, match="pairs"):
    R.Term("encoder_self", pairs=("qq", "xx"))
  with pytest.raises(ValueError, match="pairs only apply"):
    R.Term("logits", pairs=("qq",))
  with pytest.raises(ValueError, match="causal=True only applies"):
    R.Term("encoder_self", causal=True)
  with pytest.raises(ValueError, match="causal=True only applies"):
    R.Term("encoder_hidden", causal=True)
  assert R.Term("decoder_cross").causal and not R.Term("decoder_cross", causal=False).causal
  with pytest.raises(ValueError, match="pair_reduction='max'"):
    R.Term("decoder_self", pair_reduction="max")
  with pytest.raises(ValueError, match="pair_reduction only applies"):
    R.Term("logits", pair_reduction="sum")
  with pytest.raises(ValueError, match="hidden-state terms take no interpolation"):
    R.Term("decoder_hidden", interpolation=R.ConstantSchedule(0.5))
  with pytest.raises(ValueError, match="appear more than once"):
    R.Recipe(terms=(R.Term("decoder_self"), R.Term("decoder_self")))
  R.Recipe(terms=(R.Term("decoder_self"), R.Term("decoder_self", name="dec2",
                                                  teacher_layer=-2)))
  with pytest.raises(ValueError, match="train nothing"):
    R.Recipe(terms=(), ce_weight=0.0)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    R.LinearRamp(start_value=-0.1)
  with pytest.raises(ValueError, match="start_step < end_step"):
    R.CosineRamp(start_step=5, end_step=5)


def test_tap_the_model_cannot_give():
  bad = R.Recipe(terms=(R.Term("decoder_cross", student_layer=2),))
  with pytest.raises(ValueError, match=r"student_layer=2 .*decoder has 2 layers.*-2\.\.1"):
    bad.resolve(tiny.TEACHER, tiny.STUDENT)
  with pytest.raises(ValueError, match="student_layer=2"):
    bad.required_taps(tiny.TEACHER, tiny.STUDENT)
  bad = R.Recipe(terms=(R.Term("encoder_hidden", teacher_layer=-4),))
  with pytest.raises(ValueError, match="teacher_layer=-4 .*encoder has 3 layers"):
    bad.resolve(tiny.TEACHER, tiny.STUDENT)


def test_relation_heads_must_divide_widths():
  # Teacher width 36, student width 16: 3 divides 36 but not 16.
  bad = R.Recipe(terms=(R.Term("encoder_self", relation_heads=3),))
  with pytest.raises(ValueError, match=r"relation_heads=3 must divide.*teacher 36.*student 16"):
    bad.resolve(tiny.TEACHER, tiny.STUDENT)
  # Default (student head count) is fine here; a student whose head count
  # does not divide the teacher width is caught too.
  student = tiny.config(num_heads=5, d_kv=4)
  with pytest.raises(ValueError, match="relation_heads=5"):
    R.get_recipe("minilm").resolve(tiny.TEACHER, student)


def test_logits_need_one_vocabulary():
  student = tiny.config(vocab_size=tiny.VOCAB + 3)
  for name in ("kd_logits", "miniend_d", "miniend_e", "implicit"):
    with pytest.raises(ValueError, match="vocab_size"):
      R.get_recipe(name).resolve(tiny.TEACHER, student)
  R.get_recipe("miniend_e_nologit").resolve(tiny.TEACHER, student)  # no logits


def test_resolve_and_required_taps():
  recipe = R.get_recipe("miniend_d").resolve(tiny.TEACHER, tiny.STUDENT)
  assert recipe.is_resolved and not R.get_recipe("miniend_d").is_resolved
  assert recipe.resolve(tiny.TEACHER, tiny.STUDENT) == recipe  # idempotent
  assert [t.relation_heads for t in recipe.terms[1:]] == [2, 2]
  t_taps, s_taps = R.get_recipe("miniend_d").required_taps(tiny.TEACHER, tiny.STUDENT)
  assert t_taps == Taps(decoder_self=(2,), decoder_cross=(2,))
  assert s_taps == Taps(decoder_self=(1,), decoder_cross=(1,))
  t_taps, s_taps = R.get_recipe("miniend_e").required_taps(tiny.TEACHER, tiny.STUDENT)
  assert t_taps == Taps(decoder_self=(2,), encoder_self=(2,))
  assert R.get_recipe("scratch").required_taps(None, tiny.STUDENT) == (Taps(), Taps())
  assert R.get_recipe("hidden_mse").required_taps(tiny.TEACHER, tiny.STUDENT)[1] == Taps(
      encoder_hidden=(1,), decoder_hidden=(1,))
  # 3B-style teacher (24 layers): the upper-middle layer 20 (the 21st).
  big = tiny.config(num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=4)
  t_taps, _ = R.get_recipe("miniend_e_interpolated").required_taps(
      big, tiny.config(num_heads=4, d_kv=16))
  assert t_taps == Taps(encoder_self=(20,), decoder_self=(20,))


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


def test_schedules():
  lin = R.LinearRamp(start_value=0.2, end_value=1.0, start_step=10, end_step=20)
  cos = R.CosineRamp(start_value=0.0, end_value=1.0, start_step=0, end_step=10)
  steps = jnp.array([0, 10, 15, 20, 100])
  np.testing.assert_allclose(jax.vmap(jax.jit(lin))(steps), [0.2, 0.2, 0.6, 1.0, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose([cos(s) for s in (0, 5, 10, 50)], [0.0, 0.5, 1.0, 1.0],
                             atol=1e-6)
  assert 0.0 < cos(2) < 0.2  # slower start than a linear ramp (0.2 at 2/10)
  assert R.ConstantSchedule(0.3)(7) == jnp.float32(0.3)
  ada = R.AdaptiveSchedule(min_value=0.1, max_value=0.9)
  np.testing.assert_allclose(ada(0, student_loss=4.0, teacher_loss=2.0), 0.5)
  np.testing.assert_allclose(ada(0, student_loss=8.0, teacher_loss=0.4), 0.1)
  np.testing.assert_allclose(ada(0, student_loss=1.0, teacher_loss=2.0), 0.9)
  g = jax.grad(lambda s: ada(0, student_loss=s, teacher_loss=2.0))(4.0)
  assert g == 0.0  # stop-gradient: the schedule is not trained


# ---------------------------------------------------------------------------
# recipe_loss on tiny models.
# ---------------------------------------------------------------------------


def _outputs(recipe, t_cfg, s_cfg, t_params, s_params, b):
  t_taps, s_taps = recipe.required_taps(t_cfg, s_cfg)
  return tiny.apply(t_cfg, t_params, b, t_taps), tiny.apply(s_cfg, s_params, b, s_taps)


def test_recipe_loss_matches_reference_wiring():
  """Each term/pair equals the float64 reference on the tapped tensors, with
  the masks of the right sides (cross: causal Q-Q over the decoder, K-K/V-V
  over the encoder, Q-K decoder rows over encoder keys)."""
  recipe = R.Recipe(name="all", ce_weight=0.7, z_loss=1e-3, terms=(
      R.Term("logits", temperature=2.0, weight=0.5),
      R.Term("encoder_self", pairs=("qq", "kk", "vv", "qk"), teacher_layer=1),
      R.Term("decoder_self", pairs=("qq", "qk")),
      R.Term("decoder_cross", pairs=("qq", "kk", "vv", "qk"), weight=2.0),
      R.Term("decoder_hidden", student_layer=0),
  )).resolve(tiny.TEACHER, tiny.STUDENT)
  b = tiny.batch()
  tp, sp = tiny.params(tiny.TEACHER, 1), tiny.params(tiny.STUDENT, 2)
  t_out, s_out = _outputs(recipe, tiny.TEACHER, tiny.STUDENT, tp, sp, b)
  extra = recipe.init_extra_params(jax.random.key(3), tiny.TEACHER, tiny.STUDENT)
  assert extra["decoder_hidden"]["kernel"].shape == (16, 20)
  total, m = jax.jit(R.recipe_loss, static_argnums=0)(recipe, t_out, s_out, b, 5, extra)

  enc = np.asarray(b["encoder_input_tokens"]) > 0
  dec = np.asarray(b["decoder_target_tokens"]) > 0
  sides = {"q": "query", "k": "key", "v": "value"}
  expected_total = 0.0
  ce = ref.span_corruption(s_out.logits, b["decoder_target_tokens"],
                           b["decoder_loss_weights"], 1e-3)
  np.testing.assert_allclose(m["loss/span_corruption"], ce[1], rtol=1e-5)
  expected_total += 0.7 * ce[0]
  want = ref.logits_kl(t_out.logits, s_out.logits, b["decoder_loss_weights"], 2.0)
  np.testing.assert_allclose(m["loss/logits"], want, rtol=1e-5)
  expected_total += 0.5 * want
  for term in recipe.terms[1:4]:
    t_tap = getattr(t_out, term.kind)[term.teacher_layer]
    s_tap = getattr(s_out, term.kind)[term.student_layer]
    term_sum = 0.0
    for pair in term.pairs:
      a_, b_ = sides[pair[0]], sides[pair[1]]
      if term.kind == "encoder_self":
        qm, km = enc, enc
      elif term.kind == "decoder_self":
        qm, km = dec, dec
      else:
        qm = dec if a_ == "query" else enc
        km = dec if b_ == "query" else enc
      causal = term.kind == "decoder_self" or (term.kind == "decoder_cross"
                                               and pair == "qq")
      want = ref.relation_kl(getattr(t_tap, a_), getattr(t_tap, b_),
                             getattr(s_tap, a_), getattr(s_tap, b_), 2, qm, km,
                             causal=causal)
      np.testing.assert_allclose(m[f"loss/{term.label}/{pair}"], want, rtol=1e-5,
                                 atol=1e-7)
      term_sum += want
    # A relation term is the mean of its pair losses (pair_reduction="mean").
    term_value = term_sum / len(term.pairs)
    np.testing.assert_allclose(m[f"loss/{term.label}"], term_value, rtol=1e-5)
    expected_total += term.weight * term_value
  want = ref.hidden_mse(t_out.decoder_hidden[2], s_out.decoder_hidden[0],
                        extra["decoder_hidden"]["kernel"], dec)
  np.testing.assert_allclose(m["loss/decoder_hidden"], want, rtol=1e-5)
  expected_total += want
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)
  np.testing.assert_allclose(m["loss/total"], total)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_term_zero_for_a_copy_of_the_teacher(name):
  cfg = tiny.TEACHER
  recipe = R.get_recipe(name)
  if name == "miniend_e_interpolated":
    # A copy reads the same layer on both sides (-4 for the 3B recipe), with
    # 64 relation heads dividing the width, at an intermediate a.
    cfg = tiny.DEEP
    recipe = dataclasses.replace(recipe, terms=tuple(
        dataclasses.replace(t, student_layer=-4,
                            interpolation=R.ConstantSchedule(0.7))
        for t in recipe.terms))
  recipe = recipe.resolve(cfg, cfg)
  p = tiny.params(cfg, 4)
  b = tiny.batch(seed=1)
  t_out, s_out = _outputs(recipe, cfg, cfg, p, p, b)
  extra = {t.label: {"kernel": jnp.eye(cfg.d_model)}
           for t in recipe.terms if t.kind in R.HIDDEN_KINDS}
  total, m = R.recipe_loss(recipe, t_out if recipe.needs_teacher else None, s_out, b,
                           0, extra)
  for t in recipe.terms:
    np.testing.assert_allclose(m[f"loss/{t.label}"], 0.0, atol=1e-6)
  if name == "scratch":
    assert total > 1.0 and set(m) == {"loss/span_corruption", "loss/z_loss",
                                      "loss/total"}
  else:
    np.testing.assert_allclose(total, 0.0, atol=1e-5)
    assert len(recipe.terms) >= 1


@pytest.mark.parametrize("kind", ["logits", "decoder_self", "decoder_cross",
                                  "encoder_self"])
def test_interpolation_endpoints_in_recipe(kind):
  """a(step) = 1 is plain distillation; a = 0 gives exactly zero."""
  plain = R.Recipe(terms=(R.Term(kind),), ce_weight=0.0).resolve(tiny.TEACHER,
                                                                 tiny.STUDENT)
  b = tiny.batch(seed=2)
  t_out, s_out = _outputs(plain, tiny.TEACHER, tiny.STUDENT, tiny.params(tiny.TEACHER, 5),
                          tiny.params(tiny.STUDENT, 6), b)
  extra = plain.init_extra_params(jax.random.key(0), tiny.TEACHER, tiny.STUDENT)
  base, _ = R.recipe_loss(plain, t_out, s_out, b, 0, extra)
  assert base > 1e-4

  def with_schedule(schedule):
    term = dataclasses.replace(plain.terms[0], interpolation=schedule)
    return dataclasses.replace(plain, terms=(term,))

  one, m = R.recipe_loss(with_schedule(R.ConstantSchedule(1.0)), t_out, s_out, b, 0, extra)
  np.testing.assert_allclose(one, base, rtol=1e-6)
  assert m[f"interpolation/{kind}"] == 1.0
  ramp = R.LinearRamp(start_value=0.0, end_value=1.0, start_step=0, end_step=100)
  zero, _ = R.recipe_loss(with_schedule(ramp), t_out, s_out, b, 0, extra)
  np.testing.assert_allclose(zero, 0.0, atol=1e-7)
  end, _ = R.recipe_loss(with_schedule(ramp), t_out, s_out, b, 100, extra)
  np.testing.assert_allclose(end, base, rtol=1e-6)
  half, _ = R.recipe_loss(with_schedule(ramp), t_out, s_out, b, 50, extra)
  assert 0.0 < half < base
  # Adaptive: reports the teacher's loss and an a in [min, max]. It needs a
  # recipe that trains the output layer (here the student's own loss).
  adaptive = dataclasses.replace(with_schedule(R.AdaptiveSchedule(min_value=0.05)),
                                 ce_weight=1.0).resolve(tiny.TEACHER, tiny.STUDENT)
  _, m = R.recipe_loss(adaptive, t_out, s_out, b, 0, extra)
  want_a = np.clip(m["teacher/span_corruption"] / m["loss/span_corruption"], 0.05, 1.0)
  np.testing.assert_allclose(m[f"interpolation/{kind}"], want_a, rtol=1e-6)


def _flat_student_gradient(recipe, t_out, student_params, b, s_taps):
  grads = jax.grad(lambda sp: R.recipe_loss(
      recipe, t_out, tiny.apply(tiny.STUDENT, sp, b, s_taps), b, 0)[0])(student_params)
  return np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in jax.tree.leaves(grads)])


@pytest.mark.parametrize("name,schedule", [
    # Every term on one schedule and no student loss, as miniend_e_interpolated.
    ("miniend_e_nologit", R.ConstantSchedule(0.5)),
    # The adaptive a on a logits-only recipe (two random models have about the same
    # cross-entropy, a ratio near 1: capped to stay inside (0, 1)).
    ("kd_logits", R.AdaptiveSchedule(max_value=0.5)),
])
def test_an_interpolated_update_is_not_a_rescaled_plain_one(name, schedule):
  """With targets mixed after the softmax, the student's whole gradient was a times
  the plain recipe's (AdamW then takes the very same step). Mixed before it, the
  update points elsewhere."""
  plain = R.get_recipe(name).resolve(tiny.TEACHER, tiny.STUDENT)
  interpolated = dataclasses.replace(plain, terms=tuple(
      dataclasses.replace(t, interpolation=schedule) for t in plain.terms))
  t_taps, s_taps = plain.required_taps(tiny.TEACHER, tiny.STUDENT)
  b = tiny.batch(seed=6)
  t_out = tiny.apply(tiny.TEACHER, tiny.params(tiny.TEACHER, 12), b, t_taps)
  sp = tiny.params(tiny.STUDENT, 13)
  g_plain, g_interp = (_flat_student_gradient(r, t_out, sp, b, s_taps)
                       for r in (plain, interpolated))
  _, m = R.recipe_loss(interpolated, t_out, tiny.apply(tiny.STUDENT, sp, b, s_taps), b, 0)
  assert all(0.05 < m[f"interpolation/{t.label}"] < 0.95 for t in interpolated.terms)
  cosine = g_plain @ g_interp / (np.linalg.norm(g_plain) * np.linalg.norm(g_interp))
  assert cosine < 0.995, cosine


def test_no_gradient_into_teacher_params_and_clear_runtime_errors():
  recipe = R.get_recipe("miniend_d").resolve(tiny.TEACHER, tiny.STUDENT)
  t_taps, s_taps = recipe.required_taps(tiny.TEACHER, tiny.STUDENT)
  b = tiny.batch(seed=3)
  tp, sp = tiny.params(tiny.TEACHER, 7), tiny.params(tiny.STUDENT, 8)

  def loss(tp, sp):
    return R.recipe_loss(recipe, tiny.apply(tiny.TEACHER, tp, b, t_taps),
                         tiny.apply(tiny.STUDENT, sp, b, s_taps), b, 0)[0]

  gt, gs = jax.grad(loss, argnums=(0, 1))(tp, sp)
  assert all(not np.any(g) for g in jax.tree.leaves(gt))
  assert any(np.any(g) for g in jax.tree.leaves(gs))
  # Unresolved recipe / missing taps / missing projections: clear errors.
  t_out = tiny.apply(tiny.TEACHER, tp, b, t_taps)
  s_out = tiny.apply(tiny.STUDENT, sp, b, s_taps)
  with pytest.raises(ValueError, match="not resolved"):
    R.recipe_loss(R.get_recipe("miniend_d"), t_out, s_out, b, 0)
  with pytest.raises(ValueError, match="no encoder_self tap for layer 2"):
    R.recipe_loss(R.get_recipe("miniend_e").resolve(tiny.TEACHER, tiny.STUDENT),
                  t_out, s_out, b, 0)
  hid = R.get_recipe("hidden_mse").resolve(tiny.TEACHER, tiny.STUDENT)
  with pytest.raises(ValueError, match="init_extra_params"):
    R.recipe_loss(hid, *_outputs(hid, tiny.TEACHER, tiny.STUDENT, tp, sp, b), b, 0)


def test_teacher_assistant_chain():
  """3B-like -> assistant -> student: the same recipe configures both runs."""
  # Widths 64 -> 36 -> 16; 4 relation heads divide all three.
  teacher, assistant, student = tiny.DEEP, tiny.TEACHER, tiny.STUDENT
  base = R.get_recipe("miniend_e_interpolated")
  recipe = dataclasses.replace(base, terms=tuple(
      dataclasses.replace(t, relation_heads=4) for t in base.terms))
  b = tiny.batch(seed=4)
  ps = {"t": tiny.params(teacher, 9), "a": tiny.params(assistant, 10),
        "s": tiny.params(student, 11)}
  # Run 2's teacher (the assistant) is too shallow for layer -4; as the gin
  # file says, it reads the assistant's last layer instead.
  recipe_2 = dataclasses.replace(recipe, terms=tuple(
      dataclasses.replace(t, teacher_layer=-1) for t in recipe.terms))
  with pytest.raises(ValueError, match="teacher_layer=-4"):
    recipe.resolve(assistant, student)
  for stage, (t_cfg, tk), (s_cfg, sk), layer in [
      (recipe, (teacher, "t"), (assistant, "a"), 0),
      (recipe_2, (assistant, "a"), (student, "s"), 2)]:
    stage = stage.resolve(t_cfg, s_cfg)
    assert [t.teacher_layer for t in stage.terms] == [layer] * 2
    t_out, s_out = _outputs(stage, t_cfg, s_cfg, ps[tk], ps[sk], b)
    total, m = R.recipe_loss(stage, t_out, s_out, b, 5000)
    assert np.isfinite(total) and total > 0
    np.testing.assert_allclose(m["interpolation/encoder_self"], 0.6, rtol=1e-6)


# ---------------------------------------------------------------------------
# Cross-attention: causal Q-Q over decoder positions, pairs as a setting.
# ---------------------------------------------------------------------------


def _cross_outputs(rng, dec_len, enc_len, t_width, s_width, vocab=7, batch=2):
  """Teacher and student outputs holding only a layer-0 cross-attention tap."""
  def out(width):
    return T5Output(
        logits=jnp.asarray(rng.normal(size=(batch, dec_len, vocab)), jnp.float32),
        decoder_cross={0: AttentionTap(
            query=jnp.asarray(rng.normal(size=(batch, dec_len, width)) * 2, jnp.float32),
            key=jnp.asarray(rng.normal(size=(batch, enc_len, width)) * 2, jnp.float32),
            value=jnp.asarray(rng.normal(size=(batch, enc_len, width)) * 2, jnp.float32))})
  return out(t_width), out(s_width)


def _cross_batch(dec_lengths, enc_lengths, dec_len, enc_len):
  dec = np.arange(dec_len)[None] < np.asarray(dec_lengths)[:, None]
  enc = np.arange(enc_len)[None] < np.asarray(enc_lengths)[:, None]
  return {"encoder_input_tokens": jnp.asarray(enc * 3, jnp.int32),
          "decoder_target_tokens": jnp.asarray(dec * 3, jnp.int32)}, dec, enc


def _cross_recipe(**term_kw):
  return R.Recipe(ce_weight=0.0, terms=(R.Term(
      "decoder_cross", teacher_layer=0, student_layer=0, relation_heads=2,
      **term_kw),))


def _with_query_row(out, rows, new_rows):
  """`out` with the cross query of example n at position rows[n] replaced."""
  tap = out.decoder_cross[0]
  query = np.array(tap.query)
  for n, (i, row) in enumerate(zip(rows, new_rows)):
    query[n, i] = row
  return out.replace(decoder_cross={0: tap.replace(query=jnp.asarray(query))})


def test_cross_qq_is_causal_and_matches_reference():
  rng = np.random.default_rng(11)
  dec_len, enc_len = 6, 5
  b, dec, enc = _cross_batch([6, 4], [5, 3], dec_len, enc_len)
  t_out, s_out = _cross_outputs(rng, dec_len, enc_len, t_width=12, s_width=8)
  t_tap, s_tap = t_out.decoder_cross[0], s_out.decoder_cross[0]
  _, m = R.recipe_loss(_cross_recipe(pairs=("qq", "kk", "vv")), t_out, s_out, b, 0)
  causal = ref.relation_kl(t_tap.query, t_tap.query, s_tap.query, s_tap.query, 2,
                           dec, dec, causal=True)
  bidirectional = ref.relation_kl(t_tap.query, t_tap.query, s_tap.query,
                                  s_tap.query, 2, dec, dec, causal=False)
  assert abs(causal - bidirectional) > 1e-2  # the two definitions differ here
  np.testing.assert_allclose(m["loss/decoder_cross/qq"], causal, rtol=1e-5)
  # K-K and V-V range over encoder positions: bidirectional, encoder mask.
  for pair, side in (("kk", "key"), ("vv", "value")):
    t, s = getattr(t_tap, side), getattr(s_tap, side)
    np.testing.assert_allclose(m[f"loss/decoder_cross/{pair}"],
                               ref.relation_kl(t, t, s, s, 2, enc, enc), rtol=1e-5)
  # The term is the mean of its pair losses by default, their sum on request.
  pair_values = [causal] + [ref.relation_kl(getattr(t_tap, side), getattr(t_tap, side),
                                            getattr(s_tap, side), getattr(s_tap, side), 2,
                                            enc, enc) for side in ("key", "value")]
  np.testing.assert_allclose(m["loss/decoder_cross"], np.mean(pair_values), rtol=1e-5)
  _, m = R.recipe_loss(_cross_recipe(pairs=("qq", "kk", "vv"), pair_reduction="sum"),
                       t_out, s_out, b, 0)
  np.testing.assert_allclose(m["loss/decoder_cross"], np.sum(pair_values), rtol=1e-5)
  # causal=False restores a bidirectional Q-Q.
  _, m = R.recipe_loss(_cross_recipe(pairs=("qq",), causal=False), t_out, s_out, b, 0)
  np.testing.assert_allclose(m["loss/decoder_cross"], bidirectional, rtol=1e-5)


def test_future_decoder_position_changes_nothing_for_earlier_rows():
  """Changing both models' cross queries at each example's last decoder
  position only changes that position's own Q-Q relation row."""
  rng = np.random.default_rng(12)
  dec_len, enc_len, width = 6, 5, 8
  b, dec, _ = _cross_batch([6, 4], [5, 3], dec_len, enc_len)
  last = [5, 3]
  last_row = np.zeros_like(dec)
  last_row[0, 5] = last_row[1, 3] = True
  t_out, s_out = _cross_outputs(rng, dec_len, enc_len, width, width)
  r = np.random.default_rng(0)
  t_moved = _with_query_row(t_out, last, 3 * r.normal(size=(2, width)))
  s_moved = _with_query_row(s_out, last, 3 * r.normal(size=(2, width)))

  def earlier_rows(causal, t_out, s_out):
    """Summed row losses of all rows but the last: recipe total minus the
    float64 last rows (row losses are head means; totals are row means)."""
    _, m = R.recipe_loss(_cross_recipe(pairs=("qq",), causal=causal), t_out,
                         s_out, b, 0)
    t, s = t_out.decoder_cross[0].query, s_out.decoder_cross[0].query
    np.testing.assert_allclose(
        m["loss/decoder_cross"], ref.relation_kl(t, t, s, s, 2, dec, dec, causal=causal),
        rtol=1e-5)
    last_rows = ref.relation_kl(t, t, s, s, 2, last_row, dec, causal=causal)
    return float(m["loss/decoder_cross"]) * dec.sum() - last_rows * last_row.sum()

  before = earlier_rows(True, t_out, s_out)
  assert before > 0.1
  np.testing.assert_allclose(earlier_rows(True, t_moved, s_moved), before, rtol=1e-5)
  # Bidirectional relations (causal=False) would match earlier rows against
  # the future position: the same change moves them.
  assert abs(earlier_rows(False, t_moved, s_moved)
             - earlier_rows(False, t_out, s_out)) > 1e-2


def test_cross_pairs_are_a_gin_setting_and_qk_example():
  path = os.path.join(RECIPE_DIR, "examples", "miniend_d_cross_qk.gin")
  gin.parse_config_file(path)
  built = R.recipe_from_gin()
  base = R.get_recipe("miniend_d")
  assert built.terms[2].kind == "decoder_cross" and built.terms[2].pairs == ("qk",)
  # Otherwise miniend_d: only the cross pairs differ.
  assert dataclasses.replace(built, name="miniend_d", terms=built.terms[:2] + (
      dataclasses.replace(built.terms[2], pairs=("qq", "kk", "vv")),)) == base
  # The qk pair is the cross-attention pattern: decoder rows over encoder keys
  # (all of them: not causal), matched against the float64 reference.
  rng = np.random.default_rng(13)
  b, dec, enc = _cross_batch([6, 4], [5, 3], 6, 5)
  t_out, s_out = _cross_outputs(rng, 6, 5, t_width=12, s_width=8)
  recipe = _cross_recipe(pairs=built.terms[2].pairs)
  _, m = R.recipe_loss(recipe, t_out, s_out, b, 0)
  t, s = t_out.decoder_cross[0], s_out.decoder_cross[0]
  np.testing.assert_allclose(
      m["loss/decoder_cross"],
      ref.relation_kl(t.query, t.key, s.query, s.key, 2, dec, enc), rtol=1e-5)


# ---------------------------------------------------------------------------
# AdaptiveSchedule needs a recipe that trains the output layer.
# ---------------------------------------------------------------------------


def test_adaptive_schedule_needs_a_trained_output_layer():
  ada = R.AdaptiveSchedule()
  relation_only = R.Recipe(name="rel", ce_weight=0.0, terms=(
      R.Term("decoder_self", interpolation=ada), R.Term("encoder_self")))
  with pytest.raises(ValueError, match=r"'rel'.*\['decoder_self'\].*AdaptiveSchedule"
                     r".*never trains the student's output layer.*ce_weight > 0"):
    relation_only.resolve(tiny.TEACHER, tiny.STUDENT)
  # A zero-weight logits term trains nothing either.
  with pytest.raises(ValueError, match="never trains"):
    dataclasses.replace(relation_only, terms=relation_only.terms + (
        R.Term("logits", weight=0.0),)).resolve(tiny.TEACHER, tiny.STUDENT)
  # The student's own loss or a logits term make it valid; step ramps are
  # valid anywhere.
  dataclasses.replace(relation_only, ce_weight=0.5).resolve(tiny.TEACHER, tiny.STUDENT)
  dataclasses.replace(relation_only, terms=relation_only.terms + (
      R.Term("logits"),)).resolve(tiny.TEACHER, tiny.STUDENT)
  R.get_recipe("miniend_e_interpolated").resolve(
      tiny.DEEP, tiny.config(num_heads=4, d_kv=16))
  # The gin file's documented way to use it.
  gin.parse_config_file(os.path.join(RECIPE_DIR, "miniend_e_interpolated.gin"))
  gin.parse_config([
      "miniend_e_interpolated/dec_self/Term.interpolation = @AdaptiveSchedule()",
      "miniend_e_interpolated/enc_self/Term.interpolation = @AdaptiveSchedule()"])
  cfgs = (tiny.DEEP, tiny.config(num_heads=4, d_kv=16))
  with pytest.raises(ValueError, match="never trains"):
    R.recipe_from_gin().resolve(*cfgs)
  gin.parse_config(["miniend_e_interpolated/Recipe.ce_weight = 1.0"])
  resolved = R.recipe_from_gin().resolve(*cfgs)
  assert all(isinstance(t.interpolation, R.AdaptiveSchedule) for t in resolved.terms)
