"""The jitted programs of a run: distillation / training step, eval step, prediction.

`make_distill_step` builds ONE XLA program per step: the teacher's forward
(frozen, no gradients, bf16 by default), the student's forward with the
recipe's taps, the recipe loss, gradients, and the optimizer update, with
explicit input/output shardings and the student state donated. A recipe with
no distillation terms (`scratch`, finetuning) skips the teacher, so the same
step serves pretraining and finetuning.

The step never takes a non-finite update: if the loss or a gradient is NaN/inf
the old state is returned unchanged and `metrics["nonfinite"]` is 1. If finite
gradients overflow the weights (an enormous learning rate), `nonfinite` is 1 as
well; the run loop stops at a reported step and never checkpoints past one, so
the last good checkpoint is always kept.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from miniend_jax.distill.logits import chunk_positions, span_corruption_loss
from miniend_jax.distill.objective import recipe_loss
from miniend_jax.distill.recipe import Recipe
from miniend_jax.model.config import T5Config, Taps, forward_flops
from miniend_jax.model.layers import logical_mesh_axes
from miniend_jax.model.t5 import T5
from miniend_jax.train import decoding, hardware, partitioning
from miniend_jax.train.state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]

# Batch features the model reads; the rest (positions, loss weights) go to the loss.
_MODEL_FEATURES = ("encoder_segment_ids", "decoder_segment_ids")


def _forward(config: T5Config, params, batch: Batch, taps: Taps, *, dropout_rng=None,
             project_logits: bool = True):
  kwargs = {k: batch[k] for k in _MODEL_FEATURES if k in batch}
  rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
  return T5(config).apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
      batch["decoder_target_tokens"], enable_dropout=dropout_rng is not None, taps=taps,
      project_logits=project_logits, rngs=rngs, **kwargs)


def gradient_norms(grads) -> dict[str, Array]:
  """Global L2 norms of gradient groups: the encoder's and the decoder's separately
  (the paper's stability diagnostic), the shared embedding, the output head, the
  recipe's own parameters, and the total."""
  model = grads["model"]
  groups = {
      "encoder": model.get("encoder"),
      "decoder": model.get("decoder"),
      "embedding": model.get("shared"),
      "head": model.get("lm_head"),
      "distill": grads.get("distill"),
  }
  norms = {f"grad_norm/{k}": optax.tree.norm(v) for k, v in groups.items() if v}
  norms["grad_norm/total"] = optax.tree.norm(grads)
  return norms


def make_train_step_fn(student_config: T5Config, recipe: Recipe, *,
                       teacher_config: T5Config | None = None,
                       learning_rate_fn: Callable[[Array], Array] | None = None,
                       grad_accum_steps: int = 1, fused_head: bool = True):
  """The pure (unjitted) step: (state, teacher_params, batch, rng) -> (state, metrics).

  Args:
    student_config: the student (its `dtype` is the compute dtype).
    recipe: a resolved recipe (`recipe.resolve(teacher_config, student_config)`).
    teacher_config: the teacher, with its compute dtype (bf16 by default in runs);
      None when the recipe has no distillation terms.
    learning_rate_fn: the learning rate as a function of `state.step`, to report it.
    grad_accum_steps: micro-batches per optimizer update; the recipe's
      interpolation schedules count optimizer updates (state.step // this), as
      the learning-rate schedule does.
    fused_head: the losses form each model's logits from its output head a chunk
      of positions at a time (`logits.ProjectedLogits`), so no [batch,
      target_len, vocab] array exists in the step; False has the models form
      their float32 logits whole first (same values; for comparison).

  `state.params` is {"model": student params, "distill": recipe params}.
  Batch: int32 `encoder_input_tokens` [batch, in_len], `decoder_input_tokens`,
  `decoder_target_tokens`, float `decoder_loss_weights` [batch, tgt_len], and
  segment ids when packed. `rng` is a base key; the step folds in its step
  number, so a resumed run draws the same dropout masks.
  """
  if recipe.needs_teacher and teacher_config is None:
    raise ValueError(f"Recipe {recipe.name!r} distils from a teacher: pass teacher_config.")
  recipe = recipe.resolve(teacher_config, student_config)
  teacher_taps, student_taps = (recipe.required_taps(teacher_config, student_config)
                                if recipe.needs_teacher else (Taps(), Taps()))

  def step_fn(state: TrainState, teacher_params, batch: Batch, rng: Array):
    teacher_out = None
    if recipe.needs_teacher:
      teacher_out = _forward(teacher_config, jax.lax.stop_gradient(teacher_params), batch,
                             teacher_taps, project_logits=not fused_head)
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      student_out = _forward(student_config, params["model"], batch, student_taps,
                             dropout_rng=dropout_rng if student_config.dropout_rate else None,
                             project_logits=not fused_head)
      targets = batch["decoder_target_tokens"]
      chunk = chunk_positions(targets.shape[0] // partitioning.batch_shards(),
                              student_config.vocab_size, targets.shape[1])
      return recipe_loss(recipe, teacher_out, student_out, batch,
                         state.step // grad_accum_steps, params.get("distill"),
                         chunk_size=chunk,
                         mesh_axes=logical_mesh_axes("batch", "heads"))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    norms = gradient_norms(grads)
    # A NaN/inf anywhere in the gradients makes their global norm non-finite, so
    # this scalar decides before the update, and the select below fuses into the
    # optimizer's elementwise update instead of costing another pass over the state.
    finite = jnp.isfinite(loss) & jnp.isfinite(norms["grad_norm/total"])
    updated = state.apply_gradients(grads)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    # Finite gradients can still overflow the weights (e.g. a huge learning rate);
    # that step is reported, and the loop never checkpoints past a reported step.
    new_param_norm = optax.tree.norm(new_state.params["model"])
    metrics = dict(metrics)
    metrics.update(norms)
    metrics["loss"] = loss
    metrics["nonfinite"] = (~(finite & jnp.isfinite(new_param_norm))).astype(jnp.int32)
    metrics["param_norm"] = new_param_norm
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return new_state, metrics

  return step_fn


def make_distill_step(student_config: T5Config, recipe: Recipe, *, mesh: Mesh,
                      state_sharding, teacher_config: T5Config | None = None,
                      teacher_sharding=None,
                      rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
                      learning_rate_fn=None, grad_accum_steps: int = 1,
                      fused_head: bool = True):
  """`distill_step(state, teacher_params, batch, rng) -> (state, metrics)` as one jitted
  program: explicit in/out shardings, the student state donated.
  `distill_step.lower(...)` lowers it on (abstract) arguments in the mesh context.

  Args:
    state_sharding: the TrainState's NamedShardings (`state.state_shardings`).
    teacher_sharding: the teacher params' NamedShardings (None without a teacher).
    Other arguments as in `make_train_step_fn`.
  """
  step_fn = make_train_step_fn(student_config, recipe, teacher_config=teacher_config,
                               learning_rate_fn=learning_rate_fn,
                               grad_accum_steps=grad_accum_steps, fused_head=fused_head)
  replicated = NamedSharding(mesh, PartitionSpec())
  data = partitioning.batch_sharding(mesh, rules)
  jitted = jax.jit(step_fn,
                   in_shardings=(state_sharding, teacher_sharding, data, replicated),
                   out_shardings=(state_sharding, replicated),
                   donate_argnums=(0,))

  @functools.wraps(step_fn)
  def distill_step(state, teacher_params, batch, rng):
    with partitioning.mesh_context(mesh, rules):
      return jitted(state, teacher_params, batch, rng)

  def lower(state, teacher_params, batch, rng) -> jax.stages.Lowered:
    with partitioning.mesh_context(mesh, rules):
      return jitted.lower(state, teacher_params, batch, rng)

  distill_step.lower = lower
  return distill_step


def step_flops(student_config: T5Config, teacher_config: T5Config | None, batch: int,
               inputs_length: int, targets_length: int) -> float:
  """Matmul FLOPs of one step on [batch, inputs_length] / [batch, targets_length]:
  the student's forward and backward (3x its forward) plus the teacher's forward
  (None: a step without a teacher). The numerator of MFU."""
  shape = (batch, inputs_length, targets_length)
  teacher = forward_flops(teacher_config, *shape) if teacher_config is not None else 0.0
  return 3 * forward_flops(student_config, *shape) + teacher


# Dense bf16 FLOP/s per device (jax device_kind), from the one hardware table.
PEAK_FLOPS = hardware.peak_flops_by_device_kind()


def device_peak_flops(device_kind: str) -> float | None:
  """Peak FLOP/s of one device of this kind, or None when unknown (e.g. CPUs).

  TPU kinds match exactly ("TPU v5" is v5p, "TPU v5 lite" v5e); GPU kinds by
  prefix ("NVIDIA H100 80GB HBM3"); see `hardware.chip_for_device_kind`.
  """
  chip = hardware.chip_for_device_kind(device_kind)
  return None if chip is None else chip.peak_flops


# ----------------------------------------------------------------------------
# Evaluation.


def make_eval_step(config: T5Config):
  """(params, batch) -> sums of token loss, correct tokens and weights, so that
  means over many batches are exact: loss = loss_sum / weight_sum."""

  def eval_step(params, batch: Batch):
    logits = _forward(config, params, batch, Taps()).logits
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weights = (targets > 0) if weights is None else weights
    weights = weights.astype(jnp.float32)
    ce = span_corruption_loss(logits, targets, weights, z_loss=0.0).cross_entropy
    weight_sum = jnp.sum(weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return {"loss_sum": ce * weight_sum, "weight_sum": weight_sum, "correct_sum": correct}

  return eval_step


def make_score_fn(config: T5Config):
  """(params, batch) -> float32 [batch] log-likelihood of each example's targets
  (seqio's `score_fn`, for rank classification)."""

  def score(params, batch: Batch):
    logits = _forward(config, params, batch, Taps()).logits.astype(jnp.float32)
    targets = batch["decoder_target_tokens"]
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None],
                                axis=-1)[..., 0]
    return jnp.sum(log_p * (targets > 0), axis=-1)

  return score


