"""One verdict per checkpoint step, the same on every process: read, classify, retry, agree.

A resume reads the newest checkpoint step on every process, and a read that fails fails for one
of four reasons, told apart by ``classify_read_error``:

  CORRUPT       the step's files are damaged or missing (a torn write, metadata that does not
                parse, TensorStore's DATA_LOSS / NOT_FOUND): it will never read. The previous step
                is tried; a training resume moves the step aside.
  INCOMPATIBLE  the files read but do not fit what is asked of them (another tree structure,
                shape or dtype: other code or another config). The previous step is tried;
                nothing is moved.
  TRANSIENT     an I/O error that is not corruption (timeouts, lost connections, OSError,
                TensorStore's UNAVAILABLE / DEADLINE_EXCEEDED): retried with backoff, then the
                restore stops with ``TransientCheckpointError``; nothing is moved.
  REFUSED       a ``UserError`` (e.g. the data item was saved with another ``config.data_shards``):
                raised as it is.

Each process reads a step on its own (``read_step``: an Orbax ``Checkpointer`` whose barriers span
only this process, so a failed read cannot leave the other processes waiting in a collective),
then all processes share their outcomes (``gather_outcomes``: one all-gather of a small int) and
take the worst one (``agreed_outcome``). So all restore the newest step that every process read,
and a step that any process found corrupt is damaged for all.

Example:
  >>> read = read_step(manager.directory, 60, make_args)           # doctest: +SKIP
  >>> agreed_outcome(gather_outcomes(read.outcome))                # doctest: +SKIP
  <ReadOutcome.OK: 0>
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from softmax_one_jax.errors import TransientCheckpointError, UserError

log = logging.getLogger(__name__)

READ_ATTEMPTS = 4          # tries of a step that fails with a transient error
READ_BACKOFF_S = 2.0       # wait before the 2nd try; doubled before each further one (2, 4, 8 s)


class ReadOutcome(enum.IntEnum):
  """What reading one checkpoint step gave; a larger value is worse (``agreed_outcome``)."""

  OK = 0
  CORRUPT = 1
  INCOMPATIBLE = 2
  TRANSIENT = 3
  REFUSED = 4


# TensorStore (and gRPC / absl) status codes, at the start of an error's message.
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED",
                     "UNAUTHENTICATED", "PERMISSION_DENIED")
_CORRUPT_STATUS = ("DATA_LOSS", "NOT_FOUND")
_STATUS = re.compile(r"\b(" + "|".join(_TRANSIENT_STATUS + _CORRUPT_STATUS) + r"):")
# Storage clients' own names for a transient failure (google-api-core, TensorFlow's gfile,
# google-auth), matched by class name so that none of them has to be installed.
_TRANSIENT_NAMES = frozenset({"ServiceUnavailable", "TooManyRequests", "GatewayTimeout",
                              "DeadlineExceeded", "RetryError", "TransportError",
                              "UnavailableError", "DeadlineExceededError", "AbortedError"})
# Orbax's and Grain's words for a step whose files are missing or incomplete.
_CORRUPT_WORDS = ("incomplete checkpoint", "not found in the checkpoint", "does not exist",
                  "Error decoding")
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_CORRUPT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def _chain(exc: BaseException) -> list[BaseException]:
  """``exc``, its causes and contexts, and the members of exception groups, each once."""
  seen: set[int] = set()
  out: list[BaseException] = []
  stack = [exc]
  while stack:
    e = stack.pop()
    if id(e) in seen:
      continue
    seen.add(id(e))
    out.append(e)
    stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    stack.extend(getattr(e, "exceptions", ()))
  return out


def _statuses(e: BaseException) -> set[str]:
  return set(_STATUS.findall(str(e)))


def _is_transient(e: BaseException) -> bool:
  if isinstance(e, OSError) and not isinstance(e, _MISSING):
    return e.errno not in _CORRUPT_ERRNOS
  return type(e).__name__ in _TRANSIENT_NAMES or bool(_statuses(e) & set(_TRANSIENT_STATUS))


def _is_corrupt(e: BaseException) -> bool:
  if isinstance(e, (*_MISSING, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  if isinstance(e, OSError) and e.errno in _CORRUPT_ERRNOS:
    return True
  return bool(_statuses(e) & set(_CORRUPT_STATUS)) or any(w in str(e) for w in _CORRUPT_WORDS)


def classify_read_error(exc: BaseException) -> ReadOutcome:
  """Why reading a checkpoint step raised ``exc``: CORRUPT, INCOMPATIBLE, TRANSIENT or REFUSED.

  The whole chain counts (``__cause__``, ``__context__``, exception groups), since Orbax and
  TensorStore wrap the error that happened. In order: any ``UserError`` -> REFUSED; any I/O error
  that is not a missing file (``OSError`` and its ``TimeoutError``, ``ConnectionError``, ...,
  a storage client's ``ServiceUnavailable``, a status UNAVAILABLE / DEADLINE_EXCEEDED / ABORTED /
  CANCELLED / UNAUTHENTICATED / PERMISSION_DENIED) -> TRANSIENT; a missing file, JSON that does
  not parse, a status DATA_LOSS / NOT_FOUND, Orbax's "incomplete checkpoint" -> CORRUPT;
  anything else (a tree or shape that does not match the target) -> INCOMPATIBLE. A doubt between
  transient and corrupt is settled as transient: it stops the restore, which moves nothing.

  Examples:
    >>> classify_read_error(TimeoutError("read timed out")).name
    'TRANSIENT'
    >>> classify_read_error(ValueError('DATA_LOSS: Error reading "params.w/0.0"')).name
    'CORRUPT'
    >>> classify_read_error(ValueError("tree structures do not match")).name
    'INCOMPATIBLE'
  """
  chain = _chain(exc)
  if any(isinstance(e, UserError) for e in chain):
    return ReadOutcome.REFUSED
  if any(_is_transient(e) for e in chain):
    return ReadOutcome.TRANSIENT
  if any(_is_corrupt(e) for e in chain):
    return ReadOutcome.CORRUPT
  return ReadOutcome.INCOMPATIBLE


def describe(exc: BaseException) -> str:
  """``"ValueError: <first line of the message>"``, for one-line warnings."""
  text = str(exc).splitlines()[0] if str(exc) else ""
  return f"{type(exc).__name__}: {text[:500]}"


@dataclasses.dataclass(frozen=True)
class StepRead:
  """One process's read of one step: ``restored`` when ``outcome`` is OK, else ``error``."""

  outcome: ReadOutcome
  restored: Any = None
  error: BaseException | None = None


