"""The quickstart's calls into the run API (`train.loop`), and what they share.

`Context` carries what every stage needs (work directory, settings, the stage
log, the compilation cache). `train` and `evaluate` turn the settings into
`loop.train` / `loop.evaluate` calls: one logical data shard (one host), the
shared persistent compilation cache, few checkpoint saves, no dropout unless
the size asks for it. `measure_forward_speed` times teacher against student.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

from miniend_jax.quickstart.bookkeeping import Preempted, StageLog
from miniend_jax.quickstart.settings import Settings


@dataclasses.dataclass
class Context:
  """What every stage needs.

  Attributes:
    workdir: the quickstart's work directory (absolute).
    settings: the run's settings.
    stages: the stage log (runs or skips each stage).
    cache_dir: JAX's persistent compilation cache shared by every run ("": off).
    progress: per-step progress bars.
    say: prints a progress line (or nothing).
  """

  workdir: str
  settings: Settings
  stages: StageLog
  cache_dir: str = ""
  progress: bool = False
  say: Callable[[str], None] = lambda _: None


def enable_compilation_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in `directory` unless one is set.

  The students of every path and seed compile identical finetuning and
  evaluation programs, every seed the same distillation programs, and a re-run
  compiles everything again; the cache makes those compilations disk reads.
  Returns whether this call enabled it.
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


@contextlib.contextmanager
def quiet_logs():
  """Inside the block: absl / TensorFlow / orbax / jax chatter at ERROR only, and the run
  loop's own progress lines (INFO, one set per run; the stage lines replace them) off."""
  quiet = {"absl": logging.ERROR, "tensorflow": logging.ERROR, "orbax": logging.ERROR,
           "jax": logging.ERROR, "": logging.WARNING}
  loggers = {logging.getLogger(name or None): level for name, level in quiet.items()}
  levels = {lg: lg.level for lg in loggers}
  for lg, level in loggers.items():
    lg.setLevel(max(level, lg.level))
  try:
    yield
  finally:
    for lg, level in levels.items():
      lg.setLevel(level)


def model_setup(s: Settings, **fields):
  """A `loop.ModelSetup` in float32 with the settings' dropout."""
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  return loop.ModelSetup(dtype="float32", overrides={"dropout_rate": s.dropout_rate}, **fields)


def train(ctx: Context, mode: str, directory: str, *, task: str, steps: int,
          learning_rate: float, model, seed: int, recipe: str = "scratch") -> dict:
  """One `loop.train` run (or its resumption); raises Preempted when it stopped early."""
  from miniend_jax.train import checkpoints, loop, partitioning  # pylint: disable=import-outside-toplevel
  from miniend_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  s = ctx.settings
  train_config = loop.TrainConfig(
      task=task, inputs_length=s.inputs_length, targets_length=s.targets_length,
      batch_size=s.batch_size, num_steps=steps, seed=seed, pack=True,
      # Pretraining and distillation curves are plotted (50 points); a finetuning run's
      # log is not read, and each logged step waits for the device and writes TensorBoard.
      log_every=max(1, steps // (8 if mode == "finetune" else 50)), eval_every=0,
      eval_batches=s.eval_batches, eval_split="validation", data_dir=ctx.workdir,
      # One host: one logical shard, so one input pipeline to build per run.
      data_shards=1, compilation_cache_dir=ctx.cache_dir)
  optimizer = state_lib.OptimizerConfig(
      name="adamw", learning_rate=learning_rate, warmup_steps=max(1, steps // 20),
      decay="cosine", total_steps=steps, end_learning_rate=0.1, weight_decay=0.0,
      grad_clip_norm=1.0, grad_accum_steps=1)
  # Few saves: each costs about a second here, and most runs are under a minute long (the
  # final step is always saved).
  checkpoint = checkpoints.CheckpointConfig(save_interval_steps=max(250, steps // 2),
                                            max_to_keep=1, best_metric=None, async_save=True)
  summary = loop.train(mode, directory, train_config=train_config, model=model,
                       optimizer=optimizer, checkpoint=checkpoint,
                       mesh=partitioning.MeshConfig(data=-1, fsdp=1, model=1),
                       recipe=recipe, progress=ctx.progress)
  if summary.get("preempted"):  # never build the next stage on a half-trained model
    raise Preempted(f"Stopped by SIGTERM at step {summary['step']} of {steps} in {directory} "
                    "(checkpoint saved); run the same command again to resume.")
  return summary


def evaluate(ctx: Context, directory: str, task: str) -> dict:
  """Greedy-decodes the validation split of `task` with the run in `directory`."""
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  s = ctx.settings
  return loop.evaluate(directory, task=task, split="validation", inputs_length=s.inputs_length,
                       targets_length=s.targets_length, batch_size=32,
                       num_examples=s.eval_examples, max_decode_length=s.targets_length,
                       num_beams=1, data_dir=ctx.workdir)


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
  from miniend_jax.model.params import init_params  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  fns = {}
  for name, config in configs.items():
    config = config.replace(dtype="float32", param_dtype="float32", dropout_rate=0.0)
    params = jax.device_put(init_params(config, jax.random.key(0)), device)
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
