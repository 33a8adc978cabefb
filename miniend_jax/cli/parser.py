"""The `miniend` argument parser: one function per subcommand and its flags.

`build_parser(command)` adds every subcommand; each `_add_<command>` declares
that subcommand's flags and sets the function that runs it (`cli/commands.py`).
The --gin.NAME=VALUE flags are taken out before parsing (`gin_flags`). Only
`plan` needs a heavy import (JAX) to declare its flags, and only when it is the
command about to run.
"""

from __future__ import annotations

import argparse

from miniend_jax.cli import commands

# The named recipes, listed in --help without importing JAX (a test checks this
# list against distill.recipe.RECIPES).
RECIPE_NAMES = ("scratch", "kd_logits", "minilm", "kd_logits_minilm", "implicit", "miniend_d",
                "miniend_d_nologit", "miniend_e", "miniend_e_nologit", "minilm_encdec",
                "miniend_e_interpolated", "hidden_mse")

TRAIN_MODES = {
    "distill": "Distil a student from a teacher along a recipe (the paper's paths).",
    "pretrain": "Train a model from scratch on span corruption (e.g. a teacher).",
    "finetune": "Finetune a model (e.g. a distilled student) on a task.",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; `command` is the subcommand about to run (its flags are the only
  ones that may need a heavy import: `plan` loads JAX to define its own)."""
  parser = argparse.ArgumentParser(
      prog="miniend", description="Task-agnostic distillation of T5 models (MiniEnD) in JAX.",
      epilog="Any --gin.NAME=VALUE flag is a gin binding, e.g. --gin.TrainConfig.num_steps=500 "
             "(a bare word is a string: --gin.ModelSetup.student_shape=2L-64H). Exit status: "
             "0 done, 2 usage, 3 data or checkpoint problem, 4 hung (no step finished in the "
             "watchdog's time), 130 stopped by Ctrl-C (saved).")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for mode, text in TRAIN_MODES.items():
    _add_train(sub, mode, text)
  _add_evaluate(sub)
  _add_export(sub)
  _add_convert(sub)
  _add_plan(sub, with_flags=command == "plan")
  _add_quickstart(sub)
  _add_sweep(sub)
  _add_models(sub)
  return parser


# ----------------------------------------------------------------------------
# Flags several subcommands share.


def _add_common_flags(p: argparse.ArgumentParser, *, workdir: bool = True,
                      gin: bool = True) -> None:
  if workdir:
    p.add_argument("--workdir", required=True,
                   help="run directory (checkpoints, logs, results); local or gs://")
  if gin:
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file (repeatable), e.g. gin_configs/runs/quickstart_distill.gin; "
                        "found from any directory")
  _add_log_flags(p)


def _add_log_flags(p: argparse.ArgumentParser, hidden: bool = False) -> None:
  p.add_argument("--debug", action="store_true",
                 help=argparse.SUPPRESS if hidden else "show tracebacks of expected errors")
  p.add_argument("--verbose", action="store_true",
                 help=argparse.SUPPRESS if hidden else
                 "show every library's log (TensorFlow, XLA, orbax, absl)")


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_argument_group(
      "multi-process jobs", "Not needed on Cloud TPU VMs, Slurm or Open MPI, which are "
      "detected; elsewhere give all three on every process (or set JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES, JAX_PROCESS_ID).")
  group.add_argument("--coordinator_address", help="host:port of process 0")
  group.add_argument("--num_processes", type=int, help="processes in the job")
  group.add_argument("--process_id", type=int, help="this process's index")


# ----------------------------------------------------------------------------
# distill / pretrain / finetune.


def _add_train(sub, mode: str, text: str) -> None:
  p = sub.add_parser(mode, help=text, description=text + " Re-running the same command "
                     "resumes; a directory made with other settings is refused.")
  _add_common_flags(p)
  _add_model_flags(p, mode)
  _add_data_flags(p, mode)
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--allow_changes", action="store_true",
                 help="continue a run in --workdir even though settings other than its "
                      "length and cadence changed (they are listed when refused)")
  _add_distributed_flags(p)
  p.set_defaults(func=commands.run_train)


def _add_model_flags(p: argparse.ArgumentParser, mode: str) -> None:
  """The models a training mode starts from: teacher and student, a preset, or weights."""
  if mode == "distill":
    p.add_argument("--teacher", help="Hugging Face directory (local, gs://) or hub id, or a "
                                     "miniend checkpoint directory (= ModelSetup.teacher)")
    p.add_argument("--student_shape", help="e.g. 6L-384H; see `miniend models`")
    p.add_argument("--recipe", metavar="RECIPE",
                   help="one of: " + ", ".join(RECIPE_NAMES) + " (= train.recipe); "
                        "default miniend_d; others by gin file (README: Adding a recipe)")
  elif mode == "pretrain":
    p.add_argument("--preset", help="model preset, e.g. t5-v1_1-small; see `miniend models`")
  else:
    p.add_argument("--init_from", help="initial weights: a distilled student's workdir or "
                                       "checkpoints, or a Hugging Face directory")


def _add_data_flags(p: argparse.ArgumentParser, mode: str) -> None:
  """The task or corpus files, their vocabulary and the run's length."""
  p.add_argument("--task", help="seqio task or mixture (= TrainConfig.task)")
  p.add_argument("--vocabulary", help="tokenise the task with another vocabulary: 'teacher' "
                                      "(its own: mT5, umT5, ByT5 teachers), 'byt5', a Hugging "
                                      "Face directory or a spiece.model "
                                      "(= TrainConfig.vocabulary)")
  p.add_argument("--num_steps", type=int,
                 help="training steps; the learning-rate schedule follows unless "
                      "OptimizerConfig.total_steps is set")
  p.add_argument("--data_dir", help="where the embedded corpus is built and cached "
                                    "(default $MINIEND_DATA_DIR or ~/.cache/miniend_jax)")
  if mode != "finetune":
    p.add_argument("--train_files", metavar="PATTERN",
                   help="span corruption over these corpus files instead of --task: "
                        "*.json/*.jsonl/*.txt (each optionally .gz), *.parquet, *.tfrecord; "
                        "local, gs:// or hf://, e.g. gs://b/c4/en/c4-train.*.json.gz")
    p.add_argument("--validation_files", metavar="PATTERN",
                   help="the evaluation's files (default: the train files)")
    p.add_argument("--text_field", help="the text field of the records (default text)")
  p.add_argument("--hf_data_dir", metavar="DIR",
                 help="the Hub's parquet copies of nyu-mll/glue, abisee/cnn_dailymail, "
                      "EdinburghNLP/xsum (local, gs:// or hf://datasets) instead of TFDS")


# ----------------------------------------------------------------------------
# The other subcommands.


def _add_evaluate(sub) -> None:
  text = "Score a checkpoint with its task's own metrics (ROUGE, accuracy, ...)."
  p = sub.add_parser("evaluate", help=text, description=text + " Writes WORKDIR/eval/TASK.json.")
  _add_common_flags(p)
  p.add_argument("--task", help="seqio task (default: the one the checkpoint trained on)")
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  _add_distributed_flags(p)
  p.set_defaults(func=commands.run_evaluate)


def _add_export(sub) -> None:
  text = "Write a checkpoint as a Hugging Face T5 directory (loads with transformers)."
  p = sub.add_parser("export", help=text, description=text)
  _add_common_flags(p)
  p.add_argument("--out_dir", required=True, help="a new or empty directory")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out_dir")
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  p.add_argument("--step", type=int, help="default: the latest")
  p.add_argument("--dtype", help="cast weights, e.g. bfloat16")
  p.set_defaults(func=commands.run_export)


def _add_convert(sub) -> None:
  text = "Write a Hugging Face teacher as a miniend (orbax) checkpoint."
  p = sub.add_parser(
      "convert", help=text,
      description="Convert a Hugging Face T5 checkpoint (local, gs:// or hub id) once into an "
                  "orbax checkpoint (e.g. on a bucket), which every host of a pod restores in "
                  "parallel, each reading only its own slices. Pass it as --teacher.")
  _add_common_flags(p, workdir=False)
  p.add_argument("--teacher", required=True, help="Hugging Face directory or hub id")
  p.add_argument("--out_dir", required=True, help="the new checkpoint directory (local or gs://)")
  p.add_argument("--dtype", help="store the weights in this dtype, e.g. bfloat16")
  _add_distributed_flags(p)
  p.set_defaults(func=commands.run_convert)


def _add_plan(sub, with_flags: bool) -> None:
  """`plan`; its flags only when it is the command to run (declaring them loads JAX)."""
  p = sub.add_parser(
      "plan", help="Compile a run's step for a TPU slice from this host: does it fit, how fast.",
      description="Builds the exact step a run would jit (its gin file and bindings), compiles "
                  "it with the TPU compiler (libtpu, no TPU needed: pip install -e '.[plan]') "
                  "for a slice topology, and reports per-chip memory against HBM, FLOPs, "
                  "compile time and the step time at 50% and 100% of peak. Exit 0 with an "
                  "answer (fits or not), 2 for a bad config.")
  if with_flags:
    from miniend_jax.cli import plan  # pylint: disable=import-outside-toplevel
    plan.add_arguments(p)
    _add_log_flags(p)
  p.set_defaults(func=commands.run_plan)


def _add_quickstart(sub) -> None:
  p = sub.add_parser(
      "quickstart", help="Offline end-to-end demo: teacher, students along every path, table.",
      description="Pretrain a small teacher on the embedded corpus, distil students along "
                  "every path of the paper's table at equal steps over several seeds, finetune "
                  "and score them, and print the table (mean and spread per path).")
  from miniend_jax.quickstart import command as quickstart_command  # pylint: disable=import-outside-toplevel
  quickstart_command.add_arguments(p)
  _add_log_flags(p)
  p.set_defaults(func=commands.run_quickstart)


def _add_sweep(sub) -> None:
  p = sub.add_parser(
      "sweep", help="A grid of gin bindings, one resumable run each, collected in a table.",
      description="Runs every point of a grid of gin bindings (--sweep NAME=V1,V2, repeatable) "
                  "in its own directory, skips finished points, refuses directories made with "
                  "other settings, and collects the results (mean and spread over --seeds).")
  from miniend_jax.cli import sweep  # pylint: disable=import-outside-toplevel
  sweep.add_arguments(p)
  _add_log_flags(p)
  p.set_defaults(func=commands.run_sweep)


def _add_models(sub) -> None:
  text = "List model presets and student shapes with their sizes."
  p = sub.add_parser("models", help=text, description=text)
  p.add_argument("--teacher", default="t5-v1_1-base",
                 help="teacher preset whose family the student shapes take")
  _add_log_flags(p, hidden=True)
  p.set_defaults(func=commands.run_models)
