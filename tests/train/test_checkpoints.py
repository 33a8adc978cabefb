"""Tests of miniend_jax.train.checkpoints on 8 fake CPU devices."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from miniend_jax.model import t5
from miniend_jax.train import checkpoints as ckpt_lib
from miniend_jax.train import partitioning
from miniend_jax.train import state as state_lib
from miniend_jax.train.checkpoints import CheckpointConfig, Checkpointer
from miniend_jax.train.state import OptimizerConfig, TrainState

TINY = t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
TX = state_lib.make_optimizer(OptimizerConfig(learning_rate=1e-2, weight_decay=0.01,
                                              grad_accum_steps=2))


def distill_params(rng):
  """Distillation-shaped params: the tiny T5 student plus a recipe projection."""
  return {"model": t5.init_params(TINY, rng), "distill": {"proj": {"kernel": jnp.ones((16, 32))}}}


DISTILL_SPECS = {"model": t5.param_logical_axes(TINY),
                 "distill": {"proj": {"kernel": P("embed", "mlp")}}}


def make_mesh(data, fsdp, model):
  devices = jax.devices()[:data * fsdp * model]
  return partitioning.make_mesh(partitioning.MeshConfig(data=data, fsdp=fsdp, model=model),
                                devices=devices)


def abstract_state(mesh):
  return state_lib.abstract_train_state(distill_params, TX, mesh, logical_specs=DISTILL_SPECS,
                                        init_args=(jax.random.key(0),))


def assert_bitwise_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def small_state(value: float = 0.0) -> TrainState:
  """A cheap state for retention tests: every leaf records `value`."""
  params = {"dense": {"kernel": jnp.full((3, 4), value)}, "norm": {"scale": jnp.ones(4)}}
  return TrainState.create(params, TX)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A sharded (data 2, fsdp 2, model 2) state after three micro-steps, saved at step 3."""
  directory = tmp_path_factory.mktemp("run") / "checkpoints"
  mesh = make_mesh(2, 2, 2)
  state = state_lib.create_sharded_state(distill_params, TX, mesh,
                                         logical_specs=DISTILL_SPECS,
                                         init_args=(jax.random.key(0),))

  @jax.jit
  def fake_step(state, i):
    grads = jax.tree.map(lambda p: jnp.sin(p + i), state.params)
    return state.apply_gradients(grads)

  for i in range(3):  # mid-accumulation: acc_grads and mini_step are non-trivial
    state = fake_step(state, i)
  data_state = {"shard": 3, "offset": 1234, "seed": [1, 2]}
  with Checkpointer(directory, CheckpointConfig(save_interval_steps=1), model_config=TINY,
                    metadata={"recipe": "miniend_d"}) as ckpt:
    assert ckpt.save(3, state, data_state=data_state, metrics={"loss": jnp.float32(1.5)})
  return directory, state, data_state


# ----------------------------------------------------------------------------
# Round trips.


def test_round_trip_is_bitwise_with_shardings(saved_run):
  directory, state, data_state = saved_run
  target = abstract_state(make_mesh(2, 2, 2))
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 3
  restored, restored_data = ckpt.restore(target_state=target)
  assert isinstance(restored, TrainState) and restored.tx is TX
  assert int(restored.step) == 3
  assert_bitwise_equal(restored, state)
  assert jax.tree.map(lambda x: x.sharding, restored) == jax.tree.map(lambda x: x.sharding, target)
  # The embedding really is split over fsdp x model: 8 shards of (32, 8).
  embedding = restored.params["model"]["shared"]["embedding"]
  assert len(embedding.addressable_shards) == 8
  assert embedding.addressable_shards[0].data.shape == (32, 8)
  assert restored_data == data_state

  meta = ckpt.metadata()
  assert meta["model_config"] == TINY.to_dict()
  assert meta["run"] == {"recipe": "miniend_d"} and meta["metrics"] == {"loss": 1.5}
  assert ckpt_lib.load_model_config(directory) == TINY
  ckpt.close()


