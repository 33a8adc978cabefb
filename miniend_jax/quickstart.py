"""`miniend quickstart`: the whole method end to end, offline, on a CPU in minutes.

Stages (each recorded, so a re-run resumes and skips what is finished):

  1. data        harvest the embedded pydoc corpus, train its vocabulary
  2. teacher     pretrain a small T5 v1.1 teacher on pydoc span corruption
  3. distill     one student per path (recipe), all at equal steps and data
  4. finetune    the teacher and every student on pydoc_summary and pydoc_topic
  5. evaluate    ROUGE (pydoc_summary) and accuracy (pydoc_topic), greedy decoding
  6. speed       jitted forward throughput of teacher vs student, same process
  7. report      results.md / results.csv / results.json and PNG plots

Work directory layout:

  WORKDIR/pydoc/                      corpus and vocabulary (shared by all runs)
  WORKDIR/teacher/                    the teacher's pretraining run
  WORKDIR/distill/<path>/             each distilled student
  WORKDIR/finetune/<model>/<task>/    each finetuning run, with eval/<task>.json
  WORKDIR/speed.json                  forward throughput
  WORKDIR/results.{md,csv,json}       the comparison table
  WORKDIR/{loss_curves,grad_norms,scores}.png
  WORKDIR/jax_cache/                  persistent XLA compilation cache

A stage is finished when its run's summary.json reaches its step count (or its
eval file exists); every stage directory records the settings it was made with
(`quickstart_stage.json`), and re-running with different settings on the same
directory stops with an error instead of silently mixing results.

Python API:

  from miniend_jax import quickstart
  result = quickstart.run("/tmp/qs", size="tiny", paths=("scratch", "miniend_d"))
  print(result["table"])
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

DEFAULT_PATHS = ("scratch", "kd_logits", "minilm", "implicit", "miniend_d", "miniend_e")
TASKS = ("pydoc_summary", "pydoc_topic")
SPAN_TASK = "pydoc_span_corruption"
# The metric shown in the table for each task (the CSV has all of them).
PRIMARY_METRIC = {"pydoc_summary": "rougeLsum", "pydoc_topic": "accuracy"}
STAGE_FILE = "quickstart_stage.json"
# No dropout anywhere: T5 v1.1 pretrains without it, and these runs are far too short to
# overfit; one value for every model keeps the comparison even.
DROPOUT_RATE = 0.0
DEFAULT_WORKDIR = "quickstart_workdir"


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the quickstart's results.

  Attributes:
    size: the preset the other fields came from ("tiny" or "small").
    teacher_preset: `presets.MODEL_PRESETS` name of the pretrained teacher.
    student_shape: `presets.STUDENT_SHAPES` name shared by every student.
    teacher_steps / steps / finetune_steps: pretraining, distillation (each
      path, equal for all) and finetuning (each model and task) steps.
    batch_size, inputs_length, targets_length: used by every stage.
    learning_rate: peak AdamW rate of pretraining and distillation (cosine
      decay to 10%, 5% warm-up); finetune_learning_rate: of finetuning.
    eval_batches: validation batches of the held-out span-corruption loss.
    eval_examples: validation examples scored per downstream task (None: all).
    paths: distillation recipes, one student each (`distill.recipe.RECIPES`).
    tasks: downstream tasks.
    finetune_teacher: also finetune and score the teacher (the table's
      upper reference).
    seed: data order, noise and initialisation.
  """

  size: str = "tiny"
  teacher_preset: str = "t5-v1_1-tiny"
  student_shape: str = "1L-32H"
  teacher_steps: int = 600
  steps: int = 300
  finetune_steps: int = 150
  batch_size: int = 16
  inputs_length: int = 64
  targets_length: int = 16
  learning_rate: float = 3e-3
  finetune_learning_rate: float = 1e-3
  eval_batches: int = 8
  eval_examples: int | None = 160
  paths: tuple[str, ...] = DEFAULT_PATHS
  tasks: tuple[str, ...] = TASKS
  finetune_teacher: bool = True
  seed: int = 0


