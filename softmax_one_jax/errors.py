"""Errors the user fixes (a flag, a config value, a file, the disk), told apart from our bugs.

``softmax-one`` prints a ``UserError`` as one message that names what to change and exits with
status 2, without a traceback; every other exception keeps its traceback, because it is ours to
fix. Each class also derives from the builtin a Python caller would expect (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working in library code.

Example:
  >>> try:
  ...   raise ConfigError("config.seq_len=0 must be a positive integer.")
  ... except ValueError as e:
  ...   print(isinstance(e, UserError), e)
  True config.seq_len=0 must be a positive integer.
"""

from __future__ import annotations

import errno


class UserError(Exception):
  """Base of the errors whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
  """A flag or config field is unknown, missing or out of range, or the workdir holds another run."""


class DataError(UserError, ValueError):
  """A corpus, tokenizer or prepared folder cannot be used as it is (bytes, format, size)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file, glob or folder the command needs does not exist."""


class OutputExistsError(UserError, FileExistsError):
  """The output folder already holds a finished result that must not be overwritten."""


class WorkdirBusyError(UserError, RuntimeError):
  """Another live ``softmax-one train`` holds the workdir."""


class DiskFullError(UserError, OSError):
  """Writing a checkpoint, log or cache ran out of space (or quota)."""


class TransientCheckpointError(UserError, OSError):
  """Reading a checkpoint step kept failing with an I/O error that is not corruption.

  Timeouts, lost connections, an unavailable or refusing store: the step may read on a later try,
  so nothing was moved aside and no older step was restored instead.
  """


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_cause(exc: BaseException) -> OSError | None:
  """The ``ENOSPC``/``EDQUOT`` ``OSError`` behind ``exc``, if any.

  Orbax and TensorStore re-raise a failed write inside their own exceptions (and async saves
  inside exception groups), so the search follows ``__cause__``, ``__context__`` and groups; a
  message that carries the errno text is accepted too, since TensorStore reports the C++ error
  as a string.
  """
  seen: set[int] = set()
  stack: list[BaseException] = [exc]
  while stack:
    e = stack.pop()
    if id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      return e
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return OSError(errno.ENOSPC, str(e))
    stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    stack.extend(getattr(e, "exceptions", ()))
  return None
