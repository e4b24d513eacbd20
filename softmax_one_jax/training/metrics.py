"""Run metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

Only process 0 writes. On resume, records after the restored step are dropped from
``metrics.jsonl`` so the file reads like one uninterrupted run, and TensorBoard is told to hide the
scalars the interrupted run logged after that step.

Crash safety:
  * A record cut mid-write (process killed, node lost) can only be the file's last line: it has no
    trailing newline or is not valid JSON. ``read_metrics`` drops it with a warning, and the next
    resume rewrites the file without it.
  * A corrupt record before the last line is not a torn write but damage (an edit, a disk error,
    two writers); ``read_metrics`` raises ``ValueError`` naming the file and line rather than
    silently losing or reordering history: repair or delete that line and rerun.
  * The resume rewrite goes to a temporary file in the same directory (flushed and fsynced) that
    ``os.replace`` moves onto metrics.jsonl: a kill at any point leaves the old or the new complete
    file.
  * On an object store (``gs://``) an object is replaced whole or not at all, so the resume
    rewrite is one upload. There is no append: the records go up as one object at most every
    ``REMOTE_UPLOAD_EVERY_S`` seconds and on ``flush``/``close``. A run killed in between loses
    its last records, which the resumed run, restarting at its last checkpoint, logs again.
  * TensorBoard: each writer opens a new event file that starts with a ``SessionLog.START`` event at
    ``resume_step + 1`` (tensorboardX's ``purge_step``); TensorBoard then discards every event of
    the earlier files with a step >= that one, so steps the crashed run logged after its last
    checkpoint do not show twice.

Example:
  >>> w = MetricsWriter("runs/tiny", resume_step=0)
  >>> w.write(10, {"loss": 3.2, "learning_rate": 1e-3})
  >>> w.close()
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import jax
from etils import epath

from softmax_one_jax.errors import DataError
from softmax_one_jax.rundir import (METRICS_FILE, TENSORBOARD_DIR, PathLike, is_remote,
                                    workdir_path)

log = logging.getLogger(__name__)

EVENT_FILE_MARKER = "tfevents"  # TensorBoard reads the files whose name holds this
# Seconds between uploads of metrics.jsonl to an object store (which cannot append).
REMOTE_UPLOAD_EVERY_S = 30.0


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)          # JSON has no NaN/inf; keep the file standard
  return value


def _read_lines(path: epath.Path) -> list[tuple[bytes, dict[str, Any]]]:
  """The complete records of a metrics.jsonl as ``(raw line with its newline, record)``.

  A torn last line (no trailing newline, or not valid JSON) is dropped with a warning naming the
  file and its byte offset; a corrupt line before it raises ``ValueError``.

  Example:
    >>> _read_lines(epath.Path("runs/tiny/metrics.jsonl"))[0][1]
    {'step': 10, 'loss': 3.2}
  """
  data = path.read_bytes()
  lines = data.splitlines(keepends=True)
  out: list[tuple[bytes, dict[str, Any]]] = []
  offset = 0
  for number, raw in enumerate(lines, start=1):
    start, offset = offset, offset + len(raw)
    if not raw.strip():
      continue
    last = number == len(lines)
    try:
      record = json.loads(raw.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
      if last and not raw.endswith(b"\n"):
        raise ValueError("no trailing newline")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      if last:
        log.warning("Dropping the torn last record of %s at byte offset %d (%d bytes: %s); the "
                    "run was probably killed while writing it.", path, start, len(raw), e)
        break
      raise DataError(
          f"{path}: line {number} (byte offset {start}) is not a valid JSON record ({e}); only "
          "the last line can be torn by a crash, so this is damage to the file: repair or delete "
          "that line and rerun.") from e
    out.append((raw, record))
  return out


def read_metrics(workdir: PathLike) -> list[dict[str, Any]]:
  """All complete records of ``workdir/metrics.jsonl`` in file order.

  A torn last record (a write cut by a crash) is dropped with a logged warning; a corrupt record
  before the last line raises ``ValueError`` naming the file and line.

  Example:
    >>> [r["step"] for r in read_metrics("runs/tiny")]
    [10, 20, 30]
  """
  path = workdir_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [record for _, record in _read_lines(path)]


def _replace_atomically(path: epath.Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that a crash leaves the old or the new complete file.

  On an object store one upload replaces the object atomically. On a file system the bytes go to
  a temporary file in the same directory (``os.replace`` is atomic only within one file system),
  flushed and fsynced before the rename; the directory is fsynced after it so the rename itself
  survives a power loss.

  Example:
    >>> _replace_atomically(epath.Path("runs/tiny/metrics.jsonl"), b'{"step": 10}\\n')
  """
  if is_remote(path):
    path.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  try:
    dir_fd = os.open(path.parent, os.O_RDONLY)
  except OSError:  # platforms without directory handles: the rename is still atomic
    return
  try:
    os.fsync(dir_fd)
  except OSError:
    pass
  finally:
    os.close(dir_fd)


