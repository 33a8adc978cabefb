"""The named recipes (`RECIPES`): the paper's objectives and baselines, by name.

They follow the paper's Figure 1 and poster: each paper row is its own
objective, and the prior-method baselines are carried over unchanged (as if
T5 were a decoder-only LM), never a MiniEnD objective under another name:

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
"""

from __future__ import annotations

import gin

from miniend_jax.distill.recipe import GIN_MODULE, Recipe, Term
from miniend_jax.distill.schedules import LinearRamp

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


# Registered, not decorated: Python calls are unaffected by gin bindings.
gin.register(get_recipe, module=GIN_MODULE)
