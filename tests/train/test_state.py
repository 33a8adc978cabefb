"""Tests of miniend_jax.train.state: schedules, optimizers, TrainState and its sharding."""

import functools
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from miniend_jax.model import t5
from miniend_jax.train import partitioning
from miniend_jax.train import state as state_lib
from miniend_jax.train.state import OptimizerConfig, TrainState

TINY = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                   dropout_rate=0.0)


def tiny_batch(seed: int = 0, batch: int = 8, length: int = 8) -> dict:
  """Random token ids (no padding): inputs, decoder inputs and targets, int32 [batch, length]."""
  rng = np.random.default_rng(seed)
  tokens = lambda: jnp.asarray(rng.integers(1, TINY.vocab_size, (batch, length)), jnp.int32)
  targets = tokens()
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return {"inputs": tokens(), "decoder_inputs": decoder_inputs, "targets": targets}


def lm_loss(params, batch, config: t5.T5Config = TINY):
  """Mean token cross-entropy of the tiny T5, float32 scalar."""
  logits = t5.T5(config).apply({"params": params}, batch["inputs"], batch["decoder_inputs"]).logits
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["targets"]).mean()


def train_step(state: TrainState, batch, config: t5.T5Config = TINY):
  loss, grads = jax.value_and_grad(lm_loss)(state.params, batch, config)
  return state.apply_gradients(grads), loss


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol),
               a, b)


# ----------------------------------------------------------------------------
# Schedules and config validation.


@pytest.mark.parametrize("decay, expected", [
    # warmup 10, total 110, peak 2, end 0.1 * peak. Decay phase has 100 steps.
    ("constant", {0: 0.0, 5: 1.0, 10: 2.0, 60: 2.0, 110: 2.0}),
    ("linear", {0: 0.0, 5: 1.0, 10: 2.0, 60: 2.0 - 0.9 * 2.0 * 0.5, 110: 0.2, 500: 0.2}),
    ("cosine", {5: 1.0, 10: 2.0, 35: 0.2 + 0.9 * 1.0 * (1 + math.cos(math.pi / 4)),
                60: 0.2 + 0.9 * 1.0, 110: 0.2, 500: 0.2}),
    # T5 rsqrt: peak * sqrt(warmup / step) after warm-up.
    ("rsqrt", {5: 1.0, 10: 2.0, 40: 1.0, 160: 0.5}),
])
def test_schedule_hand_computed(decay, expected):
  cfg = OptimizerConfig(learning_rate=2.0, warmup_steps=10, total_steps=110, decay=decay,
                        end_learning_rate=0.1)
  schedule = state_lib.make_schedule(cfg)
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, rel=1e-5, abs=1e-7), (decay, step)


def test_rsqrt_without_warmup_starts_at_peak():
  schedule = state_lib.make_schedule(OptimizerConfig(learning_rate=1.0, decay="rsqrt"))
  assert float(schedule(0)) == pytest.approx(1.0)
  assert float(schedule(3)) == pytest.approx(0.5)  # sqrt(1 / 4)


@pytest.mark.parametrize("changes, field", [
    ({"name": "sgd"}, "name"),
    ({"decay": "exponential"}, "decay"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"end_learning_rate": 2.0}, "end_learning_rate"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"b2": 1.0}, "b2"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"no_decay_patterns": ("([",)}, "no_decay_patterns"),
])
def test_config_errors_name_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"OptimizerConfig\.{field}="):
    OptimizerConfig(**changes)


def test_unknown_optimizer_lists_choices():
  with pytest.raises(ValueError, match="adamw.*adafactor"):
    OptimizerConfig(name="lamb")


def test_optimizer_config_from_gin():
  try:
    gin.parse_config("""
        OptimizerConfig.name = 'adafactor'
        OptimizerConfig.learning_rate = 0.01
        OptimizerConfig.decay = 'rsqrt'
    """)
    cfg = OptimizerConfig()
  finally:
    gin.clear_config()
  assert (cfg.name, cfg.learning_rate, cfg.decay) == ("adafactor", 0.01, "rsqrt")
  assert OptimizerConfig().name == "adamw"  # usable without gin


# ----------------------------------------------------------------------------
# Optimizer behaviour.