def _event_file_suffix(tb_dir: epath.Path) -> str:
  """A suffix that makes this writer's event file new and last in TensorBoard's (name) order.

  tensorboardX names event files ``events.out.tfevents.<unix seconds>.<host><suffix>`` and opens
  them with ``"wb"``: without a suffix a writer started in the same second as the previous one
  (a quick resume) would truncate its file. A counter of the files already there is unique and
  sorts after the earlier suffixes of the same second.

  Example:
    >>> _event_file_suffix(epath.Path("runs/tiny/tensorboard"))
    '.000002'
  """
  existing = list(tb_dir.glob(f"*{EVENT_FILE_MARKER}*")) if tb_dir.exists() else []
  return f".{len(existing):06d}"


class MetricsWriter:
  """Appends step records to metrics.jsonl and scalars to TensorBoard (process 0 only).

  Args:
    workdir: the run directory (a local path or an object-store URI).
    resume_step: the step the run restarts from; records and TensorBoard scalars of later steps
      (logged by an interrupted run after its last checkpoint) are dropped / hidden.
    tensorboard: also write TensorBoard scalars (tensorboardX).

  Example:
    >>> w = MetricsWriter("runs/tiny", resume_step=20)   # the run restarts after step 20
    >>> w.write(30, {"loss": 3.0})
    >>> w.close()
  """

  def __init__(self, workdir: PathLike, resume_step: int = 0, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    workdir = workdir_path(workdir)
    self._path = workdir / METRICS_FILE
    self._tb = None
    # An object store cannot append: the file's bytes are kept here and uploaded whole.
    self._remote = is_remote(self._path)
    self._content = b""
    self._unsent = False
    self._last_upload = time.monotonic()
    if not self._active:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if self._path.exists():
      lines = _read_lines(self._path)
      kept = b"".join(raw for raw, r in lines if r.get("step", 0) <= resume_step)
      # Rewrite only when something goes (later steps, a torn tail, blank lines): an unchanged
      # file is left alone.
      if kept != self._path.read_bytes():
        _replace_atomically(self._path, kept)
      self._content = kept
    elif self._remote:
      self._path.write_bytes(b"")
    else:
      self._path.touch()
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      tb_dir = workdir / TENSORBOARD_DIR
      # purge_step opens the new event file with SessionLog.START at resume_step + 1: TensorBoard
      # drops the earlier files' events from that step on, as metrics.jsonl drops its records.
      self._tb = SummaryWriter(os.fspath(tb_dir), purge_step=int(resume_step) + 1,
                               filename_suffix=_event_file_suffix(tb_dir))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Writes one record ``{"step": step, **metrics}``."""
    if not self._active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    line = (json.dumps(record) + "\n").encode("utf-8")
    if self._remote:
      self._content += line
      self._unsent = True
      if time.monotonic() - self._last_upload >= REMOTE_UPLOAD_EVERY_S:
        self._upload()
    else:
      with self._path.open("ab") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))

  def _upload(self) -> None:
    """Replaces the object-store metrics.jsonl with every record written so far."""
    if self._unsent:
      self._path.write_bytes(self._content)
      self._unsent = False
    self._last_upload = time.monotonic()

  def flush(self) -> None:
    if self._remote and self._active:
      self._upload()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._remote and self._active:
      self._upload()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
