"""Every gin_configs/runs and gin_configs/models file parses and builds valid configs."""

import glob
import os

import gin
import pytest

from miniend_jax.cli import gin_flags
from miniend_jax.distill import recipe as recipe_lib
from miniend_jax.model import presets
from miniend_jax.train import checkpoints, loop, partitioning, program, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = sorted(glob.glob(os.path.join(ROOT, "gin_configs", "runs", "*.gin")))
MODELS = sorted(glob.glob(os.path.join(ROOT, "gin_configs", "models", "*.gin")))


def _build_all():
  """Instantiates every configurable as gin binds it (runs each config's own checks)."""
  return (loop.TrainConfig(), loop.ModelSetup(), state_lib.OptimizerConfig(),
          checkpoints.CheckpointConfig(), partitioning.MeshConfig())


def test_there_are_paper_and_quickstart_runs():
  names = {os.path.basename(p) for p in RUNS}
  assert {"paper_t5_base_6L384H.gin", "paper_t5_base_6L768H.gin",
          "paper_t5_3b_6L384H_interpolated.gin", "paper_finetune_glue.gin",
          "paper_finetune_cnn_dailymail.gin", "paper_finetune_xsum.gin",
          "quickstart_distill.gin"} <= names
  assert len(MODELS) >= 6


@pytest.mark.parametrize("path", RUNS + MODELS, ids=os.path.basename)
def test_gin_file_parses(path):
  gin_flags.parse_gin([os.path.relpath(path, ROOT) if os.getcwd() == ROOT else path], [])
  train, model, optimizer, checkpoint, mesh = _build_all()
  assert train.num_steps > 0 and optimizer.learning_rate > 0
  assert checkpoint.save_interval_steps >= 1 and mesh.model >= 1
  assert model.student_shape


def _parse(name, *bindings):
  gin_flags.parse_gin([os.path.join(ROOT, "gin_configs", "runs", name)], list(bindings))
  return _build_all()


def _bound_recipe():
  """The Recipe that `train.recipe` is bound to (a preset name or a gin reference)."""
  value = gin.query_parameter("train.recipe")
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return recipe_lib.get_recipe(value) if isinstance(value, str) else value


def test_paper_distillation_settings():
  train, model, optimizer, _, mesh = _parse("paper_t5_base_6L384H.gin")
  assert train.task == "c4_span_corruption" and train.inputs_length == 512
  assert model.teacher == "google/t5-v1_1-base" and model.student_shape == "6L-384H"
  assert optimizer.total_steps is None  # the decay follows the run's length (--num_steps)
  assert _bound_recipe().name == "miniend_d"
  gin.clear_config()
  # --recipe is a later binding and wins over the file's recipe.
  _parse("paper_t5_base_6L384H.gin", "train.recipe = 'kd_logits'")
  assert _bound_recipe().name == "kd_logits"
  gin.clear_config()
  _, model, *_ = _parse("paper_t5_base_6L768H.gin")
  assert model.student_shape == "6L-768H" and model.teacher == "google/t5-v1_1-base"
  gin.clear_config()
  train, model, _, _, mesh = _parse("paper_t5_3b_6L384H_interpolated.gin")
  # A pod run names Google's T5X checkpoint (a hub id is refused on several hosts),
  # whose shape its path alone gives (the run plans offline).
  assert model.teacher.startswith("gs://t5-data/") and model.student_shape == "6L-384H"
  assert program.model_config_of(model.teacher) == presets.get_model_config("t5-v1_1-xl")
  assert mesh.fsdp == 4 and train.task == "c4_span_corruption"
  recipe = _bound_recipe()
  assert recipe.name == "miniend_e_interpolated"
  assert all(t.teacher_layer == -4 and t.interpolation is not None for t in recipe.terms)


def test_paper_finetuning_settings():
  train, model, *_ = _parse("paper_finetune_glue.gin", "TrainConfig.task = 'glue_rte'")
  assert train.task == "glue_rte" and model.overrides == {"dropout_rate": 0.1}
  assert gin.query_parameter("evaluate.max_decode_length") == 8
  gin.clear_config()
  train, *_ = _parse("paper_finetune_xsum.gin")
  assert train.task == "xsum" and train.targets_length == 64
  assert gin.query_parameter("evaluate.num_beams") == 4
  gin.clear_config()
  train, *_ = _parse("paper_finetune_cnn_dailymail.gin")
  assert train.task == "cnn_dailymail" and train.targets_length == 128


@pytest.mark.parametrize("teacher, shape", [("t5-v1_1-mini", "2L-64H"),
                                            ("t5-v1_1-base", "6L-384H")])
def test_the_readme_recipe_example_resolves(teacher, shape):
  """README's "Adding a recipe" example, against the quickstart's and the paper's models."""
  from miniend_jax.model import presets, student  # pylint: disable=import-outside-toplevel
  gin_flags.parse_gin([os.path.join(ROOT, "gin_configs", "recipes", "examples", "my_path.gin")],
                      [])
  recipe = gin.query_parameter("%RECIPE").scoped_configurable_fn()
  teacher_config = presets.get_model_config(teacher)
  resolved = recipe.resolve(teacher_config, student.student_config(teacher_config, shape))
  assert resolved.name == "my_path" and {t.kind for t in resolved.terms} == {"logits",
                                                                            "decoder_cross"}
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(ROOT, "gin_configs", "recipes", "examples", "my_path.gin")) as f:
    example = "".join(line for line in f if not line.startswith("#")).strip()
  assert example in readme  # the README shows this very file
