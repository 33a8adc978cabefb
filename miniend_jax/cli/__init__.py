"""The `miniend` command line (also `python -m miniend_jax`).

  miniend distill  --workdir DIR --teacher T --student_shape 6L-384H --recipe miniend_d
  miniend pretrain --workdir DIR --preset t5-v1_1-small
  miniend finetune --workdir DIR --init_from STUDENT --task glue_sst2
  miniend evaluate --workdir DIR [--task T] [--gin.evaluate.num_beams=4]
  miniend export   --workdir DIR --out_dir HF_DIR [--overwrite]
  miniend convert  --teacher HF_DIR --out_dir DIR   (Hugging Face -> orbax, for pods)
  miniend plan     --gin_file RUN.gin --topology v4-64 [--slices N]   (fits a TPU slice?)
  miniend quickstart [--workdir DIR]   (the offline end-to-end demo)
  miniend sweep    --gin_file F --sweep NAME=v1,v2 [...] --workdir DIR
  miniend models   (presets and student shapes with sizes)

Every setting is a gin binding (--gin_file F, --gin.NAME=VALUE); the other flags
are shorthands for the bindings they name. Expected failures end in one line,
`miniend: <what is wrong>. <what to do>.`, with exit status 2 (usage: flags,
settings, a directory made by another run) or 3 (data, checkpoints, files,
a diverged run); --debug shows the traceback instead. Ctrl-C saves and exits
130; a training run that stops finishing steps exits 4 (train/watchdog.py).
Nothing heavy is imported before a command runs, so --help and `models` answer
at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
import tempfile

from miniend_jax.cli.gin_flags import GinError, parse_gin, split_gin_flags

EXIT_USAGE, EXIT_DATA = 2, 3

# The named recipes, listed in --help without importing JAX (a test checks this
# list against distill.recipe.RECIPES).
RECIPE_NAMES = ("scratch", "kd_logits", "minilm", "kd_logits_minilm", "implicit", "miniend_d",
                "miniend_d_nologit", "miniend_e", "miniend_e_nologit", "minilm_encdec",
                "miniend_e_interpolated", "hidden_mse")

_SHORTHANDS = {
    "recipe": "train.recipe",
    "teacher": "ModelSetup.teacher",
    "student_shape": "ModelSetup.student_shape",
    "preset": "ModelSetup.preset",
    "init_from": "ModelSetup.init_from",
    "task": "TrainConfig.task",
    "vocabulary": "TrainConfig.vocabulary",
    "num_steps": "TrainConfig.num_steps",
    "data_dir": "TrainConfig.data_dir",
    "train_files": "TrainConfig.train_files",
    "validation_files": "TrainConfig.validation_files",
    "text_field": "TrainConfig.text_field",
    "hf_data_dir": "TrainConfig.hf_data_dir",
}


# ----------------------------------------------------------------------------
# Commands.


def _models(args, bindings) -> int:
  del bindings
  from miniend_jax.model import presets  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.config import count_params  # pylint: disable=import-outside-toplevel
  from miniend_jax.model.student import student_config  # pylint: disable=import-outside-toplevel

  def row(name, cfg):
    layers = (str(cfg.num_layers) if cfg.num_decoder_layers == cfg.num_layers
              else f"{cfg.num_layers}+{cfg.num_decoder_layers}")
    print(f"{name:<16} {layers:>6} {cfg.d_model:>7} {cfg.num_heads:>5} {cfg.d_ff:>6} "
          f"{cfg.vocab_size:>7} {cfg.feed_forward_proj:<11} {count_params(cfg):>15,}")

  print(f"{'preset':<16} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>6} {'vocab':>7} "
        f"{'ffn':<11} {'params':>15}")
  for name, cfg in presets.MODEL_PRESETS.items():
    row(name, cfg)
  teacher = presets.get_model_config(args.teacher)
  print(f"\nstudent shapes (family and vocabulary of {args.teacher}):")
  for name in presets.STUDENT_SHAPES:
    row(name, student_config(teacher, name))
  return 0


def _shorthand_bindings(args) -> list[str]:
  return [f"{binding} = {getattr(args, flag)!r}" for flag, binding in _SHORTHANDS.items()
          if getattr(args, flag, None) is not None]


def _train(args, bindings) -> int:
  parse_gin(args.gin_file, bindings + _shorthand_bindings(args))
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  summary = loop.train(args.command, args.workdir, progress=not args.no_progress,
                       allow_changes=args.allow_changes)
  print(json.dumps(summary, indent=2))
  if summary["preempted"]:
    print(f"miniend: stopped at step {summary['step']} ({summary['stopped_by']}); the "
          "checkpoint is saved. Run the same command again to resume.", file=sys.stderr)
  return summary["exit_code"]


def _evaluate(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  kwargs = {k: v for k, v in (("task", args.task), ("checkpoint_dir", args.checkpoint_dir))
            if v is not None}
  print(json.dumps(loop.evaluate(args.workdir, **kwargs), indent=2))
  return 0


def _export(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  out = loop.export(args.workdir, args.out_dir, checkpoint_dir=args.checkpoint_dir,
                    step=args.step, dtype=args.dtype, overwrite=args.overwrite)
  print(f"Wrote a Hugging Face checkpoint to {out}")
  return 0


def _convert(args, bindings) -> int:
  parse_gin(args.gin_file, bindings)
  from miniend_jax.train import loop  # pylint: disable=import-outside-toplevel
  out = loop.convert(args.teacher, args.out_dir, dtype=args.dtype)
  print(f"Wrote a miniend checkpoint to {out}; pass it as --teacher.")
  return 0


def _plan(args, bindings) -> int:
  from miniend_jax.cli import plan  # pylint: disable=import-outside-toplevel
  return plan.run_from_args(args, bindings)


def _quickstart(args, bindings) -> int:
  from miniend_jax import quickstart  # pylint: disable=import-outside-toplevel
  return quickstart.run_from_args(args, bindings)


def _sweep(args, bindings) -> int:
  from miniend_jax.cli import sweep  # pylint: disable=import-outside-toplevel
  return sweep.run_from_args(args, bindings)


def _set_distributed_env(args) -> None:
  """--coordinator_address / --num_processes / --process_id as JAX's own variables."""
  for flag, variable in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                         ("num_processes", "JAX_NUM_PROCESSES"),
                         ("process_id", "JAX_PROCESS_ID")):
    value = getattr(args, flag, None)
    if value is not None:
      os.environ[variable] = str(value)


