"""The quickstart's stages, in the order `pipeline.run` calls them.

  prepare_data            harvest the pydoc corpus, train its vocabulary
  pretrain_teacher        a small T5 v1.1 teacher on pydoc span corruption
  distill_student         one student per path and seed (same init, data, rate per seed)
  finetune_and_evaluate   one model, one seed, one task: finetune, then greedy-decode
  measure_speed           jitted forward throughput of teacher vs student

Each stage claims its directory with the settings that decide its result
(`bookkeeping.claim_settings`) and is skipped when it finished earlier. No
stage's settings name the number of seeds, so adding seeds to a finished run
reuses every seed it already has.

Work directory layout:

  WORKDIR/pydoc/                                corpus and vocabulary
  WORKDIR/teacher/                              the teacher's pretraining run
  WORKDIR/distill/<path>/seed<k>/               each distilled student
  WORKDIR/finetune/<model>/seed<k>/<task>/      each finetuning run, eval/<task>.json inside
  WORKDIR/speed.json                            forward throughput
"""

from __future__ import annotations

import dataclasses
import json
import os

from miniend_jax.quickstart import runs
from miniend_jax.quickstart.bookkeeping import claim_settings, read_json, run_finished
from miniend_jax.quickstart.runs import Context
from miniend_jax.quickstart.settings import SPAN_TASK

