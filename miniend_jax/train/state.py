"""Train state, optimizers, learning-rate schedules and the sharding of the state.

`TrainState` is a pytree of (step, params, opt_state) with the optax
transformation as static metadata, so it goes through `jax.jit` whole and orbax
saves it as a tree of arrays. Everything an experiment tunes about optimisation
lives in one gin-configurable `OptimizerConfig`; `make_optimizer` turns it into
one optax chain:

    MultiSteps(                          # only when grad_accum_steps > 1
        chain(clip_by_global_norm,       # only when grad_clip_norm > 0
              adamw | adafactor(schedule, decoupled weight decay with a mask)))

Sharding follows t5x / MaxText: optimizer moments are laid out exactly like
their parameter (ZeRO-style under the "fsdp" axis), anything else (counts,
Adafactor's factored row/column statistics) is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from miniend_jax.train import partitioning

Params = Any
PyTree = Any

OPTIMIZERS = ("adamw", "adafactor")
DECAYS = ("constant", "linear", "cosine", "rsqrt")

# Parameters that never get weight decay, matched against the "/"-joined
# parameter path: T5's RMSNorm scales and the relative-position bias tables.
# Decaying a norm scale pulls it towards 0 (not its natural value 1), and the
# position tables are tiny, shared by all layers, and not a capacity concern.
DEFAULT_NO_DECAY_PATTERNS = (r"(^|/)scale$", r"(^|/)rel_embedding$")


# ----------------------------------------------------------------------------
# TrainState.


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  step: int32 scalar, the number of `apply_gradients` calls (= micro-batches
    consumed). With gradient accumulation over k micro-batches the optimizer
    (and its schedule) advances once every k steps.
  params: the trainable pytree. For distillation it is
    {"model": student_params, "distill": recipe_extra_params}; nothing here
    depends on its structure.
  opt_state: the optax state of `tx`.
  tx: the optax transformation; static (not a pytree node), so it is part of
    the jit cache key and never saved in checkpoints.
  """

  step: jax.Array
  params: Params
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Params, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)

  def apply_gradients(self, grads: Params) -> "TrainState":
    """One optimizer call. `grads` has the structure and dtypes of `params`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


# ----------------------------------------------------------------------------
# Optimizer configuration.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer, schedule and gradient processing of a run.

  Attributes:
    name: "adamw" or "adafactor".
    learning_rate: peak learning rate, reached at the end of warm-up. For
      Adafactor with `adafactor_scale_by_param` it is relative to each
      parameter's RMS (T5 uses 1e-2 .. 1e-3).
    warmup_steps: linear warm-up from 0 over this many optimizer updates.
    decay: shape after warm-up: "constant", "linear" or "cosine" (to
      `end_learning_rate * learning_rate` at `total_steps`), or "rsqrt"
      (T5's inverse square root, lr * sqrt(max(warmup_steps, 1) / step);
      needs no `total_steps`).
    total_steps: optimizer updates over which linear and cosine decay run;
      None (the usual choice) means the run's own number of updates, so
      `--num_steps` sets it (the run loop fills it in). Set it only to decay
      over another length (a warning says so when it differs from the run's).
    end_learning_rate: final learning rate as a fraction of the peak.
    weight_decay: decoupled weight decay (per update: p -= weight_decay * lr(t) * p);
      parameters matching `no_decay_patterns` are exempt.
    no_decay_patterns: regular expressions searched in the "/"-joined
      parameter path (e.g. "model/encoder/layers_0/pre_mlp_layer_norm/scale").
    b1, b2, eps: AdamW's moment decays and epsilon (unused by Adafactor).
    adafactor_decay_rate: Adafactor's second-moment decay exponent
      (beta2_t = 1 - t^-rate; T5 uses 0.8).
    adafactor_momentum: Adafactor first-moment decay; None (T5's choice) keeps
      no first moment.
    adafactor_factored_min_dim: factor the second moment of a parameter only
      when two of its dimensions are at least this large.
    adafactor_scale_by_param: scale updates by each parameter's RMS (T5 default).
    grad_clip_norm: clip the (accumulated) gradient to this global norm;
      None or 0 disables clipping.
    grad_accum_steps: average the gradients of this many `apply_gradients`
      calls before one optimizer update (`optax.MultiSteps`).
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay: str = "constant"
  total_steps: int | None = None
  end_learning_rate: float = 0.0
  weight_decay: float = 0.0
  no_decay_patterns: tuple[str, ...] = DEFAULT_NO_DECAY_PATTERNS
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  adafactor_momentum: float | None = None
  adafactor_factored_min_dim: int = 128
  adafactor_scale_by_param: bool = True
  grad_clip_norm: float | None = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    _validate(self)

  def replace(self, **changes) -> "OptimizerConfig":
    return dataclasses.replace(self, **changes)


def _validate(cfg: OptimizerConfig) -> None:
  """Raises ValueError naming the field, its value and what is allowed."""

  def fail(field: str, why: str):
    raise ValueError(f"OptimizerConfig.{field}={getattr(cfg, field)!r} {why}")

  if cfg.name not in OPTIMIZERS:
    fail("name", f"is not a known optimizer; use one of {OPTIMIZERS}.")
  if cfg.decay not in DECAYS:
    fail("decay", f"is not a known schedule; use one of {DECAYS}.")
  if not (isinstance(cfg.learning_rate, (int, float)) and math.isfinite(cfg.learning_rate)
          and cfg.learning_rate >= 0):
    fail("learning_rate", "must be a finite number >= 0.")
  if not isinstance(cfg.warmup_steps, int) or cfg.warmup_steps < 0:
    fail("warmup_steps", "must be an integer >= 0.")
  if cfg.total_steps is not None and (not isinstance(cfg.total_steps, int) or cfg.total_steps <= 0):
    fail("total_steps", "must be a positive integer or None.")
  if cfg.total_steps is not None and cfg.warmup_steps > cfg.total_steps:
    fail("warmup_steps", f"is longer than total_steps={cfg.total_steps}; warm-up must end "
         "within the run.")
  if not 0.0 <= cfg.end_learning_rate <= 1.0:
    fail("end_learning_rate", "is a fraction of the peak learning rate and must be in [0, 1].")
  if cfg.weight_decay < 0:
    fail("weight_decay", "must be >= 0.")
  for pattern in cfg.no_decay_patterns:
    try:
      re.compile(pattern)
    except re.error as e:
      fail("no_decay_patterns", f"contains an invalid regular expression {pattern!r}: {e}.")
  for field in ("b1", "b2"):
    if not 0.0 <= getattr(cfg, field) < 1.0:
      fail(field, "must be in [0, 1).")
  if cfg.eps <= 0:
    fail("eps", "must be > 0.")
  if not 0.0 < cfg.adafactor_decay_rate <= 1.0:
    fail("adafactor_decay_rate", "must be in (0, 1].")
  if cfg.adafactor_momentum is not None and not 0.0 <= cfg.adafactor_momentum < 1.0:
    fail("adafactor_momentum", "must be None or in [0, 1).")
  if cfg.adafactor_factored_min_dim < 1:
    fail("adafactor_factored_min_dim", "must be >= 1.")
  if cfg.grad_clip_norm is not None and cfg.grad_clip_norm < 0:
    fail("grad_clip_norm", "must be > 0 (or None / 0 to disable clipping).")
  if not isinstance(cfg.grad_accum_steps, int) or cfg.grad_accum_steps < 1:
    fail("grad_accum_steps", "must be an integer >= 1 (1 = no accumulation).")


# ----------------------------------------------------------------------------
# Schedules.


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Learning rate as a function of the optimizer update count.

  Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then `decay`.
  Continuous at the joint: every decay starts at the peak.
  """
  peak = cfg.learning_rate
  if cfg.decay in ("linear", "cosine") and cfg.total_steps is None:
    raise ValueError(f"OptimizerConfig.total_steps=None: decay={cfg.decay!r} needs the number "
                     "of updates it runs over (the run loop sets it to the run's length).")
  decay_steps = None if cfg.total_steps is None else max(cfg.total_steps - cfg.warmup_steps, 1)
  end_value = cfg.end_learning_rate * peak

  if cfg.decay == "constant":
    decay = optax.constant_schedule(peak)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(peak, end_value, decay_steps)
  elif cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate)
  else:  # rsqrt
    # optax has no inverse-square-root schedule. Counted from the end of
    # warm-up (join_schedules shifts the step), so in global steps this is
    # peak * sqrt(timescale / max(step, timescale)) as in T5.
    timescale = max(cfg.warmup_steps, 1)

    def decay(count):
      return peak * jnp.sqrt(timescale / (jnp.asarray(count, jnp.float32) + timescale))

  if cfg.warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


