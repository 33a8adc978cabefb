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

The named recipes (`RECIPES`) follow the paper's Figure 1 and poster: each
paper row is its own objective, and the prior-method baselines are carried
over unchanged (as if T5 were a decoder-only LM), never a MiniEnD objective
under another name:

  recipe              terms                                      paper row
  ------------------  -----------------------------------------  ----------------
  scratch             (student span corruption only)             from scratch
  kd_logits           logits                                     MlmKD
  minilm              decoder_self                               MiniLM
  kd_logits_minilm    logits, decoder_self                       MlmKD + MiniLM
    (alias: implicit)                                            = "implicit" path
  miniend_d           logits, decoder_self, decoder_cross        MiniEnD-D
  miniend_d_nologit   decoder_self, decoder_cross                MiniEnD-D w/o logits
  miniend_e           logits, decoder_self, encoder_self         MiniEnD-E
  miniend_e_nologit   decoder_self, encoder_self                 MiniEnD-E w/o logits
    (alias: minilm_encdec, MiniLM on both stacks: our name, not a paper row)
  miniend_e_interpolated  miniend_e_nologit, teacher layer -4,   3B teacher,
                      64 relation heads, interpolated targets    interpolated
  hidden_mse          encoder_hidden, decoder_hidden             (TinyBERT-style)

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

Interpolated distillation (our reading of the paper's term; it publishes no
formula). Any relation or logits term may carry an `interpolation` schedule
a(step), where `step` is the optimizer update count (not the micro-batch
count under gradient accumulation); its target becomes `softmax(a *
teacher_scores + (1 - a) * stop_gradient(student_scores))`, the scores mixed
before the softmax (TAID-style for logits, the same on relation scores), so
the update's direction, not only its size, changes with a (see
`losses`). a = 1 is plain distillation, a = 0 trains nothing. Hidden-state
terms take no schedule: an MSE toward `a * teacher + (1 - a) * student` only
scales its gradient by a. The schedules are constant, linear and cosine
ramps in the step, and `AdaptiveSchedule`, which sets a from how close the
student already is to the teacher (see its docstring; `Recipe.resolve`
rejects it in recipes that never train the student's output layer). A teacher-assistant chain (3B -> large ->
student) is two runs of the same recipe: first distil the assistant from the
3B teacher, then use the assistant's checkpoint as the teacher of the second
run. Nothing in a recipe depends on which model is the teacher, only on the
two configs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import gin
import jax
import jax.numpy as jnp

from miniend_jax.distill import losses

Array = jax.Array

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
_GIN_MODULE = "miniend_jax.distill"


# ---------------------------------------------------------------------------
# Interpolation schedules: a(step) in [0, 1] as a float32 jnp scalar.
# ---------------------------------------------------------------------------


def _check_unit_interval(owner: str, **values: float) -> None:
  for name, value in values.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{owner}.{name} must be in [0, 1]; got {value}.")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
  """a(step) = value."""

  value: float = 1.0

  needs_losses = False

  def __post_init__(self):
    _check_unit_interval("ConstantSchedule", value=self.value)

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del step, student_loss, teacher_loss
    return jnp.asarray(self.value, jnp.float32)


def _ramp_fraction(step, start_step: int, end_step: int) -> Array:
  step = jnp.asarray(step, jnp.float32)
  return jnp.clip((step - start_step) / float(end_step - start_step), 0.0, 1.0)


def _check_ramp(owner, start_value, end_value, start_step, end_step):
  _check_unit_interval(owner, start_value=start_value, end_value=end_value)
  if not 0 <= start_step < end_step:
    raise ValueError(f"{owner} needs 0 <= start_step < end_step; got "
                     f"start_step={start_step}, end_step={end_step}.")


@dataclasses.dataclass(frozen=True)
class LinearRamp:
  """a goes linearly from `start_value` (at `start_step`) to `end_value`
  (at `end_step`), constant outside. Steps count optimizer updates."""

  start_value: float = 0.0
  end_value: float = 1.0
  start_step: int = 0
  end_step: int = 10_000

  needs_losses = False

  def __post_init__(self):
    _check_ramp(type(self).__name__, self.start_value, self.end_value,
                self.start_step, self.end_step)

  def _shape(self, frac):
    return frac

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del student_loss, teacher_loss
    frac = _ramp_fraction(step, self.start_step, self.end_step)
    return self.start_value + (self.end_value - self.start_value) * self._shape(frac)