def _distill_params():
  """A distillation-shaped params tree: the tiny T5 plus a recipe projection."""
  return {"model": t5.init_params(TINY, jax.random.key(0)),
          "distill": {"hidden_proj": {"kernel": jnp.ones((16, 32))}}}


def test_weight_decay_mask_excludes_norms_and_position_tables():
  params = _distill_params()
  mask = state_lib.weight_decay_mask(params)
  flat = {state_lib.path_to_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not flat["model/encoder/layers_0/pre_attention_layer_norm/scale"]
  assert not flat["model/decoder/decoder_norm/scale"]
  assert not flat["model/encoder/relpos_bias/rel_embedding"]
  assert flat["model/shared/embedding"]
  assert flat["model/decoder/layers_0/mlp/wo/kernel"]
  assert flat["distill/hidden_proj/kernel"]

  # Effect: with zero gradients AdamW's update is pure decay, p *= 1 - lr * wd.
  cfg = OptimizerConfig(learning_rate=0.5, weight_decay=0.1, grad_clip_norm=None)
  state = TrainState.create(params, state_lib.make_optimizer(cfg))
  new = jax.jit(TrainState.apply_gradients)(state, jax.tree.map(jnp.zeros_like, params))
  np.testing.assert_allclose(new.params["model"]["shared"]["embedding"],
                             params["model"]["shared"]["embedding"] * (1 - 0.05), rtol=1e-6)
  norm = ("model", "decoder", "decoder_norm", "scale")
  get = lambda tree: functools.reduce(lambda t, k: t[k], norm, tree)
  np.testing.assert_array_equal(get(new.params), get(params))
  np.testing.assert_array_equal(new.params["model"]["encoder"]["relpos_bias"]["rel_embedding"],
                                params["model"]["encoder"]["relpos_bias"]["rel_embedding"])


def test_grad_clipping_bounds_the_update():
  # A large eps makes Adam's first step proportional to the gradient
  # (lr * g / (|g| + eps)), so the update's norm reveals the clipped gradient.
  params = {"w": jnp.zeros((64,))}
  grads = {"w": jnp.full((64,), 100.0)}  # global norm 800
  lr, eps, clip = 0.1, 10.0, 1.0

  def update_norm(grad_clip_norm):
    cfg = OptimizerConfig(learning_rate=lr, eps=eps, grad_clip_norm=grad_clip_norm)
    new = TrainState.create(params, state_lib.make_optimizer(cfg)).apply_gradients(grads)
    return float(optax.tree.norm(new.params))

  assert update_norm(clip) <= lr * clip / eps * (1 + 1e-6)
  assert update_norm(None) > 10 * lr * clip / eps


def test_grad_accumulation_equals_one_big_batch():
  """k micro-steps of batch B with grad_accum_steps=k == one step on the kB batch."""
  k, micro = 4, 3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(k * micro, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(k * micro, 2)), jnp.float32)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)},
            "norm": {"scale": jnp.ones((2,))}}

  def loss(p, x, y):
    return jnp.mean((x @ p["dense"]["kernel"] * p["norm"]["scale"] - y) ** 2)

  base = dict(learning_rate=0.1, warmup_steps=2, decay="linear", total_steps=10,
              weight_decay=0.01, grad_clip_norm=0.5)
  grad = jax.jit(jax.grad(loss))
  apply = jax.jit(TrainState.apply_gradients)

  big = TrainState.create(params, state_lib.make_optimizer(OptimizerConfig(**base)))
  accum = TrainState.create(
      params, state_lib.make_optimizer(OptimizerConfig(**base, grad_accum_steps=k)))
  for update in range(3):  # three optimizer updates, so the schedule moves too
    big = apply(big, grad(big.params, x, y))
    for i in range(k):
      before = accum.params
      sl = slice(i * micro, (i + 1) * micro)
      accum = apply(accum, grad(accum.params, x[sl], y[sl]))
      if i < k - 1:  # params only move on the k-th micro-step
        jax.tree.map(np.testing.assert_array_equal, accum.params, before)
    assert_trees_close(accum.params, big.params, rtol=1e-5, atol=1e-7)
  assert int(accum.step) == 3 * k and int(big.step) == 3