def make_predict_fn(config: T5Config, *, max_decode_length: int, num_beams: int = 1,
                    alpha: float = 0.6):
  """(params, batch) -> int32 [batch, max_decode_length] generated tokens (greedy when
  num_beams == 1, else the best beam)."""

  def predict(params, batch: Batch):
    inputs = batch["encoder_input_tokens"]
    if num_beams == 1:
      return decoding.greedy_decode(config, params, inputs, max_decode_length=max_decode_length)[0]
    tokens, _ = decoding.beam_search(config, params, inputs, max_decode_length=max_decode_length,
                                     num_beams=num_beams, alpha=alpha)
    return tokens[:, 0]

  return predict


# One process evaluates many models of one config (the quickstart: every student of
# every path and seed, on two tasks); the same jitted functions skip tracing again.
@functools.lru_cache(maxsize=16)
def jitted_eval_step(config: T5Config, mesh: Mesh):
  """`make_eval_step(config)` jitted, its sums replicated over `mesh`."""
  return jax.jit(make_eval_step(config), out_shardings=NamedSharding(mesh, PartitionSpec()))


@functools.lru_cache(maxsize=16)
def jitted_decode_fns(config: T5Config, mesh: Mesh, max_decode_length: int, num_beams: int):
  """(predict, score): `make_predict_fn` and `make_score_fn` jitted, outputs replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  predict = jax.jit(make_predict_fn(config, max_decode_length=max_decode_length,
                                    num_beams=num_beams), out_shardings=replicated)
  return predict, jax.jit(make_score_fn(config), out_shardings=replicated)
