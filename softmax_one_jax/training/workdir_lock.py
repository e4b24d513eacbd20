"""One run per workdir: a lock that a live ``train`` holds and the kernel drops when it dies.

``workdir/train.lock`` names the holder (host, pid, start time, command) as one JSON object. The
lock itself is an exclusive, non-blocking ``flock`` on that file: the kernel releases it when the
holding process ends in any way (exit, SIGKILL, out-of-memory kill), so a file left by a dead run
is taken over by the next ``train`` with a notice, and a live holder can never be overtaken.
On a file system without ``flock`` support the holder's pid is checked instead, which detects a
live run on this host only; the fallback says so.

The file is never deleted, only emptied on release: deleting it would let a process that opened
the old file lock it while a newer process locks a new one.

An object-store workdir (``gs://bucket/run``) has no ``flock``; there the lock is a lease,
``train.lock`` as an object (``GcsLease``):

- taken by creating the object only if it does not exist (GCS's ``ifGenerationMatch=0``), so of
  two runs starting together exactly one gets it;
- renewed by the holder every ``lease_refresh_s()`` seconds (a rewrite conditional on the
  generation it last wrote), so a live holder's object keeps changing;
- a lease left by a dead run (killed, preempted) is taken over once its object has not changed
  for ``2.5`` renewal intervals (no clocks are compared across hosts), or at once when it names a
  process of this host that no longer exists; the takeover is conditional on the generation seen,
  so two runs cannot both take it;
- a holder whose renewal finds another generation has lost the workdir: it logs why and stops
  its run (``KeyboardInterrupt`` in the main thread) rather than write beside another run;
- released by deleting the object (conditional on its own generation).

Example:
  >>> with hold_workdir("runs/tiny"):          # or "gs://bucket/run"
  ...   ...                                   # a second train on runs/tiny is refused here
"""

from __future__ import annotations

import _thread
import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from softmax_one_jax.errors import ConfigError, WorkdirBusyError
from softmax_one_jax.rundir import PathLike, is_remote, workdir_path

try:
  import fcntl
except ImportError:  # not POSIX: only the pid check is possible
  fcntl = None

LOCK_FILE = "train.lock"
log = logging.getLogger(__name__)

_NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def read_holder(workdir: PathLike) -> dict[str, Any] | None:
  """The holder record in ``workdir/train.lock`` (None when absent, empty or unreadable)."""
  try:
    text = (workdir_path(workdir) / LOCK_FILE).read_text(encoding="utf-8")
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


def _busy(workdir: PathLike, holder: dict[str, Any] | None) -> WorkdirBusyError:
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


def _other_process_here(holder: dict[str, Any] | None) -> int | None:
  """The pid a holder record names when it is another process of this host, else None."""
  pid = (holder or {}).get("pid")
  same_host = bool(holder) and holder.get("host") == socket.gethostname()
  return pid if same_host and isinstance(pid, int) and pid != os.getpid() else None


def _check_without_flock(workdir: pathlib.Path) -> None:
  """The fallback: refuses when the recorded holder is a live process on this host."""
  holder = read_holder(workdir)
  pid = _other_process_here(holder)
  if pid is not None and _pid_alive(pid):
    raise _busy(workdir, holder)
  log.warning("%s: this file system does not support flock; only a run on this host (%s) can be "
              "detected as holding the workdir.", workdir, socket.gethostname())


def _write_holder(fd: int) -> None:
  data = json.dumps(_this_holder()).encode("utf-8") + b"\n"
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


@contextlib.contextmanager
def hold_workdir(workdir: PathLike) -> Iterator[None]:
  """Holds ``workdir`` for one training run; creates the folder if needed.

  A local folder is held by ``flock``, an object-store URI by a ``GcsLease`` (module docstring).

  Raises:
    WorkdirBusyError: a live process holds the workdir (the message names its host and pid).
  """
  if is_remote(workdir):
    with _hold_by_lease(workdir):
      yield
    return
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


# ------------------------------------------------------------------------ object-store workdirs

def lease_refresh_s() -> float:
  """Seconds between a holder's renewals of its lease: ``$SOFTMAX_ONE_LEASE_REFRESH_S``, else 15.

  A lease left by a dead run is taken over after ``2.5`` times this without a renewal.
  """
  return float(os.environ.get("SOFTMAX_ONE_LEASE_REFRESH_S", "15"))


def _split_gcs_uri(uri: str) -> tuple[str, str]:
  """``("bucket", "run/train.lock")`` of ``gs://bucket/run/train.lock``.

  Example:
    >>> _split_gcs_uri("gs://bkt/runs/a/train.lock")
    ('bkt', 'runs/a/train.lock')
  """
  bucket, _, name = uri[len("gs://"):].partition("/")
  return bucket, name