# ----------------------------------------------------------------------------
# Optimizers.


def path_to_str(path: Sequence[Any]) -> str:
  """A jax key path as "a/b/c" (dict keys, attribute names and indices)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def weight_decay_mask(params: Params, no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS
                      ) -> PyTree:
  """Bool pytree shaped like `params`: True where weight decay applies."""
  compiled = [re.compile(p) for p in no_decay_patterns]

  def decays(path, _):
    name = path_to_str(path)
    return not any(p.search(name) for p in compiled)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """The optax transformation `cfg` describes (see the module docstring)."""
  schedule = make_schedule(cfg)
  mask = lambda params: weight_decay_mask(params, cfg.no_decay_patterns)

  if cfg.name == "adamw":
    optimizer = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, mask=mask)
  else:
    # optax's Adafactor adds its weight decay after the learning-rate scaling;
    # scaling the rate by the schedule gives AdamW's meaning of weight_decay.
    decay_rate = None
    if cfg.weight_decay > 0:
      decay_rate = lambda count: cfg.weight_decay * schedule(count)
    optimizer = optax.adafactor(
        schedule, min_dim_size_to_factor=cfg.adafactor_factored_min_dim,
        decay_rate=cfg.adafactor_decay_rate,
        multiply_by_parameter_scale=cfg.adafactor_scale_by_param,
        momentum=cfg.adafactor_momentum, weight_decay_rate=decay_rate,
        weight_decay_mask=mask)

  if cfg.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), optimizer)
  if cfg.grad_accum_steps > 1:
    # MultiSteps keeps the running mean of the gradients in the optimizer state,
    # so accumulation is checkpointed and resumes mid-cycle, and clipping and
    # the schedule see the accumulated gradient / the number of real updates.
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=cfg.grad_accum_steps)
  return optimizer


# ----------------------------------------------------------------------------
# Sharding of the state.


def state_logical_axes(params_logical_specs: PyTree, state_shapes: TrainState) -> TrainState:
  """Logical PartitionSpecs of every leaf of a TrainState.

  Args:
    params_logical_specs: PartitionSpec with logical axis names per parameter,
      shaped like `state_shapes.params` (e.g. {"model": param_logical_axes(cfg),
      "distill": {...}}).
    state_shapes: the state's `jax.ShapeDtypeStruct`s (`jax.eval_shape` of its
      creation).

  Returns:
    A TrainState whose leaves are PartitionSpecs: the step is replicated,
    parameters take their spec, an optimizer leaf that is a copy of a parameter
    (Adam moments, accumulated gradients, unfactored Adafactor statistics)
    takes that parameter's spec, and every other optimizer leaf (counts,
    Adafactor's factored row/column statistics) is replicated.
  """
  replicated = PartitionSpec()

  def like_param(leaf, spec, param):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    # Adafactor keeps v_row / v_col trees shaped like the params whose leaves
    # are reduced (or (1,) placeholders): same tree position, other shape.
    return spec if tuple(leaf.shape) == tuple(param.shape) else replicated

  opt_specs = optax.tree_map_params(
      state_shapes.tx, like_param, state_shapes.opt_state, params_logical_specs,
      state_shapes.params,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return state_shapes.replace(step=replicated, params=params_logical_specs, opt_state=opt_specs)


def abstract_train_state(
    init_params_fn: Callable[..., Params], tx: optax.GradientTransformation, mesh: Mesh,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
    logical_specs: PyTree = None, init_args: Sequence[Any] = ()) -> TrainState:
  """The TrainState as `jax.ShapeDtypeStruct`s carrying their NamedShardings.

  Allocates nothing. This is the target a checkpoint restores into, and its
  `.sharding`s are the `out_shardings` of `create_sharded_state`.

  Args:
    init_params_fn: init_params_fn(*init_args) -> params.
    tx: the optimizer.
    mesh, rules: where and how logical axes map to devices.
    logical_specs: logical PartitionSpecs of the params; None replicates all.
    init_args: arguments of `init_params_fn` (e.g. an rng key).
  """
  shapes = jax.eval_shape(lambda *a: TrainState.create(init_params_fn(*a), tx), *init_args)
  if logical_specs is None:
    logical_specs = jax.tree.map(lambda _: PartitionSpec(), shapes.params)
  shardings = partitioning.logical_to_sharding(
      state_logical_axes(logical_specs, shapes), mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def state_shardings(abstract_state: TrainState) -> TrainState:
  """The NamedSharding of every leaf of an abstract (or concrete) TrainState."""
  return jax.tree.map(lambda x: x.sharding, abstract_state)


def create_sharded_state(
    init_params_fn: Callable[..., Params], tx: optax.GradientTransformation, mesh: Mesh,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
    logical_specs: PyTree = None, init_args: Sequence[Any] = ()) -> TrainState:
  """Initialises params and optimizer state directly in their shardings.

  The whole creation is one jitted function with `out_shardings`, so each
  device computes only its shards: a model larger than one device's memory is
  never materialised whole. Arguments as in `abstract_train_state`; e.g.

    state = create_sharded_state(functools.partial(t5.init_params, cfg), tx, mesh,
                                 logical_specs=t5.param_logical_axes(cfg),
                                 init_args=(jax.random.key(0),))
  """
  target = abstract_train_state(init_params_fn, tx, mesh, rules, logical_specs, init_args)
  return sharded_state_creator(init_params_fn, tx, target, rules)(*init_args)


def sharded_state_creator(
    init_params_fn: Callable[..., Params], tx: optax.GradientTransformation,
    abstract_state: TrainState,
    rules: partitioning.LogicalRules = partitioning.DEFAULT_LOGICAL_AXIS_RULES,
) -> Callable[..., TrainState]:
  """`create(*init_args) -> TrainState`, jitted once into `abstract_state`'s shardings
  (what `create_sharded_state` runs); keep it to create many states without tracing
  the initialisation again."""
  leaf = jax.tree.leaves(abstract_state)[0]
  mesh = leaf.sharding.mesh
  jitted = jax.jit(lambda *a: TrainState.create(init_params_fn(*a), tx),
                   out_shardings=state_shardings(abstract_state))

  def create(*init_args) -> TrainState:
    with partitioning.mesh_context(mesh, rules):
      return jitted(*init_args)

  return create