@dataclasses.dataclass(frozen=True)
class CosineRamp(LinearRamp):
  """Like `LinearRamp` with a half-cosine shape: slow at both ends."""

  def _shape(self, frac):
    return 0.5 * (1.0 - jnp.cos(math.pi * frac))


@dataclasses.dataclass(frozen=True)
class AdaptiveSchedule:
  """a = clip((teacher_loss / student_loss) ** power, min_value, max_value).

  Choice: the losses are the teacher's and the student's span-corruption
  cross-entropies on the current batch (stop-gradient). While the student is
  far from the teacher (early training, or a 3B teacher far above a small
  student) its loss is much larger, a is small and the target stays close to
  what the student can already represent; as the student catches up, a -> 1
  and the target becomes the teacher. Unlike a running estimate (e.g. TAID's
  momentum update) this needs no state carried between steps, so it stays a
  pure function inside the jitted step and survives checkpoint restarts
  unchanged. `recipe_loss` computes both losses when a term uses it.

  The student's cross-entropy only measures progress if the recipe trains
  the student's output layer, through a logits term or `Recipe.ce_weight >
  0`. A relation-only recipe with `ce_weight=0` leaves the output layer
  untouched, its cross-entropy stays near its initial value and a would
  never leave its starting level, so `Recipe.resolve` rejects that
  combination (use a step ramp there, or add a logits term / the student's
  own loss).
  """

  min_value: float = 0.0
  max_value: float = 1.0
  power: float = 1.0

  needs_losses = True

  def __post_init__(self):
    _check_unit_interval("AdaptiveSchedule", min_value=self.min_value,
                         max_value=self.max_value)
    if self.min_value > self.max_value:
      raise ValueError("AdaptiveSchedule needs min_value <= max_value; got "
                       f"{self.min_value} > {self.max_value}.")
    if not self.power > 0:
      raise ValueError(f"AdaptiveSchedule.power must be > 0; got {self.power}.")

  def __call__(self, step, *, student_loss=None, teacher_loss=None) -> Array:
    del step
    if student_loss is None or teacher_loss is None:
      raise ValueError("AdaptiveSchedule needs student_loss and teacher_loss.")
    student_loss = jax.lax.stop_gradient(jnp.asarray(student_loss, jnp.float32))
    teacher_loss = jax.lax.stop_gradient(jnp.asarray(teacher_loss, jnp.float32))
    ratio = teacher_loss / jnp.maximum(student_loss, 1e-6)
    return jnp.clip(ratio ** self.power, self.min_value, self.max_value)


Schedule = Union[ConstantSchedule, LinearRamp, CosineRamp, AdaptiveSchedule]
_SCHEDULE_TYPES = (ConstantSchedule, LinearRamp, CosineRamp, AdaptiveSchedule)