@pytest.mark.parametrize("shape", [(1, 4, 1), (1, 1, 1)], ids=["fsdp4", "one_device"])
def test_restore_under_another_mesh(saved_run, shape):
  directory, state, data_state = saved_run
  target = abstract_state(make_mesh(*shape))
  with Checkpointer(directory) as ckpt:
    restored, restored_data = ckpt.restore(target_state=target)
  assert_bitwise_equal(restored, state)
  assert restored_data == data_state
  kernel = restored.params["model"]["encoder"]["layers_0"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding == target.params["model"]["encoder"]["layers_0"]["mlp"]["wi"][
      "kernel"].sharding
  assert len(kernel.sharding.device_set) == int(np.prod(shape))


def test_load_params_from_checkpoint(saved_run):
  directory, state, _ = saved_run
  params = ckpt_lib.load_params_from_checkpoint(directory)
  assert set(params) == {"shared", "encoder", "decoder"}  # the model only, no "distill"
  assert_bitwise_equal(params, state.params["model"])

  mesh = make_mesh(1, 2, 2)
  shardings = partitioning.logical_to_sharding(t5.param_logical_axes(TINY), mesh)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        t5.param_shapes(TINY), shardings)
  sharded = ckpt_lib.load_params_from_checkpoint(directory, step=3, target_params=target)
  assert_bitwise_equal(sharded, state.params["model"])
  assert sharded["shared"]["embedding"].sharding == shardings["shared"]["embedding"]


def test_wrong_target_is_a_clear_value_error(saved_run):
  directory, _, _ = saved_run
  other = TINY.replace(d_ff=64)
  init = lambda r: {"model": t5.init_params(other, r),
                    "distill": {"proj": {"kernel": jnp.ones((16, 32))}}}
  target = state_lib.abstract_train_state(init, TX, make_mesh(1, 1, 1),
                                          init_args=(jax.random.key(0),))
  with Checkpointer(directory) as ckpt, pytest.raises(ValueError, match=r"does not match.*shape"):
    ckpt.restore(target_state=target)


def test_data_state_round_trip(tmp_path):
  values = {1: {"epoch": 0, "position": [3, 4], "name": "c4"}, 2: b"\x00\xffiterator", 3: None}
  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1, max_to_keep=None)) as ckpt:
    for step, data_state in values.items():
      ckpt.save(step, small_state(step), data_state=data_state)
    for step, data_state in values.items():
      restored, restored_data = ckpt.restore(step, target_state=small_state())
      assert restored_data == data_state
      assert int(restored.step) == 0 and float(restored.params["dense"]["kernel"][0, 0]) == step
  with pytest.raises(TypeError, match="JSON"):
    Checkpointer(tmp_path / "other").save(1, small_state(), data_state={"x": object()}, force=True)


# ----------------------------------------------------------------------------
# When to save and what to keep.


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=2)) as ckpt:
    assert ckpt.save(2, small_state(2))
    assert not ckpt.save(3, small_state(3))
    assert ckpt.save(3, small_state(3), force=True)  # e.g. the final step
    assert not ckpt.save(3, small_state(3), force=True)  # already there: untouched
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3]


@pytest.mark.parametrize("mode, sign", [("min", 1.0), ("max", -1.0)])
def test_keeps_last_k_and_best(tmp_path, mode, sign):
  # Best metric at step 2; last two are 5 and 6; step 4 has no metric.
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 2.5, 6: 3.5}
  config = CheckpointConfig(save_interval_steps=1, max_to_keep=2, best_metric="loss",
                            best_mode=mode)
  with Checkpointer(tmp_path, config) as ckpt:
    for step, loss in losses.items():
      metrics = None if loss is None else {"loss": sign * loss, "other": 0.0}
      ckpt.save(step, small_state(step), metrics=metrics)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  # The ranking survives a restart: metrics are on disk.
  with Checkpointer(tmp_path, config) as ckpt:
    ckpt.save(7, small_state(7), metrics={"loss": sign * 9.0})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 6, 7]


