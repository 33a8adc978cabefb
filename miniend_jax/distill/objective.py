"""The objective: a resolved recipe's total loss and metrics, one function per
term kind (logits, relations, hidden states) beside the student's own span
corruption.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from miniend_jax.distill.hidden import hidden_mse
from miniend_jax.distill.logits import (
    DEFAULT_CHUNK_SIZE, CrossEntropy, ProjectedLogits, logits_kl,
    span_corruption_loss)
from miniend_jax.distill.recipe import HIDDEN_KINDS, Recipe, Term
from miniend_jax.distill.relations import relation_kl

Array = jax.Array


def _logits(out):
  """A model output's logits: formed, or its head's operands for the losses to
  form chunk by chunk (`T5(...)(..., project_logits=False)`)."""
  if out.logits is not None:
    return out.logits
  return ProjectedLogits(out.head_hidden, out.head_kernel)


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


class _BatchMasks(NamedTuple):
  """What the terms read from a batch.

  Attributes:
    targets: int `[batch, tgt_len]` decoder targets (0 = padding).
    loss_weights: `[batch, tgt_len]` decoder loss weights.
    masks: bool `[batch, len]` valid positions of "encoder" and "decoder".
    segments: int `[batch, len]` segment ids of "encoder" and "decoder", or
      None when the batch is not packed.
  """

  targets: Array
  loss_weights: Array
  masks: dict
  segments: dict


def _batch_masks(batch: Mapping[str, Any]) -> _BatchMasks:
  """The targets, loss weights, masks and segments of a batch (see `recipe_loss`)."""
  encoder_tokens = jnp.asarray(batch["encoder_input_tokens"])
  targets = jnp.asarray(batch["decoder_target_tokens"])
  masks = {"encoder": encoder_tokens > 0, "decoder": targets > 0}
  segments = {"encoder": batch.get("encoder_segment_ids"),
              "decoder": batch.get("decoder_segment_ids")}
  loss_weights = batch.get("decoder_loss_weights")
  if loss_weights is None:
    loss_weights = masks["decoder"]
  return _BatchMasks(targets, loss_weights, masks, segments)


def _span_corruption(recipe: Recipe, teacher_out, student_out, inputs: _BatchMasks,
                     chunk_size, metrics) -> tuple[CrossEntropy, Optional[Array]]:
  """(the student's `CrossEntropy`, the teacher's cross-entropy or None).

  The teacher's is computed only when a schedule needs it (`AdaptiveSchedule`).
  Adds their metrics to `metrics`.
  """
  targets, loss_weights = inputs.targets, inputs.loss_weights
  student_ce = span_corruption_loss(_logits(student_out), targets,
                                    loss_weights, z_loss=recipe.z_loss,
                                    chunk_size=chunk_size)
  if recipe.ce_weight == 0:
    # Reported, but no gradient: parameters only the cross-entropy would
    # train (e.g. the output layer under relation-only recipes) stay exactly
    # untouched.
    student_ce = jax.tree.map(jax.lax.stop_gradient, student_ce)
  metrics["loss/span_corruption"] = student_ce.cross_entropy
  metrics["loss/z_loss"] = student_ce.z_loss

  teacher_ce = None
  if recipe.needs_teacher_loss:
    teacher_ce = span_corruption_loss(
        jax.lax.stop_gradient(_logits(teacher_out)), targets, loss_weights,
        chunk_size=chunk_size).cross_entropy
    metrics["teacher/span_corruption"] = teacher_ce
  return student_ce, teacher_ce


def _logits_term(term: Term, alpha, teacher_out, student_out, inputs: _BatchMasks,
                 chunk_size) -> Array:
  """A logits term: the KL of the two models' output distributions."""
  return logits_kl(_logits(teacher_out), _logits(student_out),
                   inputs.loss_weights, term.temperature,
                   interpolation=alpha, chunk_size=chunk_size)


def _hidden_term(term: Term, teacher_out, student_out, inputs: _BatchMasks,
                 extra_params) -> Array:
  """A hidden-state term: the MSE through the term's learned projection."""
  side = term.kind.split("_")[0]
  if term.label not in extra_params:
    raise ValueError(
        f"Term {term.label!r} needs its projection: pass extra_params="
        "recipe.init_extra_params(...) (trained with the student).")
  return hidden_mse(
      _tap(teacher_out, term.kind, term.teacher_layer, "teacher"),
      _tap(student_out, term.kind, term.student_layer, "student"),
      extra_params[term.label]["kernel"], inputs.masks[side])


def _relation_term(term: Term, alpha, teacher_out, student_out, inputs: _BatchMasks,
                   metrics, mesh_axes) -> Array:
  """A relation term: its pairs' relation KLs, reduced as the term says.

  Adds `loss/<label>/<pair>` to `metrics` when the term has several pairs.
  """
  masks, segments = inputs.masks, inputs.segments
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
    pair_value = relation_kl(
        ta, tb, sa, sb,
        num_relation_heads=term.relation_heads,
        query_mask=masks[row_side], key_mask=masks[key_side],
        causal=causal,
        query_segment_ids=segments[row_side] if use_segments else None,
        key_segment_ids=segments[key_side] if use_segments else None,
        interpolation=alpha, batch_axes=mesh_axes[0], head_axes=mesh_axes[1])
    if len(term.pairs) > 1:
      metrics[f"loss/{term.label}/{pair}"] = pair_value
    value = value + pair_value
  if term.pair_reduction == "mean":
    value = value / len(term.pairs)
  return value


def recipe_loss(
    recipe: Recipe,
    teacher_out,
    student_out,
    batch: Mapping[str, Any],
    step,
    extra_params: Optional[Mapping[str, Any]] = None,
    *,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    mesh_axes: tuple = (None, None),
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
      (`logits.chunk_positions` sizes it from the rows each device holds).
    mesh_axes: under a mesh, the mesh axes that split the batch and the
      projections' heads, so the relation terms can run their TPU kernel per
      shard (`relation_kl`'s batch_axes and head_axes).

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
  inputs = _batch_masks(batch)
  metrics = {}
  student_ce, teacher_ce = _span_corruption(recipe, teacher_out, student_out,
                                            inputs, chunk_size, metrics)
  total = recipe.ce_weight * student_ce.total

  for term in recipe.terms:
    alpha = None
    if term.interpolation is not None:
      alpha = term.interpolation(
          step, student_loss=student_ce.cross_entropy, teacher_loss=teacher_ce)
      metrics[f"interpolation/{term.label}"] = alpha

    if term.kind == "logits":
      value = _logits_term(term, alpha, teacher_out, student_out, inputs,
                           chunk_size)
    elif term.kind in HIDDEN_KINDS:
      value = _hidden_term(term, teacher_out, student_out, inputs, extra_params)
    else:
      value = _relation_term(term, alpha, teacher_out, student_out, inputs,
                             metrics, mesh_axes)
    metrics[f"loss/{term.label}"] = value
    total = total + term.weight * value

  metrics["loss/total"] = total
  return total, metrics