def read_step(directory: epath.PathLike, step: int, args: Callable[[int], Any], *,
              attempts: int | None = None, backoff_s: float | None = None,
              sleep: Callable[[float], None] = time.sleep) -> StepRead:
  """Reads ``directory/<step>`` on this process alone, retrying transient errors; never raises.

  No other process takes part (no barrier, no collective), so this returns on every process
  whatever each one's read gave, and ``gather_outcomes`` can follow on all of them.

  Args:
    directory: a ``CheckpointManager``'s directory (steps are its ``<step>`` subdirectories).
    step: the step to read.
    args: builds the ``ocp.args.Composite`` restore arguments of a step (called with
      ``step`` once per try; it may read the step's metadata, and its errors are classified).
    attempts, backoff_s: tries of a transient failure and the first wait between them
      (doubled each time); default ``READ_ATTEMPTS``, ``READ_BACKOFF_S``.
    sleep: waits between tries (tests pass a no-op).

  Returns:
    ``StepRead``: OK with the restored ``CompositeResults``, or the outcome and the last error.
  """
  attempts = READ_ATTEMPTS if attempts is None else attempts
  backoff_s = READ_BACKOFF_S if backoff_s is None else backoff_s
  path = epath.Path(directory) / str(step)
  # Barriers over this process only: Orbax's restore ends in one over every process otherwise.
  options = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
  error: BaseException | None = None
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                        multiprocessing_options=options) as checkpointer:
    for attempt in range(max(attempts, 1)):
      if attempt:
        sleep(backoff_s * 2 ** (attempt - 1))
      try:
        return StepRead(ReadOutcome.OK, restored=checkpointer.restore(path, args=args(step)))
      except Exception as e:  # pylint: disable=broad-except  # classified, then returned
        error, outcome = e, classify_read_error(e)
        if outcome != ReadOutcome.TRANSIENT:
          return StepRead(outcome, error=e)
        log.warning("Reading checkpoint step %d at %s failed with a transient error (%s); try "
                    "%d of %d.", step, path, describe(e), attempt + 1, attempts)
  return StepRead(ReadOutcome.TRANSIENT, error=error)