@pytest.mark.parametrize("cfg", [
    OptimizerConfig(name="adamw", learning_rate=1e-2, warmup_steps=2, decay="cosine",
                    total_steps=10, weight_decay=0.01),
    OptimizerConfig(name="adafactor", learning_rate=1e-1, warmup_steps=2, decay="rsqrt",
                    adafactor_factored_min_dim=8, weight_decay=0.01),
], ids=["adamw", "adafactor"])
def test_optimizers_reduce_tiny_t5_loss(cfg):
  state = TrainState.create(t5.init_params(TINY, jax.random.key(0)), state_lib.make_optimizer(cfg))
  batch = tiny_batch()
  step = jax.jit(train_step)
  losses = []
  for _ in range(10):
    state, loss = step(state, batch)
    losses.append(float(loss))
  assert all(math.isfinite(l) for l in losses)
  assert losses[-1] < losses[0] - 0.05, losses


def test_bf16_compute_keeps_f32_master_weights():
  config = TINY.replace(dtype="bfloat16", param_dtype="float32")
  params = t5.init_params(config, jax.random.key(0))
  state = TrainState.create(params, state_lib.make_optimizer(OptimizerConfig(learning_rate=1e-2)))
  new, loss = jax.jit(functools.partial(train_step, config=config))(state, tiny_batch())
  assert math.isfinite(float(loss))
  for leaf in jax.tree.leaves((new.params, new.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  # Updates smaller than bf16's resolution still land in the f32 master weights.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.params, params)
  assert all(jax.tree.leaves(moved))


# ----------------------------------------------------------------------------
# Sharding.


@pytest.mark.parametrize("cfg", [
    # Adam divides by |g| + eps: with the default eps, gradient coordinates near
    # zero turn reduction-order noise into visible update differences.
    OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.01, eps=1e-4),
    OptimizerConfig(name="adafactor", learning_rate=1e-2, adafactor_factored_min_dim=8,
                    grad_accum_steps=2),
], ids=["adamw", "adafactor_accum"])
def test_sharded_state_matches_unsharded(cfg):
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
  rules = partitioning.DEFAULT_LOGICAL_AXIS_RULES
  tx = state_lib.make_optimizer(cfg)
  init_fn = functools.partial(t5.init_params, TINY)
  rng = jax.random.key(0)

  sharded = state_lib.create_sharded_state(init_fn, tx, mesh, rules, t5.param_logical_axes(TINY),
                                           init_args=(rng,))
  # jit on one device too: eager and fused initialisers may differ in the last bit.
  reference = jax.jit(lambda r: TrainState.create(init_fn(r), tx))(rng)
  assert_trees_close(sharded, reference, rtol=0, atol=0)

  # Parameters are born sharded; moments follow them; factored stats are replicated.
  embedding_spec = P("model", "fsdp")
  assert sharded.params["shared"]["embedding"].sharding.spec == embedding_spec
  for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]:
    name = state_lib.path_to_str(path)
    if name.endswith("shared/embedding"):
      # Moments shaped like the parameter follow it; factored rows / columns
      # (and Adafactor's (1,) placeholders) are replicated.
      expected = embedding_spec if leaf.shape == (64, 16) else P()
      assert leaf.sharding.spec == expected, name
    if leaf.ndim == 0:
      assert leaf.sharding.spec == P(), name
  assert sharded.params["shared"]["embedding"].addressable_shards[0].data.shape == (32, 8)

  shardings = state_lib.state_shardings(sharded)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  with partitioning.mesh_context(mesh, rules):
    sharded_step = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, None))
    for i in range(2):
      sharded, _ = sharded_step(sharded, jax.device_put(tiny_batch(seed=i), batch_sharding))
  step = jax.jit(train_step)
  for i in range(2):
    reference, _ = step(reference, tiny_batch(seed=i))
  assert int(sharded.step) == 2
  # Reductions run in another order across devices; Adam amplifies tiny gradient
  # differences in near-zero coordinates, hence an absolute tolerance.
  assert_trees_close(sharded, reference, rtol=1e-4, atol=1e-5)
  assert state_lib.state_shardings(sharded) == shardings
