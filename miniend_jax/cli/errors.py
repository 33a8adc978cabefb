"""Expected failures as one line, `miniend: <what is wrong>. <what to do>.`, and an exit status.

2 (EXIT_USAGE): flags, settings, a directory made by another run; 3 (EXIT_DATA):
data, checkpoints, files, a diverged run. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import sys

from miniend_jax.cli.gin_flags import GinError

EXIT_USAGE, EXIT_DATA = 2, 3


def message(error: BaseException) -> str:
  """An exception's own message, without gin's "In call to configurable" trailer."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = str(text).split("\n  In call to configurable")[0].strip()
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES,
                                                     errno.EDQUOT):
    text = (f"{text}. The work directory's disk is full or not writable: free space or "
            "pass a --workdir you can write to; the last saved checkpoint is kept")
  return text if text.endswith((".", "!", "?", ")")) else text + "."


def exit_code(error: BaseException) -> int | None:
  """2 for usage errors, 3 for data / checkpoint / run errors, None for bugs."""
  if isinstance(error, FileExistsError):  # e.g. export into a directory in use: a flag to change
    return EXIT_USAGE
  data_errors = [FileNotFoundError, NotADirectoryError, FloatingPointError]
  # Only modules already loaded can have raised their errors.
  for module, name in (("miniend_jax.model.hf", "CheckpointError"),
                       ("miniend_jax.train.checkpoint_errors", "CheckpointRestoreError"),
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
