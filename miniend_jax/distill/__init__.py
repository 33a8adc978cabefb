"""Distillation objectives: pure losses and configurable recipes."""

from miniend_jax.distill.hidden import hidden_mse
from miniend_jax.distill.logits import CrossEntropy, logits_kl, span_corruption_loss
from miniend_jax.distill.named import RECIPES, get_recipe, recipe_from_gin
from miniend_jax.distill.objective import recipe_loss
from miniend_jax.distill.recipe import (
    ATTENTION_KINDS,
    HIDDEN_KINDS,
    PAIRS,
    TERM_KINDS,
    Recipe,
    Term,
)
from miniend_jax.distill.relations import attention_kl, relation_kl
from miniend_jax.distill.schedules import (
    AdaptiveSchedule,
    ConstantSchedule,
    CosineRamp,
    LinearRamp,
)

__all__ = [
    "ATTENTION_KINDS", "HIDDEN_KINDS", "PAIRS", "RECIPES", "TERM_KINDS",
    "AdaptiveSchedule", "ConstantSchedule", "CosineRamp", "CrossEntropy",
    "LinearRamp", "Recipe", "Term", "attention_kl", "get_recipe", "hidden_mse",
    "logits_kl", "recipe_from_gin", "recipe_loss", "relation_kl",
    "span_corruption_loss",
]
