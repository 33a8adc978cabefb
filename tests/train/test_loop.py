"""The run loop: resume equals an uninterrupted run, NaN handling, errors before compiling."""

import contextlib
import functools
import glob
import os
import shutil

import jax
import jax.monitoring
import numpy as np
import pytest

from jax._src import compilation_cache

from miniend_jax.train import checkpoints, loop, writers
from tests.train import loop_testing


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in
          writers.read_jsonl(os.path.join(workdir, "logs", "train_metrics.jsonl")) if "loss" in r]


@contextlib.contextmanager
def _own_compilation_cache():
  """Puts back the session's compilation cache after runs that use their own."""
  previous = jax.config.jax_compilation_cache_dir
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """One uninterrupted 4-step pretraining run, traced at steps 1-2, compiling into its
  own cache: the resume test compares with it and reads that cache, later tests
  continue it (NaN) or distil from it (teacher). -> (workdir, summary, cache dir)."""
  root = tmp_path_factory.mktemp("straight")
  workdir, cache = str(root / "run"), str(root / "cache")
  with _own_compilation_cache():
    summary = loop_testing.run("pretrain", workdir, data_dir, num_steps=4,
                               train_settings=dict(profile_steps=(1, 2),
                                                   compilation_cache_dir=cache))
  return workdir, summary, cache


def test_resumed_run_equals_uninterrupted_run_and_reads_the_compilation_cache(
    tmp_path, data_dir, straight_run):
  straight, summary, cache = straight_run
  # The last step (a multiple of the save interval) is saved once, after the final
  # evaluation, so its checkpoint carries that evaluation's metrics.
  final_meta = checkpoints.load_metadata(os.path.join(straight, "checkpoints"), 4)
  assert final_meta["metrics"]["eval/loss"] == pytest.approx(summary["eval"]["eval/loss"])
  # Profile and goodput: steps 1 and 2 were traced, in one trace (TensorBoard's
  # profile plugin layout).
  assert len(glob.glob(os.path.join(straight, "logs", "profile", "plugins", "profile", "*",
                                    "*.xplane.pb"))) == 1
  perf = summary["train"]
  assert 0 < perf["perf/goodput"] <= 1 and perf["perf/step_time_s"] > 0
  assert {"perf/data_s", "perf/eval_s", "perf/checkpoint_s"} <= perf.keys()
  assert os.listdir(cache)  # the compiled programs were written

  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None)
  resumed = str(tmp_path / "resumed")
  with _own_compilation_cache():
    run = functools.partial(loop_testing.run, "pretrain", resumed, data_dir,
                            train_settings=dict(compilation_cache_dir=cache))
    first = run(num_steps=2)
    assert first["step"] == 2
    # A resumed run in a fresh process compiles nothing: here, with JAX's in-memory
    # caches cleared, the programs come from the persistent cache.
    jax.clear_caches()
    hits.clear()
    second = run(num_steps=4)
    assert second["step"] == 4
    assert hits, "the resumed run recompiled instead of reading the cache"
  # Same batches in the same order and the same updates: equal parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               loop_testing.final_params(resumed), loop_testing.final_params(straight))
  # Logged losses are means since the previous log (every 2 steps); steps 3-4 are
  # an interval in both runs.
  straight_losses, resumed_losses = dict(_losses(straight)), dict(_losses(resumed))
  np.testing.assert_allclose(resumed_losses[4], straight_losses[4], rtol=1e-6)
  assert straight_losses[4] < straight_losses[2]  # it learns


def test_nonfinite_update_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir,
                                                                   straight_run):
  workdir = str(tmp_path / "nan")
  shutil.copytree(straight_run[0], workdir)  # continues the straight run from its step 4
  good = loop_testing.final_params(workdir)
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite at step \d.*last good checkpoint"):
    loop.train("pretrain", workdir,
               train_config=loop.TrainConfig(num_steps=6, data_dir=data_dir,
                                             **loop_testing.TINY_TRAIN),
               model=loop.ModelSetup(preset="t5-v1_1-tiny"),
               # A learning rate of 1e30 makes the weights overflow within two updates.
               optimizer=loop.state_lib.OptimizerConfig(learning_rate=1e30),
               checkpoint=checkpoints.CheckpointConfig(save_interval_steps=2, async_save=False),
               mesh=loop.partitioning.MeshConfig(data=-1), progress=False,
               allow_changes=True)  # another learning rate on purpose
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpoints.latest_step(ckpt_dir) == 4
  restored = loop_testing.final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, restored, good)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_distill_from_a_pretrained_teacher_trains_every_recipe_term(tmp_path, data_dir,
                                                                    straight_run):
  teacher = straight_run[0]
  student = str(tmp_path / "student")
  summary = loop_testing.run("distill", student, data_dir, num_steps=2, teacher=teacher,
                             student_shape="1L-32H")
  for key in ("loss/logits", "loss/decoder_self", "loss/decoder_cross", "grad_norm/encoder",
              "grad_norm/decoder", "perf/tokens_per_s", "eval/loss"):
    assert key in summary["train"] or key in summary["eval"], key
  meta = checkpoints.load_metadata(os.path.join(student, "checkpoints"))
  assert meta["run"]["recipe"] == "miniend_d"
  assert meta["model_config"]["num_layers"] == 1


def test_bad_setups_fail_before_compiling(tmp_path, data_dir):
  workdir = str(tmp_path / "bad")
  with pytest.raises(ValueError, match="distill needs a teacher"):
    loop_testing.run("distill", workdir, data_dir, num_steps=1)
  with pytest.raises(checkpoints.NoCheckpointError, match="no checkpoint in"):
    loop_testing.run("distill", workdir, data_dir, num_steps=1, teacher=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
    loop_testing.run("finetune", workdir, data_dir, num_steps=1,
                     init_from=str(tmp_path / "missing"))
  # A model whose vocabulary is smaller than the task's.
  with pytest.raises(ValueError, match="vocab_size=128, but the task's vocabulary has"):
    loop_testing.run("pretrain", workdir, data_dir, num_steps=1, overrides={"vocab_size": 128})
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_convert_writes_a_teacher_that_restores_into_its_sharding(tmp_path, data_dir):
  from miniend_jax.model import hf, presets, t5  # pylint: disable=import-outside-toplevel
  config = presets.get_model_config("t5-v1_1-tiny", vocab_size=256)
  hf.save_hf(config, t5.init_params(config, jax.random.key(3)), str(tmp_path / "hf"))
  out = loop.convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), dtype="bfloat16")
  _, expected = hf.load_hf(str(tmp_path / "hf"), param_dtype="bfloat16")
  mesh = loop.partitioning.make_mesh(loop.partitioning.MeshConfig(data=1, fsdp=-1))
  shardings = loop.partitioning.logical_to_sharding(t5.param_logical_axes(config), mesh)
  restored = loop.load_params(out, config.replace(param_dtype="bfloat16"), shardings)
  for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                                 jax.tree.leaves(shardings)):
    assert got.dtype == want.dtype and got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    loop.convert(str(tmp_path / "hf"), out)