# Named sizes. "tiny" is the default: the whole default run fits in well under
# 15 minutes on 2 CPU cores. "small" is for a GPU / TPU / Colab (or a patient CPU).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(teacher_preset="t5-v1_1-tiny", student_shape="1L-32H", teacher_steps=600,
                 steps=300, finetune_steps=150, batch_size=16, inputs_length=64,
                 targets_length=16, eval_batches=8, eval_examples=160),
    "small": dict(teacher_preset="t5-v1_1-mini", student_shape="2L-64H", teacher_steps=4000,
                  steps=2000, finetune_steps=600, batch_size=32, inputs_length=128,
                  targets_length=32, eval_batches=16, eval_examples=None),
}


def make_settings(size: str = "tiny", **overrides) -> Settings:
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
  _validate(settings)
  return settings


def _validate(s: Settings) -> None:
  from miniend_jax.distill.recipe import RECIPES  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  if not s.paths:
    raise ValueError("quickstart needs at least one path (e.g. --paths scratch,miniend_d).")
  unknown = [p for p in s.paths if p not in RECIPES]
  if unknown:
    raise ValueError(f"Unknown path(s) {unknown}; choose from {sorted(RECIPES)}.")
  if len(set(s.paths)) != len(s.paths):
    raise ValueError(f"Paths repeat: {list(s.paths)}.")
  bad_tasks = [t for t in s.tasks if t not in TASKS]
  if bad_tasks:
    raise ValueError(f"Unknown task(s) {bad_tasks}; the quickstart's tasks are {TASKS}.")
  presets.get_model_config(s.teacher_preset)
  presets.get_student_shape(s.student_shape)
  for name in ("teacher_steps", "steps", "finetune_steps", "batch_size", "inputs_length",
               "targets_length", "eval_batches"):
    if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
      raise ValueError(f"quickstart {name}={getattr(s, name)!r} must be a positive integer.")
  if s.eval_examples is not None and s.eval_examples < 1:
    raise ValueError(f"quickstart eval_examples={s.eval_examples!r} must be positive or None.")


class StageMismatchError(RuntimeError):
  """A stage directory was made with other settings than the ones asked for now."""


class Preempted(RuntimeError):
  """A training stage stopped early on SIGTERM (its checkpoint is saved; re-run to resume)."""


# ----------------------------------------------------------------------------
# Stage bookkeeping.


