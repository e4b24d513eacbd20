"""One run per workdir: a lock that a live ``train`` holds and the kernel drops when it dies.

``workdir/train.lock`` names the holder (host, pid, start time, command) as one JSON object. The
lock itself is an exclusive, non-blocking ``flock`` on that file: the kernel releases it when the
holding process ends in any way (exit, SIGKILL, out-of-memory kill), so a file left by a dead run
is taken over by the next ``train`` with a notice, and a live holder can never be overtaken.
On a file system without ``flock`` support the holder's pid is checked instead, which detects a
live run on this host only; the fallback says so.

The file is never deleted, only emptied on release: deleting it would let a process that opened
the old file lock it while a newer process locks a new one.

Example:
  >>> with hold_workdir(pathlib.Path("runs/tiny")):
  ...   ...                                   # a second train on runs/tiny is refused here
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import socket
import sys
from collections.abc import Iterator
from typing import Any

from softmax_one_jax.errors import WorkdirBusyError

try:
  import fcntl
except ImportError:  # not POSIX: only the pid check is possible
  fcntl = None

LOCK_FILE = "train.lock"
log = logging.getLogger(__name__)

_NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def read_holder(workdir: pathlib.Path) -> dict[str, Any] | None:
  """The holder record in ``workdir/train.lock`` (None when absent, empty or unreadable)."""
  try:
    text = (workdir / LOCK_FILE).read_text(encoding="utf-8")
    record = json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _this_holder() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
          "command": " ".join(sys.argv)}


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return "a run that is starting (it has not written its name yet)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
          + (f" (`{holder['command']}`)" if holder.get("command") else ""))


def _busy(workdir: pathlib.Path, holder: dict[str, Any] | None) -> WorkdirBusyError:
  pid = (holder or {}).get("pid")
  stop = f"stop it (`kill -TERM {pid}` saves a checkpoint and exits), " if pid else "stop it, "
  return WorkdirBusyError(
      f"{workdir} is in use by another training run: {_describe(holder)}. Wait for it to finish, "
      f"{stop}or pass another --workdir.")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:       # exists, owned by someone else
    return True
  return True


def _check_without_flock(workdir: pathlib.Path) -> None:
  """The fallback: refuses when the recorded holder is a live process on this host."""
  holder = read_holder(workdir)
  if (holder and holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid()
      and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"])):
    raise _busy(workdir, holder)
  log.warning("%s: this file system does not support flock; only a run on this host (%s) can be "
              "detected as holding the workdir.", workdir, socket.gethostname())


def _write_holder(fd: int) -> None:
  data = json.dumps(_this_holder()).encode("utf-8") + b"\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


@contextlib.contextmanager
def hold_workdir(workdir: str | pathlib.Path) -> Iterator[None]:
  """Holds ``workdir`` for one training run; creates the folder if needed.

  Raises:
    WorkdirBusyError: a live process holds the workdir (the message names its host and pid).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  held = False
  try:
    previous = read_holder(workdir)
    if fcntl is None:
      _check_without_flock(workdir)
    else:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise _busy(workdir, read_holder(workdir)) from None
      except OSError as e:
        if e.errno not in _NO_FLOCK_ERRNOS:
          raise
        _check_without_flock(workdir)
    if previous and previous.get("pid") != os.getpid():
      log.warning("%s: took over the lock of a run that is no longer alive (%s).",
                  workdir, _describe(previous))
    _write_holder(fd)
    held = True
    yield
  finally:
    try:
      if held:
        os.ftruncate(fd, 0)     # released: an empty file names no holder
    finally:
      os.close(fd)              # closing drops the flock