# ----------------------------------------------------------------------------
# The parser.


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

  def flags(p, *, workdir=True, gin=True):
    if workdir:
      p.add_argument("--workdir", required=True,
                     help="run directory (checkpoints, logs, results); local or gs://")
    if gin:
      p.add_argument("--gin_file", action="append", default=[],
                     help="gin file (repeatable), e.g. gin_configs/runs/quickstart_distill.gin; "
                          "found from any directory")
    log_flags(p)

  def log_flags(p, hidden=False):
    p.add_argument("--debug", action="store_true",
                   help=argparse.SUPPRESS if hidden else "show tracebacks of expected errors")
    p.add_argument("--verbose", action="store_true",
                   help=argparse.SUPPRESS if hidden else
                   "show every library's log (TensorFlow, XLA, orbax, absl)")

  def distributed(p):
    group = p.add_argument_group(
        "multi-process jobs", "Not needed on Cloud TPU VMs, Slurm or Open MPI, which are "
        "detected; elsewhere give all three on every process (or set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID).")
    group.add_argument("--coordinator_address", help="host:port of process 0")
    group.add_argument("--num_processes", type=int, help="processes in the job")
    group.add_argument("--process_id", type=int, help="this process's index")

  train_modes = {
      "distill": "Distil a student from a teacher along a recipe (the paper's paths).",
      "pretrain": "Train a model from scratch on span corruption (e.g. a teacher).",
      "finetune": "Finetune a model (e.g. a distilled student) on a task.",
  }
  for mode, text in train_modes.items():
    p = sub.add_parser(mode, help=text, description=text + " Re-running the same command "
                       "resumes; a directory made with other settings is refused.")
    flags(p)
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
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--allow_changes", action="store_true",
                   help="continue a run in --workdir even though settings other than its "
                        "length and cadence changed (they are listed when refused)")
    distributed(p)
    p.set_defaults(func=_train)

  text = "Score a checkpoint with its task's own metrics (ROUGE, accuracy, ...)."
  p = sub.add_parser("evaluate", help=text, description=text + " Writes WORKDIR/eval/TASK.json.")
  flags(p)
  p.add_argument("--task", help="seqio task (default: the one the checkpoint trained on)")
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  distributed(p)
  p.set_defaults(func=_evaluate)

  text = "Write a checkpoint as a Hugging Face T5 directory (loads with transformers)."
  p = sub.add_parser("export", help=text, description=text)
  flags(p)
  p.add_argument("--out_dir", required=True, help="a new or empty directory")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out_dir")
  p.add_argument("--checkpoint_dir", help="default: WORKDIR/checkpoints")
  p.add_argument("--step", type=int, help="default: the latest")
  p.add_argument("--dtype", help="cast weights, e.g. bfloat16")
  p.set_defaults(func=_export)

  text = "Write a Hugging Face teacher as a miniend (orbax) checkpoint."
  p = sub.add_parser(
      "convert", help=text,
      description="Convert a Hugging Face T5 checkpoint (local, gs:// or hub id) once into an "
                  "orbax checkpoint (e.g. on a bucket), which every host of a pod restores in "
                  "parallel, each reading only its own slices. Pass it as --teacher.")
  flags(p, workdir=False)
  p.add_argument("--teacher", required=True, help="Hugging Face directory or hub id")
  p.add_argument("--out_dir", required=True, help="the new checkpoint directory (local or gs://)")
  p.add_argument("--dtype", help="store the weights in this dtype, e.g. bfloat16")
  distributed(p)
  p.set_defaults(func=_convert)

  p = sub.add_parser(
      "plan", help="Compile a run's step for a TPU slice from this host: does it fit, how fast.",
      description="Builds the exact step a run would jit (its gin file and bindings), compiles "
                  "it with the TPU compiler (libtpu, no TPU needed: pip install -e '.[plan]') "
                  "for a slice topology, and reports per-chip memory against HBM, FLOPs, "
                  "compile time and the step time at 50% and 100% of peak. Exit 0 with an "
                  "answer (fits or not), 2 for a bad config.")
  if command == "plan":
    from miniend_jax.cli import plan  # pylint: disable=import-outside-toplevel
    plan.add_arguments(p)
    log_flags(p)
  p.set_defaults(func=_plan)

  p = sub.add_parser(
      "quickstart", help="Offline end-to-end demo: teacher, students along every path, table.",
      description="Pretrain a small teacher on the embedded corpus, distil students along "
                  "every path of the paper's table at equal steps over several seeds, finetune "
                  "and score them, and print the table (mean and spread per path).")
  from miniend_jax.quickstart import command as quickstart_command  # pylint: disable=import-outside-toplevel
  quickstart_command.add_arguments(p)
  log_flags(p)
  p.set_defaults(func=_quickstart)

  p = sub.add_parser(
      "sweep", help="A grid of gin bindings, one resumable run each, collected in a table.",
      description="Runs every point of a grid of gin bindings (--sweep NAME=V1,V2, repeatable) "
                  "in its own directory, skips finished points, refuses directories made with "
                  "other settings, and collects the results (mean and spread over --seeds).")
  from miniend_jax.cli import sweep  # pylint: disable=import-outside-toplevel
  sweep.add_arguments(p)
  log_flags(p)
  p.set_defaults(func=_sweep)

  text = "List model presets and student shapes with their sizes."
  p = sub.add_parser("models", help=text, description=text)
  p.add_argument("--teacher", default="t5-v1_1-base",
                 help="teacher preset whose family the student shapes take")
  log_flags(p, hidden=True)
  p.set_defaults(func=_models)
  return parser