# ---------------------------------------------------------------------------
# Terms and recipes.
# ---------------------------------------------------------------------------


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
      (relation and logits terms; see the module docstring).
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
        self.interpolation, _SCHEDULE_TYPES):
      raise ValueError(f"{where}: interpolation must be one of "
                       f"{[t.__name__ for t in _SCHEDULE_TYPES]}; got "
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
  from miniend_jax.model.t5 import layer_index  # pylint: disable=import-outside-toplevel
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
    from miniend_jax.model.t5 import Taps  # Lazy: keeps losses model-free.

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


# ---------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------


def _logits(out):
  """A model output's logits: formed, or its head's operands for the losses to
  form chunk by chunk (`T5(...)(..., project_logits=False)`)."""
  if out.logits is not None:
    return out.logits
  return losses.ProjectedLogits(out.head_hidden, out.head_kernel)


def _tap(out, kind: str, layer: int, side: str):
  taps = getattr(out, kind)
  if layer not in taps:
    raise ValueError(
        f"The {side} output has no {kind} tap for layer {layer} (it has "
        f"{sorted(taps)}); run the {side} with taps from "
        "recipe.required_taps(teacher_cfg, student_cfg).")
  return taps[layer]


def _relation_operands(term: Term, pair: str, teacher_tap, student_tap):
  """(teacher a, teacher b, student a, student b, row side, key side)."""
  first = {"q": "query", "k": "key", "v": "value"}[pair[0]]
  second = {"q": "query", "k": "key", "v": "value"}[pair[1]]
  # Which positions the a-rows and b-keys range over. Only cross-attention
  # mixes sides: its queries live on the decoder, its keys/values on the
  # encoder output.
  if term.kind == "encoder_self":
    row_side = key_side = "encoder"
  elif term.kind == "decoder_self":
    row_side = key_side = "decoder"
  else:
    side_of = {"query": "decoder", "key": "encoder", "value": "encoder"}
    row_side, key_side = side_of[first], side_of[second]
  return (getattr(teacher_tap, first), getattr(teacher_tap, second),
          getattr(student_tap, first), getattr(student_tap, second),
          row_side, key_side)


def recipe_loss(
    recipe: Recipe,
    teacher_out,
    student_out,
    batch: Mapping[str, Any],
    step,
    extra_params: Optional[Mapping[str, Any]] = None,
    *,
    chunk_size: Optional[int] = losses.DEFAULT_CHUNK_SIZE,
) -> tuple[Array, dict[str, Array]]:
  """Total loss of a recipe and one metric per term.

  Args:
    recipe: a recipe already passed through `Recipe.resolve` (so layer indices
      match the keys of the model outputs).
    teacher_out: the teacher's `T5Output` with `required_taps` (may be None
      when `recipe.needs_teacher` is False).
    student_out: the student's `T5Output` with `required_taps`. Either output
      may carry its logits or, from `project_logits=False`, its head's
      operands (the losses then never form [batch, length, vocab] whole).
    batch: `encoder_input_tokens` [batch, in_len] (0 = padding),
      `decoder_target_tokens` [batch, tgt_len] (0 = padding), optional
      `decoder_loss_weights` [batch, tgt_len] (default: targets > 0), optional
      `encoder_segment_ids` / `decoder_segment_ids` for packed examples.
    step: the optimizer update count (int scalar; under gradient
      accumulation every micro-batch of one update gets the same step), for
      interpolation schedules.
    extra_params: `Recipe.init_extra_params` output (hidden-state terms).
    chunk_size: sequence positions per chunk of the vocabulary-sized losses
      (`losses.chunk_positions` sizes it from the rows each device holds).

  Returns:
    (total float32 scalar, metrics) with `loss/<label>` per term (unweighted),
    `loss/<label>/<pair>` for relation terms with several pairs,
    `interpolation/<label>` for interpolated terms,
    `loss/span_corruption`, `loss/z_loss`, `loss/total`, and
    `teacher/span_corruption` when an adaptive schedule needed it.
  """
  if not recipe.is_resolved:
    raise ValueError(
        f"Recipe {recipe.name!r} is not resolved: call "
        "recipe.resolve(teacher_cfg, student_cfg) once, outside jit, and pass "
        "the result (it fixes layer indices and relation heads).")
  if recipe.needs_teacher and teacher_out is None:
    raise ValueError(f"Recipe {recipe.name!r} needs the teacher's outputs.")
  extra_params = extra_params or {}
  encoder_tokens = jnp.asarray(batch["encoder_input_tokens"])
  targets = jnp.asarray(batch["decoder_target_tokens"])
  masks = {"encoder": encoder_tokens > 0, "decoder": targets > 0}
  segments = {"encoder": batch.get("encoder_segment_ids"),
              "decoder": batch.get("decoder_segment_ids")}
  loss_weights = batch.get("decoder_loss_weights")
  if loss_weights is None:
    loss_weights = masks["decoder"]

  metrics = {}
  student_ce = losses.span_corruption_loss(_logits(student_out), targets,
                                           loss_weights, z_loss=recipe.z_loss,
                                           chunk_size=chunk_size)
  if recipe.ce_weight == 0:
    # Reported, but no gradient: parameters only the cross-entropy would
    # train (e.g. the output layer under relation-only recipes) stay exactly
    # untouched.
    student_ce = jax.tree.map(jax.lax.stop_gradient, student_ce)
  metrics["loss/span_corruption"] = student_ce.cross_entropy
  metrics["loss/z_loss"] = student_ce.z_loss
  total = recipe.ce_weight * student_ce.total

  teacher_ce = None
  if recipe.needs_teacher_loss:
    teacher_ce = losses.span_corruption_loss(
        jax.lax.stop_gradient(_logits(teacher_out)), targets, loss_weights,
        chunk_size=chunk_size).cross_entropy
    metrics["teacher/span_corruption"] = teacher_ce

  for term in recipe.terms:
    alpha = None
    if term.interpolation is not None:
      alpha = term.interpolation(
          step, student_loss=student_ce.cross_entropy, teacher_loss=teacher_ce)
      metrics[f"interpolation/{term.label}"] = alpha

    if term.kind == "logits":
      value = losses.logits_kl(_logits(teacher_out), _logits(student_out),
                               loss_weights, term.temperature,
                               interpolation=alpha, chunk_size=chunk_size)
    elif term.kind in HIDDEN_KINDS:
      side = term.kind.split("_")[0]
      if term.label not in extra_params:
        raise ValueError(
            f"Term {term.label!r} needs its projection: pass extra_params="
            "recipe.init_extra_params(...) (trained with the student).")
      value = losses.hidden_mse(
          _tap(teacher_out, term.kind, term.teacher_layer, "teacher"),
          _tap(student_out, term.kind, term.student_layer, "student"),
          extra_params[term.label]["kernel"], masks[side])
    else:
      teacher_tap = _tap(teacher_out, term.kind, term.teacher_layer, "teacher")
      student_tap = _tap(student_out, term.kind, term.student_layer, "student")
      value = 0.0
      for pair in term.pairs:
        ta, tb, sa, sb, row_side, key_side = _relation_operands(
            term, pair, teacher_tap, student_tap)
        use_segments = (segments[row_side] is not None
                        and segments[key_side] is not None)
        # Causality is a property of the decoder's own positions: it applies
        # when both rows and keys are decoder positions (self-attention, and
        # cross-attention's Q-Q), never across to the encoder.
        causal = term.causal and row_side == key_side == "decoder"
        pair_value = losses.relation_kl(
            ta, tb, sa, sb,
            num_relation_heads=term.relation_heads,
            query_mask=masks[row_side], key_mask=masks[key_side],
            causal=causal,
            query_segment_ids=segments[row_side] if use_segments else None,
            key_segment_ids=segments[key_side] if use_segments else None,
            interpolation=alpha)
        if len(term.pairs) > 1:
          metrics[f"loss/{term.label}/{pair}"] = pair_value
        value = value + pair_value
      if term.pair_reduction == "mean":
        value = value / len(term.pairs)
    metrics[f"loss/{term.label}"] = value
    total = total + term.weight * value

  metrics["loss/total"] = total
  return total, metrics


# ---------------------------------------------------------------------------
# Named recipes.
# ---------------------------------------------------------------------------


# Relation-based presets distil the student from the teacher alone
# (ce_weight=0), as MiniLM/MiniLMv2 task-agnostic distillation does; the
# paper does not say whether it adds the student's own span-corruption loss.
# Set `Recipe.ce_weight` (gin or Python) to add it. The rows and their paper
# counterparts are listed in the module docstring.
RECIPES: dict[str, Recipe] = {
    # The student pretrained from scratch: span corruption alone.
    "scratch": Recipe(name="scratch", terms=(), ce_weight=1.0),
    # MlmKD: logit distillation alone (DistilGPT2-style, as for a decoder LM).
    "kd_logits": Recipe(name="kd_logits", terms=(Term("logits"),), ce_weight=0.0),
    # MiniLM(v2) carried over unchanged, as if T5 were a decoder-only LM: the
    # last decoder layer's self-attention Q/K/V relations on D_Z.
    "minilm": Recipe(name="minilm", ce_weight=0.0, terms=(Term("decoder_self"),)),
    # MlmKD + MiniLM, which is the paper's "implicit" objective: logits and
    # decoder self-attention on D_Z, with no explicit encoder-decoder term.
    "kd_logits_minilm": Recipe(
        name="kd_logits_minilm", ce_weight=0.0,
        terms=(Term("logits"), Term("decoder_self"))),
    # TinyBERT-style hidden states through learned projections (not a paper
    # row).
    "hidden_mse": Recipe(
        name="hidden_mse", ce_weight=0.0,
        terms=(Term("encoder_hidden"), Term("decoder_hidden"))),
    # MiniEnD-D: + the decoder's cross-attention (causal Q-Q over D_Z, K-K and
    # V-V over the encoder outputs D_E).
    "miniend_d": Recipe(
        name="miniend_d", ce_weight=0.0,
        terms=(Term("logits"), Term("decoder_self"), Term("decoder_cross"))),
    "miniend_d_nologit": Recipe(
        name="miniend_d_nologit", ce_weight=0.0,
        terms=(Term("decoder_self"), Term("decoder_cross"))),
    # MiniEnD-E: + the encoder's self-attention relations on D_X.
    "miniend_e": Recipe(
        name="miniend_e", ce_weight=0.0,
        terms=(Term("logits"), Term("decoder_self"), Term("encoder_self"))),
    "miniend_e_nologit": Recipe(
        name="miniend_e_nologit", ce_weight=0.0,
        terms=(Term("decoder_self"), Term("encoder_self"))),
    # For a 3B (24+24 layer) teacher: MiniLMv2 reads an upper-middle layer of
    # large teachers (the 21st of 24, index -4) with 64 relation heads, which
    # divide the widths of T5 small/base/large/3B and of 384/512-wide
    # students. Interpolated targets (our reading): softmax(a * teacher +
    # (1 - a) * stop_gradient(student) relation scores), a ramping from 0.2
    # to 1 over the first 10k optimizer updates (ours). (A step ramp: this
    # recipe trains no output layer, so AdaptiveSchedule would be rejected.)
    "miniend_e_interpolated": Recipe(
        name="miniend_e_interpolated", ce_weight=0.0,
        terms=tuple(
            Term(kind, teacher_layer=-4, relation_heads=64,
                 interpolation=LinearRamp(start_value=0.2, end_value=1.0,
                                          start_step=0, end_step=10_000))
            for kind in ("decoder_self", "encoder_self"))),
}

# Second names of a recipe: the very same object (and `name`), never a copy,
# so that no objective exists twice under different names.
ALIASES: dict[str, str] = {
    # The paper calls logits + decoder self-attention the "implicit" path.
    "implicit": "kd_logits_minilm",
    # MiniLM on both stacks (encoder and decoder self-attention relations) is
    # our own variant, not a paper row; by construction it is the MiniEnD-E
    # objective without logits.
    "minilm_encdec": "miniend_e_nologit",
}
RECIPES.update({alias: RECIPES[target] for alias, target in ALIASES.items()})


def get_recipe(name: str) -> Recipe:
  """The named recipe (see `RECIPES`), e.g. from `--recipe=miniend_d`.

  An alias (`ALIASES`, e.g. `implicit`) returns its target recipe itself,
  whose `name` is the target's.
  """
  try:
    return RECIPES[name]
  except KeyError:
    raise ValueError(f"Unknown recipe {name!r}; choose one of "
                     f"{sorted(RECIPES)} or build a Recipe in gin.") from None


def recipe_from_gin(macro: str = "RECIPE") -> Recipe:
  """The recipe a parsed gin config selects through the macro `macro`.

  Every `gin_configs/recipes/<name>.gin` binds `RECIPE = @<name>/Recipe()`,
  except the aliases' files, which bind the target's preset name (`RECIPE =
  'kd_logits_minilm'`); a run config may also bind a preset name.
  """
  try:
    value = gin.query_parameter(f"{macro}/gin.macro.value")
  except ValueError:
    raise ValueError(
        f"No gin macro {macro!r}: include a gin_configs/recipes/*.gin file or "
        f"bind {macro} = @Recipe() / a preset name.") from None
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  if isinstance(value, str):
    value = get_recipe(value)
  if not isinstance(value, Recipe):
    raise ValueError(f"Gin macro {macro} must be a Recipe or a preset name; "
                     f"got {value!r}.")
  return value


# Registered, not decorated: Python calls are unaffected by gin bindings, and
# gin builds instances of these very classes (so they compare equal).
for _obj in (Term, Recipe, ConstantSchedule, LinearRamp, CosineRamp,
             AdaptiveSchedule, get_recipe):
  gin.register(_obj, module=_GIN_MODULE)
del _obj
