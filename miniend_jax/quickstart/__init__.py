"""`miniend quickstart`: the paper's comparison end to end, offline, on a CPU in minutes.

A small teacher is pretrained on the embedded pydoc corpus; then, for each
seed, one student per path of the paper's table (scratch, kd_logits, minilm,
kd_logits_minilm = "implicit", miniend_d, miniend_d_nologit, miniend_e,
miniend_e_nologit) is distilled from the same initialisation, on the same
batches, at the same learning rate; every model is finetuned and scored on two
downstream tasks; the table shows each metric's mean ± standard deviation over
the seeds and marks a path only where it beats (or trails) scratch by more than
the seeds' spread (`stats`).

Modules, in the order a run goes through them:

  settings      Settings, the named sizes ("cpu" default, "gpu") and their checks
  stages        data, teacher, distill (per path and seed), finetune + evaluate, speed
  runs          the calls into the run API (`train.loop`) the stages share
  bookkeeping   settings claims and finished-run checks: what makes a re-run resume
  stats         mean / std over seeds and the "better than scratch" rule
  results       per-seed rows, seed aggregates, the table, the files and plots
  pipeline      `run`: the stages in order, then the report
  command       the command line

Every stage directory records the settings it was made with; a re-run skips
finished stages and resumes an interrupted one from its checkpoint; other
settings on the same directory stop with an error naming what changed. Adding
seeds to a finished run trains only the new seeds.

Python API:

  from miniend_jax import quickstart
  result = quickstart.run("/tmp/qs", paths=("scratch", "miniend_d"), seeds=3)
  print(result["table"])
"""

from miniend_jax.quickstart.bookkeeping import (Preempted, StageMismatchError, claim_settings,
                                                read_json, run_finished)
from miniend_jax.quickstart.command import add_arguments, main, run_from_args
from miniend_jax.quickstart.pipeline import run
from miniend_jax.quickstart.results import format_table
from miniend_jax.quickstart.runs import enable_compilation_cache, measure_forward_speed
from miniend_jax.quickstart.settings import (BASELINE, DEFAULT_PATHS, DEFAULT_WORKDIR,
                                             PRIMARY_METRIC, SIZES, TASKS, Settings,
                                             make_settings)

__all__ = ["BASELINE", "DEFAULT_PATHS", "DEFAULT_WORKDIR", "PRIMARY_METRIC", "Preempted", "SIZES",
           "Settings", "StageMismatchError", "TASKS", "add_arguments", "claim_settings",
           "enable_compilation_cache", "format_table", "main", "make_settings",
           "measure_forward_speed", "read_json", "run", "run_finished", "run_from_args"]
