"""Distillation recipes: which teacher/student tensors are compared, and how.

A `Recipe` is a list of `Term`s plus the weight of the student's own
span-corruption loss. Each `Term` names one comparison:

  kind            tensors compared                         masks
  --------------  ---------------------------------------  --------------------
  logits          output distributions over the vocab      decoder loss weights
  encoder_self    encoder self-attention Q/K/V relations   encoder tokens
  decoder_self    decoder self-attention Q/K/V relations   decoder targets, causal
  decoder_cross   decoder cross-attention relations:        qq: decoder, causal;
                  Q from the decoder, K/V projections       kk, vv: encoder;
                  of the encoder output                     qk: decoder x encoder
  encoder_hidden  encoder block output (TinyBERT MSE)      encoder tokens
  decoder_hidden  decoder block output (TinyBERT MSE)      decoder targets

Relation terms compare MiniLMv2 multi-head relations for each requested pair:
`qq`, `kk`, `vv` (self-relations of the queries, keys, values) and `qk` (the
attention pattern itself, without position bias). A term's loss is the mean
of its pair losses (`Term.pair_reduction="sum"` adds them instead); the
recipe's total is the weighted sum of its terms plus `ce_weight` times the
student's span-corruption loss.

Settings the paper does not fix. The paper (abstract, Figure 1, poster)
names the terms of each path, not their details; every such detail is a
setting, and its default says where it comes from:

  setting                     default                     source
  --------------------------  --------------------------  ---------------------
  Term.pairs                  qq, kk, vv                  MiniLMv2
  Term.pair_reduction         'mean' of the pair losses   first author's code
  Term.relation_heads         None: the student's heads   ours
  Term.teacher_layer /        -1 (last layer)             MiniLM / MiniLMv2
    student_layer                                         (base-size teachers)
  Term.causal                 True for decoder relations  ours
                              (self, cross Q-Q)
  Term.weight                 1.0 for every term          ours
  Term.temperature            1.0 (logits)                ours
  Recipe.ce_weight            0.0: no span-corruption     MiniLMv2 (relation
                              loss beside distillation    loss alone)

MiniLMv2 uses 48 relation heads for base-size teachers and 64 for large
ones; the first author's related public code (MiniMoE, BERT) uses 32, the
mean of the Q-Q, K-K and V-V losses, and the last layer. The sum (the
previous default here) weighs a three-pair relation term 3x against a
logits term. `miniend_e_interpolated` reads MiniLMv2's upper-middle layer
(-4) with its 64 heads; its ramp is ours.

Cross-attention and causality. The paper (poster) defines MiniEnD-D's
L_cross_attn(D_Z, D_E) by the decoder's cross-attention: its queries come from
the decoder inputs D_Z, its keys and values from the encoder outputs D_E;
with MiniLMv2 relations that is a Q-Q relation over decoder positions and K-K,
V-V relations over encoder positions (`pairs=("qq", "kk", "vv")`, the
default). It does not say whether the Q-Q relation is causal. Ours is: a
relation whose rows and keys are both decoder positions (every pair of
`decoder_self`, the `qq` pair of `decoder_cross`) lets row i see positions
j <= i only, as the decoder does at inference, so the student is never
matched on relations to tokens it cannot see, and cross Q-Q agrees with
decoder self-attention's Q-Q. Relations over encoder positions
(`encoder_self`; cross `kk`, `vv`, with the encoder padding mask) are
bidirectional, and so is the cross `qk` pattern (a decoder position sees
every encoder position). `Term.causal=False` makes decoder relations
bidirectional. The cross pairs are a setting (`Term.pairs`, gin-bindable):
`pairs=("qk",)` compares the cross-attention distribution itself,
softmax(Q_dec K_enc^T / sqrt(d)) per relation head, teacher against student
(see `gin_configs/recipes/examples/miniend_d_cross_qk.gin`). With relation
heads equal to the model's heads this is T5's cross-attention pattern up to
the 1/sqrt(d) temperature (T5 does not scale its scores).

The named recipes are in `distill.named` (`RECIPES`, `get_recipe`), the loss
of a recipe in `distill.objective` (`recipe_loss`), interpolation schedules
in `distill.schedules`. A teacher-assistant chain (3B -> large -> student) is
two runs of the same recipe: first distil the assistant from the 3B teacher,
then use the assistant's checkpoint as the teacher of the second run. Nothing
in a recipe depends on which model is the teacher, only on the two configs.

Everything is plain frozen dataclasses usable from Python; the same classes
are registered with gin (without changing their Python behaviour), so a gin
file builds a recipe (see `gin_configs/recipes/*.gin`):

    RECIPE = @miniend_d/Recipe()
    miniend_d/Recipe.terms = [@miniend_d/logits/Term(), ...]
    miniend_d/logits/Term.kind = 'logits'

Typical use by a trainer:

    recipe = get_recipe("miniend_d").resolve(teacher_cfg, student_cfg)  # errors here
    teacher_taps, student_taps = recipe.required_taps(teacher_cfg, student_cfg)
    extra = recipe.init_extra_params(rng, teacher_cfg, student_cfg)  # train these
    ... inside the jitted step:
    total, metrics = recipe_loss(recipe, teacher_out, student_out, batch, step,
                                 extra)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp

# The schedules are re-exported too: users import them from here.
from miniend_jax.distill.schedules import (
    SCHEDULE_TYPES, AdaptiveSchedule, ConstantSchedule, CosineRamp, LinearRamp,
    Schedule)
from miniend_jax.model.config import Taps, layer_index

ATTENTION_KINDS = ("encoder_self", "decoder_self", "decoder_cross")
HIDDEN_KINDS = ("encoder_hidden", "decoder_hidden")
TERM_KINDS = ("logits",) + ATTENTION_KINDS + HIDDEN_KINDS
PAIRS = ("qq", "kk", "vv", "qk")
DEFAULT_PAIRS = ("qq", "kk", "vv")  # MiniLMv2
PAIR_REDUCTIONS = ("mean", "sum")
# Kinds with relations over decoder positions, which may (and by default do)
# respect the decoder's causality.
CAUSAL_KINDS = ("decoder_self", "decoder_cross")

# Gin module under which the classes below are registered.
GIN_MODULE = "miniend_jax.distill"


@dataclasses.dataclass(frozen=True)
class Term:
  """One distillation loss term.

  Attributes:
    kind: which tensors, one of `TERM_KINDS`.
    pairs: relation pairs for attention kinds, a subset of `PAIRS`; defaults
      to MiniLMv2's ("qq", "kk", "vv"). Must be empty for other kinds.
    pair_reduction: how an attention term combines its pair losses: "mean"
      (the default, as the first author's related code) or "sum".
    teacher_layer: teacher layer (block index; negative counts from the end)
      for attention and hidden kinds.
    student_layer: student layer, likewise.
    weight: multiplier of the term in the total loss.
    relation_heads: relation heads for attention kinds; None (ours) uses the
      student's attention head count (resolved by `Recipe.resolve`); MiniLMv2
      uses 48 / 64 (base / large teachers). Must divide both models'
      attention widths (num_heads * d_kv).
    temperature: softmax temperature of a logits term.
    causal: restrict relations over decoder positions (rows and keys both on
      the decoder) to earlier keys. None means True for decoder_self and
      decoder_cross (the decoder only sees the past), False otherwise. In
      decoder_cross it applies to the `qq` pair only: `kk`/`vv` range over
      encoder positions and `qk` maps decoder rows onto encoder keys, which
      the decoder sees in full.
    interpolation: optional schedule a(step) for interpolated targets
      (relation and logits terms; see `distill.schedules`).
    name: metric label; defaults to `kind`. Must be unique in a recipe.
  """

  kind: str
  pairs: Optional[Sequence[str]] = None
  pair_reduction: str = "mean"
  teacher_layer: int = -1
  student_layer: int = -1
  weight: float = 1.0
  relation_heads: Optional[int] = None
  temperature: float = 1.0
  causal: Optional[bool] = None
  interpolation: Optional[Schedule] = None
  name: Optional[str] = None

  def __post_init__(self):
    where = f"Term(kind={self.kind!r})"
    if self.kind not in TERM_KINDS:
      raise ValueError(f"{where}: unknown kind; use one of {TERM_KINDS}.")
    if self.kind in ATTENTION_KINDS:
      pairs = DEFAULT_PAIRS if self.pairs is None else self.pairs
      if isinstance(pairs, str):
        pairs = (pairs,)
      pairs = tuple(pairs)
      bad = [p for p in pairs if p not in PAIRS]
      if bad or not pairs or len(set(pairs)) != len(pairs):
        raise ValueError(f"{where}: pairs={pairs} must be a non-empty list of "
                         f"distinct values from {PAIRS}.")
    else:
      if self.pairs:
        raise ValueError(f"{where}: pairs only apply to attention terms "
                         f"{ATTENTION_KINDS}; remove pairs={self.pairs}.")
      pairs = ()
    object.__setattr__(self, "pairs", pairs)
    if self.pair_reduction not in PAIR_REDUCTIONS:
      raise ValueError(f"{where}: pair_reduction={self.pair_reduction!r}; use "
                       f"one of {PAIR_REDUCTIONS}.")
    if self.kind not in ATTENTION_KINDS and self.pair_reduction != "mean":
      raise ValueError(f"{where}: pair_reduction only applies to attention "
                       "terms.")
    if self.kind == "logits" and (self.teacher_layer != -1 or
                                  self.student_layer != -1):
      raise ValueError(f"{where}: logits have no layer; remove teacher_layer/"
                       "student_layer.")
    if self.kind not in ATTENTION_KINDS and self.relation_heads is not None:
      raise ValueError(f"{where}: relation_heads only applies to attention "
                       "terms.")
    if self.relation_heads is not None and not (
        isinstance(self.relation_heads, int) and self.relation_heads > 0):
      raise ValueError(f"{where}: relation_heads must be a positive integer; "
                       f"got {self.relation_heads!r}.")
    for name in ("teacher_layer", "student_layer"):
      if not isinstance(getattr(self, name), int):
        raise ValueError(f"{where}: {name} must be an int; got "
                         f"{getattr(self, name)!r}.")
    if not self.weight >= 0:
      raise ValueError(f"{where}: weight must be >= 0; got {self.weight}.")
    if self.kind != "logits" and self.temperature != 1.0:
      raise ValueError(f"{where}: temperature only applies to logits terms.")
    if not self.temperature > 0:
      raise ValueError(f"{where}: temperature must be > 0; got "
                       f"{self.temperature}.")
    if self.causal is None:
      object.__setattr__(self, "causal", self.kind in CAUSAL_KINDS)
    elif self.causal and self.kind not in CAUSAL_KINDS:
      raise ValueError(f"{where}: causal=True only applies to {CAUSAL_KINDS} "
                       "(relations over encoder positions are bidirectional).")
    if self.interpolation is not None and self.kind in HIDDEN_KINDS:
      raise ValueError(
          f"{where}: hidden-state terms take no interpolation: an MSE toward "
          "a * teacher + (1 - a) * stop_gradient(student) only scales the "
          "gradient by a. Use `weight` (or a learning-rate schedule) instead.")
    if self.interpolation is not None and not isinstance(
        self.interpolation, SCHEDULE_TYPES):
      raise ValueError(f"{where}: interpolation must be one of "
                       f"{[t.__name__ for t in SCHEDULE_TYPES]}; got "
                       f"{self.interpolation!r}.")

  @property
  def label(self) -> str:
    """The name used in metrics and in `extra_params`."""
    return self.name or self.kind

  @property
  def uses_layers(self) -> bool:
    return self.kind != "logits"


def _attention_width(cfg) -> int:
  return cfg.num_heads * cfg.d_kv


def _resolve_layer(term: Term, side: str, cfg) -> int:
  layer = getattr(term, f"{side}_layer")
  return layer_index(cfg, term.kind, layer, f"Term {term.label!r} {side}_layer={layer}",
                     owner=f"the {side}")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A distillation objective: loss terms plus the student's own loss.

  Attributes:
    terms: the distillation terms (unique labels).
    ce_weight: weight of the student's span-corruption cross-entropy. When 0
      the cross-entropy is still reported as a metric but sends no gradient.
    z_loss: z-loss coefficient of that cross-entropy (t5x default 1e-4).
    name: recipe name, for logs.
  """

  terms: Sequence[Term] = ()
  ce_weight: float = 1.0
  z_loss: float = 1e-4
  name: str = "custom"

  def __post_init__(self):
    terms = tuple(self.terms)
    object.__setattr__(self, "terms", terms)
    for t in terms:
      if not isinstance(t, Term):
        raise ValueError(f"Recipe {self.name!r}: terms must be Term objects; "
                         f"got {t!r}.")
    labels = [t.label for t in terms]
    duplicates = sorted({l for l in labels if labels.count(l) > 1})
    if duplicates:
      raise ValueError(
          f"Recipe {self.name!r}: term labels {duplicates} appear more than "
          "once; give terms of the same kind distinct `name`s.")
    if not self.ce_weight >= 0 or not self.z_loss >= 0:
      raise ValueError(f"Recipe {self.name!r}: ce_weight and z_loss must be "
                       f">= 0; got {self.ce_weight}, {self.z_loss}.")
    if not terms and self.ce_weight == 0:
      raise ValueError(f"Recipe {self.name!r} has no terms and ce_weight=0: "
                       "it would train nothing.")

  @property
  def needs_teacher(self) -> bool:
    """False for `scratch`-like recipes: the trainer can skip the teacher."""
    return bool(self.terms)

  @property
  def needs_teacher_loss(self) -> bool:
    return any(t.interpolation is not None and t.interpolation.needs_losses
               for t in self.terms)

  @property
  def is_resolved(self) -> bool:
    return all(
        t.teacher_layer >= 0 and t.student_layer >= 0
        and (t.kind not in ATTENTION_KINDS or t.relation_heads is not None)
        for t in self.terms if t.uses_layers)

  def resolve(self, teacher_cfg, student_cfg) -> "Recipe":
    """Checks the recipe against two model configs; returns it made concrete.

    Layer indices become non-negative and `relation_heads=None` becomes the
    student's head count. Pure Python on the configs: errors surface here,
    before anything is traced or compiled.

    Args:
      teacher_cfg: the teacher's `T5Config` (may be None when the recipe has
        no terms).
      student_cfg: the student's `T5Config`.

    Raises:
      ValueError: a layer either model lacks, relation heads that do not
        divide a width, different vocabularies for a logits term, an
        `AdaptiveSchedule` in a recipe that never trains the output layer.
    """
    if self.terms and teacher_cfg is None:
      raise ValueError(f"Recipe {self.name!r} distils from a teacher; pass "
                       "the teacher's config.")
    self._check_adaptive_schedules()
    resolved = []
    for term in self.terms:
      changes = {}
      if term.kind == "logits":
        if teacher_cfg.vocab_size != student_cfg.vocab_size:
          raise ValueError(
              f"Term {term.label!r}: teacher vocab_size="
              f"{teacher_cfg.vocab_size} != student vocab_size="
              f"{student_cfg.vocab_size}. Logit distillation compares "
              "distributions over one vocabulary: give the student the "
              "teacher's vocabulary (and vocab_size), or drop the logits term.")
      if term.uses_layers:
        changes["teacher_layer"] = _resolve_layer(term, "teacher", teacher_cfg)
        changes["student_layer"] = _resolve_layer(term, "student", student_cfg)
      if term.kind in ATTENTION_KINDS:
        heads = term.relation_heads or student_cfg.num_heads
        t_width, s_width = (_attention_width(teacher_cfg),
                            _attention_width(student_cfg))
        if t_width % heads or s_width % heads:
          common = [h for h in range(1, math.gcd(t_width, s_width) + 1)
                    if math.gcd(t_width, s_width) % h == 0]
          raise ValueError(
              f"Term {term.label!r}: relation_heads={heads} must divide both "
              f"attention widths (num_heads * d_kv): teacher {t_width}, "
              f"student {s_width}. Set Term.relation_heads to a common "
              f"divisor, e.g. one of {common[-6:]}.")
        changes["relation_heads"] = heads
      resolved.append(dataclasses.replace(term, **changes))
    return dataclasses.replace(self, terms=tuple(resolved))

  def _check_adaptive_schedules(self) -> None:
    adaptive = [t.label for t in self.terms
                if isinstance(t.interpolation, AdaptiveSchedule)]
    trains_output = self.ce_weight > 0 or any(
        t.kind == "logits" and t.weight > 0 for t in self.terms)
    if adaptive and not trains_output:
      raise ValueError(
          f"Recipe {self.name!r}: term(s) {adaptive} use AdaptiveSchedule, "
          "which sets a = teacher CE / student CE, but this recipe never "
          "trains the student's output layer (ce_weight=0 and no logits "
          "term), so the student's CE cannot fall and a would stay at its "
          "starting value. Either set Recipe.ce_weight > 0 or add a logits "
          "Term (then a follows the student's progress), or use a step "
          "schedule (LinearRamp, CosineRamp, ConstantSchedule).")

  def required_taps(self, teacher_cfg, student_cfg):
    """The `Taps` each model must return for this recipe: (teacher, student).

    Only the layers the terms read are requested, so the model computes and
    keeps nothing else. Indices are non-negative.
    """
    recipe = self.resolve(teacher_cfg, student_cfg)
    fields = {"teacher": {}, "student": {}}
    for term in recipe.terms:
      if term.uses_layers:
        for side in fields:
          fields[side].setdefault(term.kind, set()).add(
              getattr(term, f"{side}_layer"))
    make = lambda f: Taps(**{k: tuple(sorted(v)) for k, v in f.items()})
    return make(fields["teacher"]), make(fields["student"])

  def init_extra_params(self, rng, teacher_cfg, student_cfg) -> dict:
    """Student-side parameters the recipe trains besides the student model.

    Hidden-state terms need a learned `[student d_model, teacher d_model]`
    projection (TinyBERT's W_h), initialised LeCun-normal. Train these with
    the student and pass them to `recipe_loss` as `extra_params`.

    Returns:
      `{term label: {"kernel": float32 [d_student, d_teacher]}}`; empty when
      no term needs parameters.
    """
    recipe = self.resolve(teacher_cfg, student_cfg)
    hidden = [t for t in recipe.terms if t.kind in HIDDEN_KINDS]
    init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=1)
    keys = jax.random.split(rng, max(len(hidden), 1))
    return {
        t.label: {"kernel": init(key, (student_cfg.d_model, teacher_cfg.d_model),
                                 jnp.float32)}
        for key, t in zip(keys, hidden)
    }


# Registered, not decorated: Python calls are unaffected by gin bindings, and
# gin builds instances of these very classes (so they compare equal).
for _obj in (Term, Recipe, ConstantSchedule, LinearRamp, CosineRamp,
             AdaptiveSchedule):
  gin.register(_obj, module=GIN_MODULE)
del _obj


# Re-exported: users import these from here. Looked up on first use, since
# `named` and `objective` import this module.
_MOVED = {"RECIPES": "named", "ALIASES": "named", "get_recipe": "named",
          "recipe_from_gin": "named", "recipe_loss": "objective"}


def __getattr__(name: str):
  if name in _MOVED:
    return getattr(importlib.import_module(f"miniend_jax.distill.{_MOVED[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_MOVED))
