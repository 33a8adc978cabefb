"""What decides the quickstart's results: `Settings`, its named sizes and checks."""

from __future__ import annotations

import dataclasses
from typing import Any

# Every path of the paper's table (Figure 1 and poster), in its order.
DEFAULT_PATHS = ("scratch", "kd_logits", "minilm", "kd_logits_minilm", "miniend_d",
                 "miniend_d_nologit", "miniend_e", "miniend_e_nologit")
# The paper's name for each path's row (Figure 1 and poster).
PAPER_ROWS = {"scratch": "from scratch", "kd_logits": "MlmKD", "minilm": "MiniLM",
              "kd_logits_minilm": "MlmKD + MiniLM (implicit)",
              "implicit": "MlmKD + MiniLM (implicit)", "miniend_d": "MiniEnD-D",
              "miniend_d_nologit": "MiniEnD-D w/o logits", "miniend_e": "MiniEnD-E",
              "miniend_e_nologit": "MiniEnD-E w/o logits"}
BASELINE = "scratch"  # what every path is compared with
TASKS = ("pydoc_summary", "pydoc_topic")
SPAN_TASK = "pydoc_span_corruption"
# The metric shown in the table for each task (the CSV and JSON have all of them).
PRIMARY_METRIC = {"pydoc_summary": "rougeLsum", "pydoc_topic": "accuracy"}
DEFAULT_WORKDIR = "quickstart_workdir"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the quickstart's results.

  Attributes:
    size: the named size the other fields came from (`SIZES`).
    teacher_preset: `presets.MODEL_PRESETS` name of the pretrained teacher.
    student_shape: `presets.STUDENT_SHAPES` name shared by every student.
    teacher_steps / steps / finetune_steps: pretraining, distillation (each
      path and seed) and finetuning (each model, seed and task) steps.
    batch_size, inputs_length, targets_length: used by every stage.
    learning_rate: peak AdamW rate of pretraining and distillation (cosine
      decay to 10%, 5% warm-up); finetune_learning_rate: of finetuning.
    eval_batches: validation batches of the held-out span-corruption loss
      and of each finetuned model's validation loss.
    eval_examples: validation examples decoded and scored per task (None: the
      whole validation split).
    paths: distillation recipes, one student each (`distill.named.RECIPES`).
    tasks: downstream tasks.
    finetune_teacher: also finetune and score the teacher (the table's
      upper reference, not compared), with the first seed only.
    seed: the first seed; the teacher is pretrained with it.
    seeds: how many seeds (seed, seed + 1, ...): each gives every path the
      same student initialisation, data order and learning rate, and is
      finetuned with the same seed.
    dropout_rate: of every model in every stage.
  """

  size: str = "cpu"
  teacher_preset: str = "t5-v1_1-mini"
  student_shape: str = "2L-64H"
  teacher_steps: int = 800
  steps: int = 160
  finetune_steps: int = 80
  batch_size: int = 16
  inputs_length: int = 64
  targets_length: int = 16
  learning_rate: float = 3e-3
  finetune_learning_rate: float = 1e-3
  eval_batches: int = 8
  eval_examples: int | None = None
  paths: tuple[str, ...] = DEFAULT_PATHS
  tasks: tuple[str, ...] = TASKS
  finetune_teacher: bool = True
  seed: int = 0
  seeds: int = 2
  dropout_rate: float = 0.0

  @property
  def seed_values(self) -> tuple[int, ...]:
    return tuple(range(self.seed, self.seed + self.seeds))


# Named sizes. "cpu" is the default: every path of the paper's table with 2 seeds in
# under 15 minutes on 2 CPU cores (steps traded for paths and seeds). "gpu" is the same
# study bigger, for a GPU or TPU: a 8+8-layer teacher, 4+4-layer students, longer runs,
# bigger batches, 4 seeds, dropout against the small corpus.
SIZES: dict[str, dict[str, Any]] = {
    "cpu": dict(teacher_preset="t5-v1_1-mini", student_shape="2L-64H", teacher_steps=800,
                steps=160, finetune_steps=80, batch_size=16, inputs_length=64,
                targets_length=16, learning_rate=3e-3, finetune_learning_rate=1e-3,
                eval_batches=8, eval_examples=None, seeds=2, dropout_rate=0.0),
    "gpu": dict(teacher_preset="t5-v1_1-small", student_shape="4L-256H", teacher_steps=3000,
                steps=1500, finetune_steps=400, batch_size=32, inputs_length=128,
                targets_length=32, learning_rate=1e-3, finetune_learning_rate=5e-4,
                eval_batches=16, eval_examples=None, seeds=4, dropout_rate=0.1),
}


def make_settings(size: str = "cpu", **overrides) -> Settings:
  """The settings of a named size with overrides (None values are ignored)."""
  if size not in SIZES:
    raise ValueError(f"Unknown quickstart size {size!r}; one of {sorted(SIZES)}.")
  values = {"size": size, **SIZES[size]}
  for key, value in overrides.items():
    if key not in Settings.__dataclass_fields__:
      raise TypeError(f"Unknown quickstart setting {key!r}.")
    if value is not None:
      values[key] = tuple(value) if key in ("paths", "tasks") else value
  settings = Settings(**values)
  validate(settings)
  return settings


def validate(s: Settings) -> None:
  """Raises ValueError naming the first setting that cannot work."""
  from miniend_jax.distill.named import RECIPES  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  if not s.paths:
    raise ValueError("quickstart needs at least one path (e.g. --paths scratch,miniend_d).")
  unknown = [p for p in s.paths if p not in RECIPES]
  if unknown:
    raise ValueError(f"Unknown path(s) {unknown}; choose from {sorted(RECIPES)}.")
  objectives = [RECIPES[p].name for p in s.paths]  # an alias is its target's objective
  if len(set(objectives)) != len(objectives):
    raise ValueError(f"Paths repeat an objective: {list(s.paths)} are {objectives}.")
  bad_tasks = [t for t in s.tasks if t not in TASKS]
  if bad_tasks:
    raise ValueError(f"Unknown task(s) {bad_tasks}; the quickstart's tasks are {TASKS}.")
  try:
    presets.get_model_config(s.teacher_preset)
    presets.get_student_shape(s.student_shape)
  except KeyError as e:
    raise ValueError(e.args[0]) from None
  for name in ("teacher_steps", "steps", "finetune_steps", "batch_size", "inputs_length",
               "targets_length", "eval_batches", "seeds"):
    if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
      raise ValueError(f"quickstart {name}={getattr(s, name)!r} must be a positive integer.")
  if not isinstance(s.seed, int) or s.seed < 0:
    raise ValueError(f"quickstart seed={s.seed!r} must be a non-negative integer.")
  if s.eval_examples is not None and s.eval_examples < 1:
    raise ValueError(f"quickstart eval_examples={s.eval_examples!r} must be positive or None.")
  if not 0.0 <= s.dropout_rate < 1.0:
    raise ValueError(f"quickstart dropout_rate={s.dropout_rate!r} must be in [0, 1).")