def _fingerprint(settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def claim_settings(directory: str, settings: Mapping[str, Any], filename: str = STAGE_FILE) -> str:
  """Records `settings` in `directory` (or checks them against the recorded ones).

  Returns the settings' fingerprint; raises StageMismatchError, naming what
  changed, when `directory` was made with other settings.
  """
  path = os.path.join(directory, filename)
  fingerprint = _fingerprint(settings)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    if recorded.get("fingerprint") != fingerprint:
      old = recorded.get("settings", {})
      diff = {k: (old.get(k), settings.get(k)) for k in sorted(set(old) | set(settings))
              if old.get(k) != settings.get(k)}
      raise StageMismatchError(
          f"{directory} was made with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}). "
          "Re-run with the same flags to resume, use another --workdir, or delete that "
          "directory (and those made from it) to redo it.")
    return fingerprint
  os.makedirs(directory, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump({"fingerprint": fingerprint, "settings": dict(settings)}, f, indent=1)
  os.replace(path + ".tmp", path)
  return fingerprint


def read_json(path: str) -> dict | None:
  """The JSON in `path`, or None when it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def run_finished(directory: str, num_steps: int) -> bool:
  """Whether the training run in `directory` completed `num_steps` (its summary says so)."""
  summary = read_json(os.path.join(directory, "summary.json"))
  return bool(summary) and summary.get("step") == num_steps and not summary.get("preempted")


# ----------------------------------------------------------------------------
# Helpers around the run API.


def _quiet_logs():
  """Context manager: absl / TensorFlow / orbax chatter at ERROR only."""
  @contextlib.contextmanager
  def manager():
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow", "orbax", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
      lg.setLevel(logging.ERROR)
    try:
      yield
    finally:
      for lg, level in zip(loggers, levels):
        lg.setLevel(level)
  return manager()


def enable_compilation_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in `directory` unless one is set.

  The students of every path compile identical finetuning and evaluation
  programs, and a re-run compiles everything again; the cache makes those
  compilations disk reads. Returns whether this call enabled it.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if jax.config.jax_compilation_cache_dir:
    return False
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:  # The cache decides once per process whether it is used; let it decide again.
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.reset_cache()
  except (ImportError, AttributeError):
    pass
  return True


def _log_every(steps: int) -> int:
  return max(1, steps // 50)


def _train(mode: str, directory: str, s: Settings, workdir: str, *, task: str, steps: int,
           learning_rate: float, model, recipe: str = "scratch", eval_every: int = 0,
           progress: bool = False) -> dict:
  from miniend_jax.train import checkpoints, loop, partitioning  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  train_config = loop.TrainConfig(
      task=task, inputs_length=s.inputs_length, targets_length=s.targets_length,
      batch_size=s.batch_size, num_steps=steps, seed=s.seed, pack=True,
      log_every=_log_every(steps), eval_every=eval_every, eval_batches=s.eval_batches,
      eval_split="validation", data_dir=workdir)
  optimizer = state_lib.OptimizerConfig(
      name="adamw", learning_rate=learning_rate, warmup_steps=max(1, steps // 20),
      decay="cosine", total_steps=steps, end_learning_rate=0.1, weight_decay=0.0,
      grad_clip_norm=1.0, grad_accum_steps=1)
  # Few saves: each costs about a second here, and a run is minutes long.
  checkpoint = checkpoints.CheckpointConfig(save_interval_steps=max(100, steps // 2),
                                            max_to_keep=1, best_metric=None, async_save=True)
  summary = loop.train(mode, directory, train_config=train_config, model=model,
                       optimizer=optimizer, checkpoint=checkpoint,
                       mesh=partitioning.MeshConfig(data=-1, fsdp=1, model=1),
                       recipe=recipe, progress=progress)
  if summary.get("preempted"):  # never build the next stage on a half-trained model
    raise Preempted(f"Stopped by SIGTERM at step {summary['step']} of {steps} in {directory} "
                    "(checkpoint saved); run the same command again to resume.")
  return summary


def measure_forward_speed(configs: Mapping[str, Any], batch_size: int, inputs_length: int,
                          targets_length: int, *, rounds: int = 4,
                          min_round_seconds: float = 0.25) -> dict[str, float]:
  """Examples per second of a jitted forward pass (teacher-forced) of each config.

  All models run on the same fixed random batch, alternating round by round so
  that a change in machine load affects them alike; each model's best round
  counts.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from miniend_jax.model import t5  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  fns = {}
  for name, config in configs.items():
    config = config.replace(dtype="float32", param_dtype="float32", dropout_rate=0.0)
    params = jax.device_put(t5.init_params(config, jax.random.key(0)), device)
    enc = jax.device_put(rng.integers(2, config.vocab_size - 200,
                                      (batch_size, inputs_length), dtype=np.int32), device)
    dec = jax.device_put(rng.integers(2, config.vocab_size - 200,
                                      (batch_size, targets_length), dtype=np.int32), device)
    model = t5.T5(config)
    fn = jax.jit(lambda p, e, d, model=model: model.apply({"params": p}, e, d).logits)
    fn(params, enc, dec).block_until_ready()  # compile
    fns[name] = (fn, params, enc, dec)
  best = {name: 0.0 for name in fns}
  iterations = {name: 1 for name in fns}
  for _ in range(rounds):
    for name, (fn, params, enc, dec) in fns.items():
      while True:
        start = time.perf_counter()
        for _ in range(iterations[name]):
          out = fn(params, enc, dec)
        out.block_until_ready()
        elapsed = time.perf_counter() - start
        if elapsed >= min_round_seconds or iterations[name] >= 1 << 16:
          break
        iterations[name] *= 2
      best[name] = max(best[name], iterations[name] * batch_size / elapsed)
  return best


# ----------------------------------------------------------------------------
# The pipeline.


def run(workdir: str = DEFAULT_WORKDIR, *, size: str = "tiny", paths: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None, steps: int | None = None,
        teacher_steps: int | None = None, finetune_steps: int | None = None,
        batch_size: int | None = None, inputs_length: int | None = None,
        targets_length: int | None = None, eval_examples: int | None = None,
        finetune_teacher: bool | None = None, seed: int | None = None,
        settings: Settings | None = None, compilation_cache: bool = True,
        progress: bool = False, verbose: bool = True,
        on_stage: Callable[[str, str], None] | None = None) -> dict:
  """Runs (or resumes) the quickstart in `workdir`; returns the results.

  Args:
    workdir: the work directory (created).
    size: "tiny" (default; CPU minutes) or "small" (accelerator minutes).
    paths, tasks, steps, ...: override single fields of the size's `Settings`.
    settings: a complete `Settings` instead of size + overrides.
    compilation_cache: use a persistent XLA compilation cache in
      `workdir/jax_cache` (unless one is already configured).
    progress: per-step progress bars of the training runs.
    verbose: print each stage and the final table.
    on_stage: called as on_stage(stage_name, "ran" | "skipped") after each stage.

  Returns:
    {"rows": [...], "table": markdown, "notes": [...], "files": {name: path},
     "stages": [(stage, "ran" | "skipped", seconds)], "seconds": total,
     "settings": {...}}.
  """
  started = time.perf_counter()
  if settings is None:
    settings = make_settings(
        size, paths=paths, tasks=tasks, steps=steps, teacher_steps=teacher_steps,
        finetune_steps=finetune_steps, batch_size=batch_size, inputs_length=inputs_length,
        targets_length=targets_length, eval_examples=eval_examples,
        finetune_teacher=finetune_teacher, seed=seed)
  else:
    _validate(settings)
  with _quiet_logs():
    return _pipeline(workdir, settings, started=started, compilation_cache=compilation_cache,
                     progress=progress, verbose=verbose, on_stage=on_stage)


def _pipeline(workdir: str, s: Settings, *, started: float, compilation_cache: bool,
              progress: bool, verbose: bool, on_stage) -> dict:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  say = (lambda text: print(f"[quickstart] {text}", flush=True)) if verbose else (lambda _: None)

  import jax  # pylint: disable=import-outside-toplevel
  if compilation_cache:
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
  # Every device takes an equal share of the batch.
  if s.batch_size % jax.device_count():
    rounded = -(-s.batch_size // jax.device_count()) * jax.device_count()
    say(f"batch_size {s.batch_size} -> {rounded} (a multiple of the {jax.device_count()} devices)")
    s = dataclasses.replace(s, batch_size=rounded)

  stages: list[tuple[str, str, float]] = []
  skipped: list[str] = []  # reported together, on one line

  def flush_skipped():
    if skipped:
      say(f"finished earlier, skipped: {', '.join(skipped)}")
      skipped.clear()

  def stage(name: str, done: bool, body: Callable[[], Any], what: str = "") -> Any:
    t0 = time.perf_counter()
    if done:
      stages.append((name, "skipped", 0.0))
      skipped.append(name)
      if on_stage:
        on_stage(name, "skipped")
      return None
    flush_skipped()
    say(f"{name}: {what}..." if what else f"{name}...")
    out = body()
    seconds = time.perf_counter() - t0
    stages.append((name, "ran", seconds))
    say(f"{name}: done in {seconds:.0f} s")
    if on_stage:
      on_stage(name, "ran")
    return out

  say(f"work directory {workdir}; size {s.size}: teacher {s.teacher_preset} "
      f"({s.teacher_steps} steps), students {s.student_shape} ({s.steps} steps each) along "
      f"{', '.join(s.paths)}; finetune {s.finetune_steps} steps on {', '.join(s.tasks)}; "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s)")

  from miniend_jax.data import local_corpus  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel

  # 1. Corpus and vocabulary (local_corpus reuses a complete harvest and vocabulary; the
  # tasks are registered in this process either way).
  corpus_dir = os.path.join(workdir, "pydoc")
  data_ready = (os.path.exists(os.path.join(corpus_dir, "manifest.json")) and os.path.exists(
      os.path.join(corpus_dir, f"vocab_{local_corpus.DEFAULT_VOCAB_SIZE}", "spiece.model")))
  if data_ready:
    stage("data", True, lambda: None)
    local_corpus.setup_pydoc_tasks(workdir)
  else:
    stage("data", False, lambda: local_corpus.setup_pydoc_tasks(workdir),
          "harvesting the pydoc corpus and training its vocabulary")

  common = {"batch_size": s.batch_size, "inputs_length": s.inputs_length,
            "targets_length": s.targets_length, "seed": s.seed, "dropout_rate": DROPOUT_RATE}

  # 2. Teacher.
  teacher_dir = os.path.join(workdir, "teacher")
  teacher_fp = claim_settings(teacher_dir, {
      "stage": "pretrain", "preset": s.teacher_preset, "steps": s.teacher_steps,
      "learning_rate": s.learning_rate, "eval_batches": s.eval_batches, **common})
  stage("teacher", run_finished(teacher_dir, s.teacher_steps),
        lambda: _train("pretrain", teacher_dir, s, workdir, task=SPAN_TASK,
                       steps=s.teacher_steps, learning_rate=s.learning_rate,
                       model=loop.ModelSetup(preset=s.teacher_preset, dtype="float32",
                                             overrides={"dropout_rate": DROPOUT_RATE}),
                       progress=progress),
        f"pretraining {s.teacher_preset} for {s.teacher_steps} steps")

  # 3. Students, one per path, equal steps and data.
  model_dirs = {"teacher": (teacher_dir, teacher_fp)} if s.finetune_teacher else {}
  distill_dirs = {}
  for path in s.paths:
    directory = os.path.join(workdir, "distill", path)
    fp = claim_settings(directory, {
        "stage": "distill", "recipe": path, "student_shape": s.student_shape,
        "steps": s.steps, "learning_rate": s.learning_rate, "eval_batches": s.eval_batches,
        "teacher": teacher_fp, **common})
    stage(f"distill {path}", run_finished(directory, s.steps),
          lambda directory=directory, path=path: _train(
              "distill", directory, s, workdir, task=SPAN_TASK, steps=s.steps,
              learning_rate=s.learning_rate, recipe=path,
              model=loop.ModelSetup(teacher=teacher_dir, teacher_dtype="float32",
                                    student_shape=s.student_shape, student_init="random",
                                    overrides={"dropout_rate": DROPOUT_RATE}, dtype="float32"),
              progress=progress),
          f"{s.student_shape} student, recipe {path}, {s.steps} steps")
    distill_dirs[path] = directory
    model_dirs[path] = (directory, fp)

  # 4-5. Finetune and evaluate every model on every task.
  scores: dict[str, dict[str, dict[str, float]]] = {}
  for model_name, (source, source_fp) in model_dirs.items():
    for task in s.tasks:
      ft_dir = os.path.join(workdir, "finetune", model_name, task)
      ft_fp = claim_settings(ft_dir, {
          "stage": "finetune", "task": task, "steps": s.finetune_steps,
          "learning_rate": s.finetune_learning_rate, "init": source_fp,
          "eval_batches": s.eval_batches, **common})
      stage(f"finetune {model_name} on {task}", run_finished(ft_dir, s.finetune_steps),
            lambda ft_dir=ft_dir, source=source, task=task: _train(
                "finetune", ft_dir, s, workdir, task=task, steps=s.finetune_steps,
                learning_rate=s.finetune_learning_rate,
                model=loop.ModelSetup(init_from=source, dtype="float32",
                                      overrides={"dropout_rate": DROPOUT_RATE}),
                progress=progress),
            f"{s.finetune_steps} steps")
      eval_dir = os.path.join(ft_dir, "eval")
      eval_file = os.path.join(eval_dir, f"{task}.json")
      claim_settings(eval_dir, {"stage": "evaluate", "task": task, "model": ft_fp,
                              "num_examples": s.eval_examples,
                              "inputs_length": s.inputs_length,
                              "targets_length": s.targets_length})
      stage(f"evaluate {model_name} on {task}", os.path.exists(eval_file),
            lambda ft_dir=ft_dir, task=task: loop.evaluate(
                ft_dir, task=task, split="validation", inputs_length=s.inputs_length,
                targets_length=s.targets_length, batch_size=32,
                num_examples=s.eval_examples, max_decode_length=s.targets_length,
                num_beams=1, data_dir=workdir),
            "greedy decoding on the validation split")
      result = read_json(eval_file) or {}
      scores.setdefault(model_name, {})[task] = dict(result.get(task, {}))
      # The finetuned model's teacher-forced validation loss: far less noisy than the
      # decoded scores on a few hundred examples.
      ft_summary = read_json(os.path.join(ft_dir, "summary.json")) or {}
      scores[model_name][task]["val_loss"] = ft_summary.get("eval", {}).get(
          "eval/loss", float("nan"))

  # 6. Speed: teacher vs student forward throughput in this process.
  from miniend_jax.model import student as student_lib, t5  # pylint: disable=import-outside-toplevel
  teacher_config = loop.load_model(teacher_dir)[0]
  student_config = student_lib.student_config(teacher_config, s.student_shape)
  speed_path = os.path.join(workdir, "speed.json")
  speed_settings = {"teacher": teacher_fp, "student_shape": s.student_shape,
                    "batch_size": s.batch_size, "inputs_length": s.inputs_length,
                    "targets_length": s.targets_length}
  speed = read_json(speed_path) or {}
  if speed.get("settings") != speed_settings:
    def measure():
      rates = measure_forward_speed({"teacher": teacher_config, "student": student_config},
                                    s.batch_size, s.inputs_length, s.targets_length)
      record = {"settings": speed_settings, "examples_per_s": rates,
                "device": f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
                "method": "jitted teacher-forced forward pass on one device, fixed random "
                          f"batch {s.batch_size} x ({s.inputs_length} + {s.targets_length}) "
                          "tokens, best of 4 alternating rounds"}
      with open(speed_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
      return record
    speed = stage("speed", False, measure, "timing teacher and student forward passes")
  else:
    stage("speed", True, lambda: None)

  flush_skipped()

  # 7. Report.
  shape = (s.batch_size, s.inputs_length, s.targets_length)
  teacher_flops = t5.forward_flops(teacher_config, *shape)
  student_flops = t5.forward_flops(student_config, *shape)
  rates = speed["examples_per_s"]
  rows = []

  def row_for(model_name: str, kind: str, config, run_dir: str, flops: float, rate: float):
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    metrics = _read_metrics(os.path.join(run_dir, "logs", "train_metrics.jsonl"))
    row = {
        "model": model_name, "kind": kind,
        "shape": s.teacher_preset if kind == "teacher" else s.student_shape,
        "params": t5.count_params(config),
        "fwd_examples_per_s": rate,
        "speedup_measured": rate / rates["teacher"] if rates.get("teacher") else float("nan"),
        "speedup_flops": teacher_flops / flops,
        "heldout_sc_loss": summary.get("eval", {}).get("eval/loss", float("nan")),
        "heldout_sc_token_accuracy": summary.get("eval", {}).get("eval/token_accuracy",
                                                                 float("nan")),
        "train_objective_final": summary.get("train", {}).get("loss", float("nan")),
        "grad_norm_encoder_max": _max(metrics.get("grad_norm/encoder")),
        "grad_norm_decoder_max": _max(metrics.get("grad_norm/decoder")),
    }
    for task in s.tasks:
      for metric, value in sorted(scores.get(model_name, {}).get(task, {}).items()):
        row[f"{task}/{metric}"] = value
    return row

  rows.append(row_for("teacher", "teacher", teacher_config, teacher_dir, teacher_flops,
                      rates.get("teacher", float("nan"))))
  for path in s.paths:
    rows.append(row_for(path, "student", student_config, distill_dirs[path], student_flops,
                        rates.get("student", float("nan"))))

  notes = [
      f"speed-up (measured): {speed['method']}, on {speed['device']}; "
      f"teacher {rates.get('teacher', float('nan')):.0f}, student "
      f"{rates.get('student', float('nan')):.0f} examples/s.",
      "speed-up (FLOPs): ratio of forward matmul FLOPs (miniend_jax.model.t5.forward_flops).",
      f"held-out SC loss: span-corruption cross-entropy on {s.eval_batches} validation batches "
      "after distillation (pretraining for the teacher); paths without a logits or "
      "span-corruption term never train the output head, so theirs is high by construction.",
      f"downstream: each model finetuned {s.finetune_steps} steps per task, greedy decoding on "
      f"{s.eval_examples or 'all'} validation examples; pydoc_summary ROUGE-Lsum, pydoc_topic "
      "accuracy (%); val loss: the finetuned model's teacher-forced validation loss.",
      f"every student: {s.student_shape}, {s.steps} distillation steps, same data and seed.",
  ]
  table = format_table(rows, s.tasks)
  files = _write_report(workdir, rows, table, notes, s, distill_dirs)
  seconds = time.perf_counter() - started
  if verbose:
    print()
    print(table)
    print()
    for note in notes:
      print(f"- {note}")
    print()
    for name, path in files.items():
      print(f"{name:>12}: {path}")
    ran = sum(1 for _, status, _ in stages if status == "ran")
    print(f"\n[quickstart] finished in {seconds / 60:.1f} min ({ran} stages ran, "
          f"{len(stages) - ran} skipped).", flush=True)
  return {"rows": rows, "table": table, "notes": notes, "files": files, "stages": stages,
          "seconds": seconds, "settings": dataclasses.asdict(s)}


def _read_metrics(path: str):
  from miniend_jax import plots  # pylint: disable=import-outside-toplevel
  return plots.read_metrics(path)


def _max(points) -> float:
  values = [v for _, v in points or [] if math.isfinite(v)]
  return max(values) if values else float("nan")


def _fmt(value, digits: int = 2) -> str:
  if isinstance(value, bool) or value is None:
    return "-"
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str] = TASKS) -> str:
  """The Markdown comparison table."""
  header = ["model", "params", "speed-up (measured)", "speed-up (FLOPs)", "held-out SC loss"]
  for task in tasks:
    header += [f"{task} {PRIMARY_METRIC.get(task, '')}".strip(), f"{task} val loss"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  for row in rows:
    label = (f"teacher ({row['shape']})" if row["kind"] == "teacher"
             else f"{row['model']} ({row['shape']})")
    cells = [label, _fmt(row["params"]), _fmt(row["speedup_measured"]) + "x",
             _fmt(row["speedup_flops"]) + "x", _fmt(row["heldout_sc_loss"], 3)]
    for task in tasks:
      cells.append(_fmt(row.get(f"{task}/{PRIMARY_METRIC.get(task, '')}", float("nan"))))
      cells.append(_fmt(row.get(f"{task}/val_loss", float("nan")), 3))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write_report(workdir: str, rows, table: str, notes: Sequence[str], s: Settings,
                  distill_dirs: Mapping[str, str]) -> dict[str, str]:
  from miniend_jax import plots  # pylint: disable=import-outside-toplevel
  files = {}
  files["markdown"] = os.path.join(workdir, "results.md")
  with open(files["markdown"], "w", encoding="utf-8") as f:
    f.write("# miniend quickstart results\n\n" + table + "\n\n")
    f.write("".join(f"- {note}\n" for note in notes))
  files["csv"] = os.path.join(workdir, "results.csv")
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(files["csv"], "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k, "") for k in columns})
  files["json"] = os.path.join(workdir, "results.json")
  with open(files["json"], "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "notes": list(notes), "settings": dataclasses.asdict(s)}, f,
              indent=1)
  runs = {path: plots.read_metrics(os.path.join(d, "logs", "train_metrics.jsonl"))
          for path, d in distill_dirs.items()}
  teacher_row = rows[0]
  files["loss_curves"] = plots.plot_loss_curves(
      runs, os.path.join(workdir, "loss_curves.png"), eval_key="loss/span_corruption",
      eval_title="student span-corruption loss (training batches)",
      references={"teacher (held-out, end)": teacher_row["heldout_sc_loss"]},
      title=f"{s.student_shape} students, {s.steps} steps: objective and span-corruption loss")
  files["grad_norms"] = plots.plot_grad_norms(
      runs, os.path.join(workdir, "grad_norms.png"),
      title=f"{s.student_shape} students: encoder vs decoder gradient norms per path")
  columns = ["heldout_sc_loss"]
  titles = {"heldout_sc_loss": "held-out span-corruption loss (lower is better)"}
  for task in s.tasks:
    columns += [f"{task}/{PRIMARY_METRIC[task]}", f"{task}/val_loss"]
    titles[f"{task}/{PRIMARY_METRIC[task]}"] = f"{task} {PRIMARY_METRIC[task]} (higher is better)"
    titles[f"{task}/val_loss"] = f"{task} validation loss (lower is better)"
  files["scores"] = plots.plot_scores(
      rows, columns, os.path.join(workdir, "scores.png"), label_key="model", titles=titles,
      title="Teacher and students after finetuning")
  return files


# ----------------------------------------------------------------------------
# Command line.


def _csv_list(text: str) -> list[str]:
  return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """Adds the quickstart's flags (including --workdir) to `parser`."""
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                      help=f"work directory (default: ./{DEFAULT_WORKDIR}); re-running resumes")
  parser.add_argument("--size", choices=sorted(SIZES), default="tiny",
                      help="tiny: CPU minutes (default); small: for a GPU / TPU")
  parser.add_argument("--paths", type=_csv_list,
                      help=f"comma-separated recipes (default: {','.join(DEFAULT_PATHS)})")
  parser.add_argument("--tasks", type=_csv_list,
                      help=f"comma-separated downstream tasks (default: {','.join(TASKS)})")
  parser.add_argument("--steps", type=int, help="distillation steps of every student")
  parser.add_argument("--teacher_steps", type=int, help="teacher pretraining steps")
  parser.add_argument("--finetune_steps", type=int, help="finetuning steps per model and task")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--inputs_length", type=int)
  parser.add_argument("--targets_length", type=int)
  parser.add_argument("--eval_examples", type=int, help="validation examples scored per task")
  parser.add_argument("--seed", type=int)
  parser.add_argument("--no_finetune_teacher", action="store_true",
                      help="do not finetune / score the teacher")
  parser.add_argument("--no_compilation_cache", action="store_true",
                      help="no persistent XLA compilation cache in WORKDIR/jax_cache")
  parser.add_argument("--progress", action="store_true", help="progress bars per run")
  return parser


def run_from_args(args: argparse.Namespace, bindings: Sequence[str] = ()) -> int:
  """Entry point of `miniend quickstart` (args from `add_arguments`)."""
  if bindings:
    print("miniend quickstart: takes no --gin.* bindings; use its flags (see --help).",
          file=sys.stderr)
    return 2
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    run(args.workdir, size=args.size, paths=args.paths, tasks=args.tasks, steps=args.steps,
        teacher_steps=args.teacher_steps, finetune_steps=args.finetune_steps,
        batch_size=args.batch_size, inputs_length=args.inputs_length,
        targets_length=args.targets_length, eval_examples=args.eval_examples,
        finetune_teacher=False if args.no_finetune_teacher else None, seed=args.seed,
        compilation_cache=not args.no_compilation_cache, progress=args.progress)
  except (ValueError, StageMismatchError) as e:
    print(f"miniend quickstart: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"miniend quickstart: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = add_arguments(argparse.ArgumentParser(
      prog="miniend quickstart",
      description="Pretrain a small teacher, distil students along several paths, finetune "
                  "and score them, and print a comparison table (offline, CPU-sized)."))
  return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