class GcsLease:
  """``train.lock`` as a GCS object with generation preconditions (module docstring).

  Args:
    uri: the lock object, ``gs://bucket/run/train.lock``.
    refresh_s: seconds between renewals.

  Example:
    >>> lease = GcsLease("gs://bkt/run/train.lock", refresh_s=15.0)
    >>> lease.acquire(); ...; lease.release()
  """

  def __init__(self, uri: str, refresh_s: float):
    try:
      from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
      from google.cloud import storage  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f"A gs:// workdir needs the GCS client: pip install -e \".[gcs]\" "
                        f"(for {uri}).") from None
    self.uri, self.refresh_s = uri, refresh_s
    self._errors = exceptions
    bucket, name = _split_gcs_uri(uri)
    self._client = storage.Client()
    self._bucket, self._name = self._client.bucket(bucket), name
    self._generation: int | None = None
    self._record = _this_holder()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost = False

  def _write(self, if_generation_match: int) -> int:
    """Uploads the holder record if the object's generation is ``if_generation_match`` (0: if it
    does not exist); returns the new generation."""
    blob = self._bucket.blob(self._name)
    record = {**self._record, "renewed": time.time()}
    blob.upload_from_string(json.dumps(record) + "\n", content_type="application/json",
                            if_generation_match=if_generation_match)
    return int(blob.generation)

  def _current(self) -> tuple[int, dict[str, Any] | None] | None:
    """``(generation, holder record)`` of the object, or None when it does not exist."""
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return None
    generation = int(blob.generation)
    try:
      record = json.loads(blob.download_as_bytes(if_generation_match=generation) or b"null")
    except (ValueError, self._errors.PreconditionFailed, self._errors.NotFound):
      record = None
    return generation, record if isinstance(record, dict) else None

  def acquire(self) -> None:
    """Takes the lease, waiting out a holder that stopped renewing; starts the renewals.

    Raises:
      WorkdirBusyError: a live run holds it.
    """
    workdir = self.uri.rsplit("/", 1)[0]
    while True:
      try:
        self._generation = self._write(if_generation_match=0)
        break
      except self._errors.PreconditionFailed:
        pass
      seen = self._current()
      if seen is None:
        continue                                  # released meanwhile: create it again
      generation, holder = seen
      if not self._holder_is_gone(holder):
        deadline = time.monotonic() + 2.5 * self.refresh_s
        log.warning("%s names %s; waiting up to %.0f s to see whether it renews its lease.",
                    self.uri, _describe(holder), 2.5 * self.refresh_s)
        while time.monotonic() < deadline:
          time.sleep(min(self.refresh_s / 4, max(deadline - time.monotonic(), 0)))
          now = self._current()
          if now is None or now[0] != generation:
            break
        now = self._current()
        if now is None:
          continue
        if now[0] != generation:
          raise _busy(workdir, now[1])
      try:
        self._generation = self._write(if_generation_match=generation)
      except self._errors.PreconditionFailed:
        raise _busy(workdir, (self._current() or (0, None))[1]) from None
      log.warning("%s: took over the lease of a run that is no longer alive (%s).", workdir,
                  _describe(holder))
      break
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()

  @staticmethod
  def _holder_is_gone(holder: dict[str, Any] | None) -> bool:
    """A record of this host naming a process that no longer runs (no need to wait it out)."""
    pid = _other_process_here(holder)
    return pid is not None and not _pid_alive(pid)

  def _renew(self) -> None:
    while not self._stop.wait(self.refresh_s):
      try:
        self._generation = self._write(if_generation_match=self._generation)
      except self._errors.PreconditionFailed:
        self.lost = True
        log.error("%s was taken over by another run (%s): this run stops rather than write "
                  "beside it.", self.uri, _describe((self._current() or (0, None))[1]))
        _thread.interrupt_main()
        return
      except Exception as e:  # pylint: disable=broad-except  # transient: retried next interval
        log.warning("Could not renew %s (%s: %s); retrying in %.0f s.", self.uri,
                    type(e).__name__, e, self.refresh_s)

  def release(self) -> None:
    """Stops the renewals and deletes the object (only if it is still this run's)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation is None or self.lost:
      return
    try:
      self._bucket.blob(self._name).delete(if_generation_match=self._generation)
    except (self._errors.PreconditionFailed, self._errors.NotFound):
      log.warning("%s was no longer this run's lease when it finished.", self.uri)


@contextlib.contextmanager
def _hold_by_lease(workdir: PathLike) -> Iterator[None]:
  uri = os.fspath(workdir_path(workdir) / LOCK_FILE)
  if not uri.startswith("gs://"):
    log.warning("%s: only local and gs:// workdirs can be locked; nothing stops a second train "
                "from using this one.", workdir)
    yield
    return
  lease = GcsLease(uri, lease_refresh_s())
  lease.acquire()
  try:
    yield
  finally:
    lease.release()