# ----------------------------------------------------------------------------
# Quiet logs and one-line errors.

# Library lines that say nothing a user can act on (shown with --verbose).
_NOISE = re.compile("|".join((
    r"Given directory is read only", r"Metadata file does not exist",
    r"CheckpointManagerOptions\.read_only=True", r"Consider passing None for sequence_length",
    r"\[process=\d+\]", r"Finished asynchronous save", r"Skipping merge of OCDBT",
    r"Resetting cache at", r"Unable to initialize backend",
)))


# What TensorFlow, XLA and libtpu print from C++ before any logging is set up.
_NATIVE_NOISE = re.compile("|".join((
    r"All log messages before absl::InitializeLog", r"oneDNN custom operations",
    r"Could not find cuda drivers", r"failed call to cuInit", r"cpu_feature_guard",
    r"This TensorFlow binary is optimized", r"TF-TRT Warning", r"Unable to register cu",
    r"computation placer already registered", r"could not determine TPU",
    r"Failed to find host bounds", r"Logging before InitGoogle", r"unexpected worker hostname",
    r"Source Location Trace", r"libtpu_init_utils", r"^\s*$",
)))


@contextlib.contextmanager
def _native_stderr_filtered():
  """Runs the body with the process's stderr (fd 2, where C++ libraries write) going
  to a temporary file, then passes on the lines that are not known noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines():
        if not _NATIVE_NOISE.search(line):
          print(line, file=sys.stderr)


def _load_libraries_quietly(command: str | None) -> None:
  """Imports TensorFlow and starts JAX's backend under the stderr filter, so their
  start-up chatter stays out of the way (--verbose shows it)."""
  if command in (None, "models", "plan"):
    return
  with _native_stderr_filtered():
    import miniend_jax.data  # pylint: disable=import-outside-toplevel,unused-import  (TensorFlow)
    if not os.environ.get("JAX_COORDINATOR_ADDRESS") and not _has_accelerator():
      import jax  # pylint: disable=import-outside-toplevel
      jax.devices()  # a multi-process job must start its runtime first: not here


class _DropNoise(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not _NOISE.search(record.getMessage())


def _configure_logging(verbose: bool) -> None:
  """Our INFO lines; libraries' warnings that matter; everything with --verbose."""
  if not verbose:
    # Before TensorFlow or JAX load: TF's C++ start-up lines (oneDNN, CUDA probing)
    # and, on a machine with no accelerator, the probing of TPU/GPU plugins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _choose_jax_platforms()
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
  logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(message)s", force=True)
  if not verbose:
    for name in ("absl", "jax", "orbax", "tensorflow", "seqio", "etils"):
      logger = logging.getLogger(name)
      logger.setLevel(logging.WARNING)
      logger.addFilter(_DropNoise())
    logging.getLogger().handlers[0].addFilter(_DropNoise())