TEACHER = "teacher"


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained model a later stage starts from."""

  name: str          # "teacher" or the student's path
  directory: str     # its run directory (checkpoints, summary.json, logs)
  fingerprint: str   # of the settings it was made with


def _common(ctx: Context) -> dict:
  s = ctx.settings
  return {"batch_size": s.batch_size, "inputs_length": s.inputs_length,
          "targets_length": s.targets_length, "dropout_rate": s.dropout_rate}


def prepare_data(ctx: Context) -> None:
  """The corpus and vocabulary (reused when complete); registers the tasks either way."""
  from miniend_jax.data import local_corpus  # pylint: disable=import-outside-toplevel
  corpus_dir = os.path.join(ctx.workdir, "pydoc")
  ready = (os.path.exists(os.path.join(corpus_dir, "manifest.json")) and os.path.exists(
      os.path.join(corpus_dir, f"vocab_{local_corpus.DEFAULT_VOCAB_SIZE}", "spiece.model")))
  setup = lambda: local_corpus.setup_pydoc_tasks(ctx.workdir)
  ctx.stages.run("data", ready, setup, "harvesting the pydoc corpus and training its vocabulary")
  if ready:  # the tasks still need registering in this process
    setup()


def validation_counts(ctx: Context) -> dict[str, int]:
  """{task: validation examples scored} (the split's size, or fewer when capped)."""
  manifest = read_json(os.path.join(ctx.workdir, "pydoc", "manifest.json")) or {}
  counts = {}
  for task in ctx.settings.tasks:
    n = manifest.get("counts", {}).get(task, {}).get("validation")
    if n is not None and ctx.settings.eval_examples is not None:
      n = min(n, ctx.settings.eval_examples)
    counts[task] = n
  return counts


def pretrain_teacher(ctx: Context) -> Model:
  s = ctx.settings
  directory = os.path.join(ctx.workdir, TEACHER)
  fp = claim_settings(directory, {
      "stage": "pretrain", "preset": s.teacher_preset, "steps": s.teacher_steps,
      "learning_rate": s.learning_rate, "eval_batches": s.eval_batches, "seed": s.seed,
      **_common(ctx)})
  ctx.stages.run(
      TEACHER, run_finished(directory, s.teacher_steps),
      lambda: runs.train(ctx, "pretrain", directory, task=SPAN_TASK, steps=s.teacher_steps,
                         learning_rate=s.learning_rate, seed=s.seed,
                         model=runs.model_setup(s, preset=s.teacher_preset)),
      f"pretraining {s.teacher_preset} for {s.teacher_steps} steps")
  return Model(TEACHER, directory, fp)


def distill_student(ctx: Context, teacher: Model, path: str, seed: int) -> Model:
  """The student of `path` for `seed`: initialisation and data order come from the seed
  alone, so every path of one seed starts from the same weights and sees the same batches."""
  s = ctx.settings
  directory = os.path.join(ctx.workdir, "distill", path, f"seed{seed}")
  fp = claim_settings(directory, {
      "stage": "distill", "recipe": path, "student_shape": s.student_shape, "steps": s.steps,
      "learning_rate": s.learning_rate, "eval_batches": s.eval_batches,
      "teacher": teacher.fingerprint, "seed": seed, **_common(ctx)})
  ctx.stages.run(
      f"distill {path} seed {seed}", run_finished(directory, s.steps),
      lambda: runs.train(ctx, "distill", directory, task=SPAN_TASK, steps=s.steps,
                         learning_rate=s.learning_rate, seed=seed, recipe=path,
                         model=runs.model_setup(s, teacher=teacher.directory,
                                                teacher_dtype="float32",
                                                student_shape=s.student_shape,
                                                student_init="random")),
      f"{s.student_shape} student, recipe {path}, {s.steps} steps")
  return Model(path, directory, fp)


def finetune_directory(workdir: str, model: str, seed: int, task: str) -> str:
  return os.path.join(workdir, "finetune", model, f"seed{seed}", task)


def finetune_and_evaluate(ctx: Context, model: Model, seed: int, task: str) -> str:
  """Finetunes `model` on `task` with `seed`, then scores it; returns the run directory."""
  s = ctx.settings
  directory = finetune_directory(ctx.workdir, model.name, seed, task)
  label = f"{model.name} seed {seed} on {task}"
  fp = claim_settings(directory, {
      "stage": "finetune", "task": task, "steps": s.finetune_steps,
      "learning_rate": s.finetune_learning_rate, "init": model.fingerprint,
      "eval_batches": s.eval_batches, "seed": seed, **_common(ctx)})
  ctx.stages.run(
      f"finetune {label}", run_finished(directory, s.finetune_steps),
      lambda: runs.train(ctx, "finetune", directory, task=task, steps=s.finetune_steps,
                         learning_rate=s.finetune_learning_rate, seed=seed,
                         model=runs.model_setup(s, init_from=model.directory)),
      f"{s.finetune_steps} steps")
  eval_dir = os.path.join(directory, "eval")
  claim_settings(eval_dir, {"stage": "evaluate", "task": task, "model": fp,
                            "num_examples": s.eval_examples, "inputs_length": s.inputs_length,
                            "targets_length": s.targets_length})
  ctx.stages.run(f"evaluate {label}", os.path.exists(os.path.join(eval_dir, f"{task}.json")),
                 lambda: runs.evaluate(ctx, directory, task),
                 "greedy decoding on the validation split")
  return directory


def measure_speed(ctx: Context, teacher: Model) -> dict:
  """{"examples_per_s": {"teacher": .., "student": ..}, "device", "method", "settings"}."""
  import jax  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import student as student_lib  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  s = ctx.settings
  path = os.path.join(ctx.workdir, "speed.json")
  settings = {"teacher": teacher.fingerprint, "student_shape": s.student_shape,
              "batch_size": s.batch_size, "inputs_length": s.inputs_length,
              "targets_length": s.targets_length}
  record = read_json(path) or {}

  def measure():
    teacher_config = loop.load_model(teacher.directory)[0]
    configs = {"teacher": teacher_config,
               "student": student_lib.student_config(teacher_config, s.student_shape)}
    rates = runs.measure_forward_speed(configs, s.batch_size, s.inputs_length,
                                       s.targets_length)
    device = jax.devices()[0]
    out = {"settings": settings, "examples_per_s": rates,
           "device": f"{device.device_kind} ({device.platform})",
           "method": "jitted teacher-forced forward pass on one device, fixed random batch "
                     f"{s.batch_size} x ({s.inputs_length} + {s.targets_length}) tokens, "
                     "best of 4 alternating rounds"}
    with open(path, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
    return out

  measured = ctx.stages.run("speed", record.get("settings") == settings, measure,
                            "timing teacher and student forward passes")
  return measured or record