# ----------------------------------------------------------------------------
# Failures.


def test_half_written_tmp_dir_is_ignored(tmp_path):
  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1)) as ckpt:
    ckpt.save(1, small_state(1), data_state={"pos": 1})
  # A crash during the save of step 2 leaves orbax's temporary directory behind.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1712345678901234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "_METADATA").write_text("{truncated")
  assert ckpt_lib.latest_step(tmp_path) == 1
  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1)) as ckpt:
    assert ckpt.latest_step() == 1
    restored, data_state = ckpt.restore(target_state=small_state())
    assert data_state == {"pos": 1}
    assert float(restored.params["dense"]["kernel"][0, 0]) == 1.0
    # Saving step 2 for real works (the stale tmp dir does not block it).
    assert ckpt.save(2, small_state(2))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]


def _damage(step_dir: pathlib.Path, how: str) -> None:
  data_files = [p for p in (step_dir / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  assert data_files, "expected OCDBT data files"
  for path in data_files:
    if how == "truncate":
      size = path.stat().st_size
      with open(path, "r+b") as f:
        f.truncate(size // 2)
    else:
      path.unlink()


# After the first failed read, orbax's other in-flight reads call back into its
# already-closed event loop; harmless, but pytest reports it as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_checkpoint_error_and_fallback(tmp_path, how):
  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1)) as ckpt:
    for step in (1, 2):
      ckpt.save(step, small_state(step), data_state={"pos": step})
  _damage(tmp_path / "2", how)

  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1)) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointRestoreError) as info:
      ckpt.restore(target_state=small_state())
    message = str(info.value)
    assert "step 2" in message and str(tmp_path) in message
    assert "restore(step=1)" in message and "restore_latest_good" in message
    assert info.value.step == 2

    restored, data_state = ckpt.restore_latest_good(target_state=small_state())
    assert data_state == {"pos": 1}
    assert float(restored.params["dense"]["kernel"][0, 0]) == 1.0
    assert ckpt.all_steps() == [1, 2]  # nothing deleted
  assert (tmp_path / "2").exists()


def test_no_checkpoint_errors(tmp_path):
  expected = rf"no checkpoint in {tmp_path}.*miniend distill.*--init_from"
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(ckpt_lib.NoCheckpointError, match=expected):
      ckpt.restore(target_state=small_state())
    with pytest.raises(ckpt_lib.NoCheckpointError, match=expected):
      ckpt.restore_latest_good(target_state=small_state())
  with pytest.raises(ckpt_lib.NoCheckpointError, match=expected):
    ckpt_lib.load_params_from_checkpoint(tmp_path)
  missing = tmp_path / "does_not_exist"
  with pytest.raises(ckpt_lib.NoCheckpointError, match="no checkpoint in"):
    ckpt_lib.require_checkpoint(missing)
  assert ckpt_lib.latest_step(missing) is None
  assert not missing.exists()  # reading never creates directories

  with Checkpointer(tmp_path, CheckpointConfig(save_interval_steps=1)) as ckpt:
    ckpt.save(1, small_state(1))
    with pytest.raises(ckpt_lib.NoCheckpointError, match=r"step 5.*available steps: \[1\]"):
      ckpt.restore(5, target_state=small_state())


@pytest.mark.parametrize("changes, field", [
    ({"max_to_keep": 0}, "max_to_keep"),
    ({"best_mode": "best"}, "best_mode"),
    ({"save_interval_steps": 0}, "save_interval_steps"),
])
def test_config_errors(changes, field):
  with pytest.raises(ValueError, match=rf"CheckpointConfig\.{field}="):
    CheckpointConfig(**changes)