def gather_outcomes(outcome: ReadOutcome) -> tuple[ReadOutcome, ...]:
  """Every process's outcome for the same step, indexed by process (a collective: all call it).

  Example (2 processes, process 1 found the step corrupt):
    >>> gather_outcomes(read.outcome)                               # doctest: +SKIP
    (<ReadOutcome.OK: 0>, <ReadOutcome.CORRUPT: 1>)
  """
  if jax.process_count() == 1:
    return (outcome,)
  got = multihost_utils.process_allgather(np.asarray([int(outcome)], np.int32))   # [P, 1]
  return tuple(ReadOutcome(int(x)) for x in np.asarray(got).reshape(-1))


def agreed_outcome(outcomes: Sequence[ReadOutcome]) -> ReadOutcome:
  """The outcome every process acts on: the worst one (a step is read only if all read it).

  Example:
    >>> agreed_outcome([ReadOutcome.OK, ReadOutcome.CORRUPT]).name
    'CORRUPT'
  """
  return max(outcomes, default=ReadOutcome.OK)


def processes_with(outcomes: Sequence[ReadOutcome], outcome: ReadOutcome) -> list[int]:
  """The process indices whose outcome is ``outcome``: ``[1]`` for ``(OK, CORRUPT), CORRUPT``."""
  return [p for p, o in enumerate(outcomes) if o == outcome]


def steps_of_process_0(steps: Sequence[int]) -> list[int]:
  """Process 0's list of steps, newest first, on every process (a collective: all call it).

  Each process lists the directory itself; reading the steps of its own list could make processes
  read different steps and wait in different collectives.

  Example:
    >>> steps_of_process_0(manager.all_steps())                     # doctest: +SKIP
    [60, 50, 40]
  """
  mine = sorted((int(s) for s in steps), reverse=True)
  if jax.process_count() == 1:
    return mine
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(mine))))
  if n == 0:
    return []
  source = np.asarray(mine if jax.process_index() == 0 else [0] * n, np.int32)
  return [int(s) for s in np.asarray(multihost_utils.broadcast_one_to_all(source))]


def transient_error(step: int, path: epath.PathLike, outcomes: Sequence[ReadOutcome],
                    error: BaseException | None) -> TransientCheckpointError:
  """The error that stops a restore on a transient failure: the step, the path, the fix."""
  who = processes_with(outcomes, ReadOutcome.TRANSIENT)
  seen = f" ({describe(error)})" if error is not None else " (see that process's log)"
  return TransientCheckpointError(
      f"Reading checkpoint step {step} at {epath.Path(path) / str(step)} failed on process(es) "
      f"{who} with a transient I/O error{seen} on every try. The step is not known to "
      "be damaged, so nothing was moved aside and no older step was restored. Check the storage "
      "(network, mount, credentials, quota), then rerun the same command to resume.")


__all__ = ["READ_ATTEMPTS", "READ_BACKOFF_S", "ReadOutcome", "StepRead", "agreed_outcome",
           "classify_read_error", "describe", "gather_outcomes", "processes_with", "read_step",
           "steps_of_process_0", "transient_error"]
