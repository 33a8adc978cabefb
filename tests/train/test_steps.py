"""The jitted distillation step: mesh independence, frozen teacher, NaN guard, eval."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miniend_jax.distill.recipe import get_recipe
from miniend_jax.model import student, t5
from miniend_jax.train import partitioning, state as state_lib, steps

# The lean core: runs where JAX, Flax, optax, orbax and gin are (also the Python 3.12 leg).
pytestmark = pytest.mark.lean

TEACHER = t5.T5Config(vocab_size=128, d_model=32, d_kv=4, d_ff=64, num_layers=2, num_heads=8,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
STUDENT = TEACHER.replace(num_layers=1, num_decoder_layers=1, d_model=16, d_kv=2, d_ff=32)
OPTIMIZER = state_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=0, total_steps=100,
                                      decay="constant")


# Parameters are made and models run under jit: op by op, the first eager pass
# over a T5 compiles each of its operations alone, which takes longer than the
# whole jitted program.
init_params = jax.jit(t5.init_params, static_argnums=0)


def placed_state(params, tx, mesh, logical_specs=None):
  """The TrainState of `params` (fresh optimizer state) in its shardings on `mesh`:
  what `state_lib.create_sharded_state` makes there (test_state checks that), without
  compiling each test's own program to draw the same random parameters again."""
  target = state_lib.abstract_train_state(lambda: params, tx, mesh,
                                          logical_specs=logical_specs)
  return jax.device_put(state_lib.TrainState.create(params, tx),
                        state_lib.state_shardings(target))


@functools.partial(jax.jit, static_argnums=0)
def logits_of(config, params, encoder_input_tokens, decoder_input_tokens):
  """[batch, targets, vocab] logits of `config`'s model."""
  return t5.T5(config).apply({"params": params}, encoder_input_tokens,
                             decoder_input_tokens).logits


def make_batch(seed=0, batch=8, input_len=12, target_len=6):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, TEACHER.vocab_size, size=(batch, input_len)).astype(np.int32)
  targets = rng.integers(2, TEACHER.vocab_size, size=(batch, target_len)).astype(np.int32)
  for b in range(batch):
    enc[b, rng.integers(input_len // 2, input_len + 1):] = 0
    targets[b, rng.integers(target_len // 2, target_len + 1):] = 0
  return {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
          "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32),
                                                  targets[:, :-1]], axis=1),
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def run_steps(mesh_config, recipe_name, num_steps=3, devices=None):
  mesh = partitioning.make_mesh(mesh_config, devices=devices)
  recipe = get_recipe(recipe_name).resolve(TEACHER, STUDENT)
  tx = state_lib.make_optimizer(OPTIMIZER)
  params = {"model": init_params(STUDENT, jax.random.key(1)),
            "distill": recipe.init_extra_params(jax.random.key(1), TEACHER, STUDENT)}
  specs = {"model": t5.param_logical_axes(STUDENT),
           "distill": jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params["distill"])}
  state = placed_state(params, tx, mesh, specs)
  teacher_sharding = partitioning.logical_to_sharding(t5.param_logical_axes(TEACHER), mesh)
  teacher_host = init_params(TEACHER, jax.random.key(0))
  teacher_params = jax.device_put(teacher_host, teacher_sharding)
  step = steps.make_distill_step(STUDENT, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state),
                                 teacher_config=TEACHER, teacher_sharding=teacher_sharding)
  losses = []
  for i in range(num_steps):
    batch = partitioning.host_local_to_global(make_batch(seed=i), mesh)
    state, metrics = step(state, teacher_params, batch, jax.random.key(5))
    losses.append(float(metrics["loss"]))
    assert int(metrics["nonfinite"]) == 0
  return losses, jax.device_get(state.params), teacher_host, jax.device_get(teacher_params), metrics


@pytest.fixture(scope="module")
def single_device_run():
  return run_steps(partitioning.MeshConfig(data=1), "miniend_d", devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_config", [
    partitioning.MeshConfig(data=8),
    partitioning.MeshConfig(data=2, fsdp=2, model=2),
    partitioning.MeshConfig(data=1, fsdp=1, model=8),
], ids=["data8", "data2-fsdp2-model2", "model8"])
def test_sharded_steps_equal_one_device(mesh_config, single_device_run):
  ref_losses, ref_params, _, _, _ = single_device_run
  losses, params, teacher_before, teacher_after, _ = run_steps(mesh_config, "miniend_d")
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  assert losses[-1] != losses[0]  # it trained
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params,
               ref_params)
  # The teacher is frozen: bitwise unchanged.
  jax.tree.map(np.testing.assert_array_equal, teacher_after, teacher_before)