def _has_accelerator() -> bool:
  """Whether this machine has TPU chips (or is a Cloud TPU VM by its runtime's
  variables) or NVIDIA GPUs, read without importing JAX."""
  from miniend_jax.train import accelerators  # pylint: disable=import-outside-toplevel
  return accelerators.has_accelerator()


def _choose_jax_platforms() -> None:
  """JAX_PLATFORMS=cpu on machines with no accelerator (JAX's probing of TPU and GPU
  plugins is slow and noisy there). Never on a Cloud TPU VM: there a TPU that JAX cannot
  use (held by another process) is an error, not a run on the CPU
  (`partitioning.require_tpu_on_tpu_vm`)."""
  if "JAX_PLATFORMS" not in os.environ and not _has_accelerator():
    os.environ["JAX_PLATFORMS"] = "cpu"


def _message(error: BaseException) -> str:
  """An exception's own message, without gin's "In call to configurable" trailer."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = str(text).split("\n  In call to configurable")[0].strip()
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES,
                                                     errno.EDQUOT):
    text = (f"{text}. The work directory's disk is full or not writable: free space or "
            "pass a --workdir you can write to; the last saved checkpoint is kept")
  return text if text.endswith((".", "!", "?", ")")) else text + "."


def _exit_code(error: BaseException) -> int | None:
  """2 for usage errors, 3 for data / checkpoint / run errors, None for bugs."""
  if isinstance(error, FileExistsError):  # e.g. export into a directory in use: a flag to change
    return EXIT_USAGE
  data_errors = [FileNotFoundError, NotADirectoryError, FloatingPointError]
  # Only modules already loaded can have raised their errors.
  for module, name in (("miniend_jax.model.hf", "CheckpointError"),
                       ("miniend_jax.train.checkpoints", "CheckpointRestoreError"),
                       ("miniend_jax.train.partitioning", "TpuUnavailableError"),
                       ("miniend_jax.data.sources", "BadRecordError")):
    if module in sys.modules:
      data_errors.append(getattr(sys.modules[module], name))
  if isinstance(error, tuple(data_errors)):
    return EXIT_DATA
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES,
                                                     errno.EDQUOT):
    return EXIT_DATA
  if isinstance(error, (GinError, ValueError, KeyError)):
    return EXIT_USAGE
  return None


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or bool(os.environ.get("MINIEND_DEBUG"))
  _configure_logging(verbose="--verbose" in argv)
  try:
    rest, bindings = split_gin_flags(argv)
    command = next((a for a in rest if not a.startswith("-")), None)
    args = build_parser(command).parse_args(rest)
    _set_distributed_env(args)
    import gin  # pylint: disable=import-outside-toplevel
    gin.clear_config()  # one command, one configuration (main may run in a notebook)
    if "--verbose" not in argv:
      _load_libraries_quietly(command)
    return args.func(args, bindings)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
    print("miniend: interrupted; nothing after the last saved checkpoint was kept.",
          file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    code = _exit_code(e)
    if code is None or debug:
      raise
    print(f"miniend: {_message(e)}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