def test_step_reports_split_gradient_norms_and_every_term(single_device_run):
  *_, metrics = single_device_run
  for key in ("grad_norm/encoder", "grad_norm/decoder", "grad_norm/embedding", "grad_norm/total",
              "loss/logits", "loss/decoder_self", "loss/decoder_cross", "loss/span_corruption"):
    assert key in metrics and np.isfinite(float(metrics[key])), key
  enc, dec = float(metrics["grad_norm/encoder"]), float(metrics["grad_norm/decoder"])
  assert enc > 0 and dec > 0
  # The groups cover the whole gradient tree: their squares add up to the total's.
  groups = [float(metrics[k]) ** 2 for k in metrics
            if k.startswith("grad_norm/") and k != "grad_norm/total"]
  np.testing.assert_allclose(sum(groups), float(metrics["grad_norm/total"]) ** 2, rtol=1e-5)


def test_nonfinite_loss_keeps_the_last_good_state():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
  recipe = get_recipe("kd_logits").resolve(TEACHER, STUDENT)
  tx = state_lib.make_optimizer(OPTIMIZER)
  state = placed_state({"model": init_params(STUDENT, jax.random.key(1)), "distill": {}}, tx,
                       mesh)
  before = jax.device_get(state.params)
  teacher_params = init_params(TEACHER, jax.random.key(0))
  # A NaN in the teacher makes the loss NaN.
  teacher_params["shared"]["embedding"] = teacher_params["shared"]["embedding"].at[3].set(jnp.nan)
  step = steps.make_distill_step(STUDENT, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state),
                                 teacher_config=TEACHER,
                                 teacher_sharding=partitioning.logical_to_sharding(
                                     t5.param_logical_axes(TEACHER), mesh))
  batch = make_batch()
  batch["encoder_input_tokens"][0, 0] = 3
  state, metrics = step(state, teacher_params, partitioning.host_local_to_global(batch, mesh),
                        jax.random.key(0))
  assert int(metrics["nonfinite"]) == 1
  assert not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def test_an_overflowing_update_is_reported():
  # Finite loss and gradients, but a learning rate that throws the weights past
  # float32's range: the step must say so, so the loop stops before saving.
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
  recipe = get_recipe("scratch").resolve(None, STUDENT)
  tx = state_lib.make_optimizer(OPTIMIZER.__class__(learning_rate=1e38, warmup_steps=0,
                                                    total_steps=100, decay="constant"))
  state = placed_state({"model": init_params(STUDENT, jax.random.key(1)), "distill": {}}, tx,
                       mesh)
  step = steps.make_distill_step(STUDENT, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state))
  _, metrics = step(state, None, partitioning.host_local_to_global(make_batch(), mesh),
                    jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm/total"]))
  assert int(metrics["nonfinite"]) == 1


def test_scratch_recipe_needs_no_teacher_and_lowers_the_loss():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
  recipe = get_recipe("scratch")
  tx = state_lib.make_optimizer(OPTIMIZER.replace(learning_rate=1e-2))
  state = placed_state({"model": init_params(STUDENT, jax.random.key(1)), "distill": {}}, tx,
                       mesh)
  step = steps.make_distill_step(STUDENT, recipe, mesh=mesh,
                                 state_sharding=state_lib.state_shardings(state))
  batch = partitioning.host_local_to_global(make_batch(), mesh)
  losses = []
  for _ in range(15):
    state, metrics = step(state, None, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]


def test_eval_step_and_score_fn_match_a_direct_computation():
  params = init_params(STUDENT, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in make_batch(seed=3).items()}
  logits = logits_of(STUDENT, params, batch["encoder_input_tokens"],
                     batch["decoder_input_tokens"])
  log_p = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
  targets = np.asarray(batch["decoder_target_tokens"])
  token_log_p = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  mask = targets > 0
  sums = jax.jit(steps.make_eval_step(STUDENT))(params, batch)
  np.testing.assert_allclose(float(sums["weight_sum"]), mask.sum())
  np.testing.assert_allclose(float(sums["loss_sum"]), -(token_log_p * mask).sum(), rtol=1e-5)
  correct = ((log_p.argmax(-1) == targets) & mask).sum()
  assert float(sums["correct_sum"]) == correct
  scores = jax.jit(steps.make_score_fn(STUDENT))(params, batch)
  np.testing.assert_allclose(np.asarray(scores), (token_log_p * mask).sum(-1), rtol=1e-5)


def test_distill_step_without_teacher_config_fails_before_compiling():
  with pytest.raises(ValueError, match="distils from a teacher"):
    steps.make_train_step_fn(STUDENT, get_recipe("miniend_e"))
  with pytest.raises(ValueError, match="vocab"):
    steps.make_train_step_fn(STUDENT.replace(vocab_size=64), get_recipe("kd_logits"),
                             teacher_config=TEACHER)


def test_a_bf16_teacher_gives_float32_logits_and_a_kl_close_to_a_float32_teachers():
  """The output head returns float32 even in bf16, so the KD target is not rounded to
  bf16's coarse grid at the logits' scale (spacing 0.125-0.25 at 16-64)."""
  from miniend_jax.distill import losses  # pylint: disable=import-outside-toplevel
  teacher = TEACHER
  params = init_params(teacher, jax.random.key(0))
  # Scale the head so the logits reach T5's usual magnitudes (tens).
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 10.0
  batch = make_batch(seed=3)
  inputs = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  mask = batch["decoder_loss_weights"]
  student_logits = jax.random.normal(jax.random.key(1), mask.shape + (teacher.vocab_size,))

  def run(config):
    cast = jax.tree.map(lambda p: p.astype(config.param_dtype), params)
    logits = logits_of(config, cast, *inputs)
    return logits, float(losses.logits_kl(logits, student_logits, mask))

  exact, exact_kl = run(teacher)
  assert 16 < np.abs(np.asarray(exact)).max() < 128
  # The head's result dtype alone: a float32 model whose head rounds to bf16 moves
  # the first-step KL; with the float32 head it is exact.
  rounded, rounded_kl = run(teacher.replace(logits_dtype="bfloat16"))
  assert rounded.dtype == jnp.bfloat16 and abs(rounded_kl - exact_kl) > 1e-4
  # A bf16 teacher (compute and storage, as runs use) still gives float32 logits,
  # not confined to bf16 values, and a first-step KL within 1% of the float32 one.
  bf16, bf16_kl = run(teacher.replace(dtype="bfloat16", param_dtype="bfloat16"))
  assert bf16.dtype == jnp.float32
  on_grid = np.asarray(bf16).astype(jnp.bfloat16).astype(np.float32) == np.asarray(bf16)
  assert on_grid.mean() < 0.1
  np.testing.assert_allclose(bf16_kl, exact_kl, rtol=1e-2)


def test_interpolation_schedules_count_optimizer_updates_under_accumulation():
  """With 4 micro-batches per update, micro-batch 8 is update 2: a ramp over 10 updates
  stands at 0.2 there (counting micro-batches would give 0.8)."""
  from miniend_jax.distill.recipe import LinearRamp, Recipe, Term  # pylint: disable=import-outside-toplevel
  recipe = Recipe(name="ramped", terms=(Term(kind="logits", interpolation=LinearRamp(
      start_value=0.0, end_value=1.0, start_step=0, end_step=10)),))
  optimizer = OPTIMIZER.replace(grad_accum_steps=4)
  tx = state_lib.make_optimizer(optimizer)
  state = state_lib.TrainState.create({"model": init_params(STUDENT, jax.random.key(1)),
                                       "distill": {}}, tx).replace(step=jnp.int32(8))
  teacher = init_params(TEACHER, jax.random.key(0))
  batch = jax.tree.map(jnp.asarray, make_batch())
  for accum, expected in ((4, 0.2), (1, 0.8)):
    step = steps.make_train_step_fn(STUDENT, recipe.resolve(TEACHER, STUDENT),
                                    teacher_config=TEACHER, grad_accum_steps=accum)
    _, metrics = jax.jit(step)(state, teacher, batch, jax.random.key(2))
    np.testing.assert_allclose(float(metrics["interpolation/logits"]), expected, rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_step_equals_the_step_on_formed_logits(tied):
  """The training step forms logits chunk by chunk from each model's head
  (`fused_head`, the default): its losses, gradient norms and updated parameters
  equal those of the step whose models form float32 logits whole, with a tied
  (rescaled embedding) or separate head. (bf16 operands: test_distill_losses.)"""
  from miniend_jax.distill.recipe import Recipe, Term  # pylint: disable=import-outside-toplevel
  teacher = TEACHER.replace(tie_word_embeddings=tied)
  student = STUDENT.replace(tie_word_embeddings=tied)
  # Logits KL with the student's own cross-entropy, z-loss, and a teacher
  # cross-entropy (the adaptive schedule reads it): every vocabulary-sized loss.
  from miniend_jax.distill.recipe import AdaptiveSchedule  # pylint: disable=import-outside-toplevel
  recipe = Recipe(name="every_head_loss", ce_weight=0.5, z_loss=1e-3,
                  terms=(Term("logits", temperature=2.0, interpolation=AdaptiveSchedule()),
                         Term("decoder_self"))).resolve(teacher, student)
  tx = state_lib.make_optimizer(OPTIMIZER)
  # A tied model's parameters are the untied one's without the separate head.
  own = lambda params: {k: v for k, v in params.items() if not (tied and k == "lm_head")}
  state = state_lib.TrainState.create({"model": own(init_params(STUDENT, jax.random.key(1))),
                                       "distill": {}}, tx)
  teacher_params = own(init_params(TEACHER, jax.random.key(0)))
  batch = jax.tree.map(jnp.asarray, make_batch(seed=4))
  results = {}
  for fused in (True, False):
    step = steps.make_train_step_fn(student, recipe, teacher_config=teacher, fused_head=fused)
    results[fused] = jax.jit(step)(state, teacher_params, batch, jax.random.key(2))
  (fused_state, fused_metrics), (formed_state, formed_metrics) = results[True], results[False]
  for name in ("loss", "loss/span_corruption", "loss/z_loss", "loss/logits",
               "teacher/span_corruption", "grad_norm/head" if not tied else "grad_norm/embedding",
               "grad_norm/decoder", "grad_norm/total"):
    np.testing.assert_allclose(fused_metrics[name], formed_metrics[name], rtol=1e-5,
                               err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               fused_state.params, formed_state.params)
  # The step really changed the head, so the comparison covers its gradient.
  head = (lambda p: p["model"]["shared"]) if tied else (lambda p: p["model"]["lm_head"])
  assert not np.allclose(head(fused_state.params)["embedding" if tied else "kernel"],
                         head(state.params)["embedding" if tied else "kernel"])
