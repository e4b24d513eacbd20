"""metrics.jsonl and TensorBoard survive crashes: torn last records, atomic resume rewrite, no
duplicated TensorBoard steps after a resume."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct

import pytest

from softmax_one_jax.rundir import METRICS_FILE, TENSORBOARD_DIR
from softmax_one_jax.training import metrics as metrics_lib
from softmax_one_jax.training.metrics import MetricsWriter, read_metrics


def _log_steps(workdir: pathlib.Path, steps, resume_step: int = 0, offset: float = 0.0,
               tensorboard: bool = False) -> None:
  """One writer's life: resume at ``resume_step``, log ``loss = step + offset`` per step, close."""
  w = MetricsWriter(workdir, resume_step=resume_step, tensorboard=tensorboard)
  for s in steps:
    w.write(s, {"loss": s + offset})
  w.close()


def _event_records(path: pathlib.Path):
  """The TFRecord payloads of one event file, stopping at a torn tail (as TensorBoard does)."""
  data = path.read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    end = pos + 12 + length + 4
    if end > len(data):
      break
    yield data[pos + 12:pos + 12 + length]
    pos = end


def _tensorboard_scalars(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """The scalars TensorBoard shows: files in name order, ``SessionLog.START`` at step s purging
  the events read so far with step >= s (TensorBoard's EventAccumulator rule for file_version 2)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  shown: dict[str, list[tuple[int, float]]] = {}
  for path in sorted((workdir / TENSORBOARD_DIR).glob("*tfevents*")):
    for payload in _event_records(path):
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = {tag: [(s, v) for s, v in pts if s < event.step] for tag, pts in shown.items()}
      for value in event.summary.value:
        shown.setdefault(value.tag, []).append((event.step, value.simple_value))
  return shown


@pytest.mark.parametrize("tail", [b'{"step": 30, "lo', b'{"step": 30, "loss": 30.0}',
                                  b'{"step": 30, "note": "\xe2\x82'],
                         ids=["cut-json", "no-newline", "cut-utf8"])
def test_torn_last_record_is_dropped_with_a_warning_and_resume_works(tmp_path, caplog, tail):
  _log_steps(tmp_path, [10, 20])
  path = tmp_path / METRICS_FILE
  intact = path.read_bytes()
  with path.open("ab") as f:
    f.write(tail)                                   # the crash cut the third record mid-write

  with caplog.at_level(logging.WARNING, logger=metrics_lib.__name__):
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
  warning, = [r.getMessage() for r in caplog.records if r.name == metrics_lib.__name__]
  assert str(path) in warning and f"byte offset {len(intact)}" in warning

  _log_steps(tmp_path, [30, 40], resume_step=20)    # the resume drops the torn record for good
  assert path.read_bytes().startswith(intact)
  assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 40]


def test_a_corrupt_record_before_the_last_line_is_an_error_naming_file_and_line(tmp_path):
  _log_steps(tmp_path, [10, 20, 30])
  path = tmp_path / METRICS_FILE
  lines = path.read_bytes().splitlines(keepends=True)
  damaged = lines[0] + b'{"step": 20, "lo\n' + lines[2]
  path.write_bytes(damaged)
  with pytest.raises(ValueError, match=rf"{METRICS_FILE}: line 2 \(byte offset {len(lines[0])}\)"):
    read_metrics(tmp_path)
  with pytest.raises(ValueError, match="line 2"):
    MetricsWriter(tmp_path, resume_step=10, tensorboard=False)
  assert path.read_bytes() == damaged               # damage is reported, never rewritten away


def test_resume_rewrite_is_atomic(tmp_path, monkeypatch):
  _log_steps(tmp_path, [10, 20, 30, 40, 50])
  path = tmp_path / METRICS_FILE
  original = path.read_bytes()

  def crash(src, dst):
    assert pathlib.Path(src).parent == pathlib.Path(dst).parent == tmp_path  # same file system
    assert pathlib.Path(src).read_bytes() == b"".join(original.splitlines(keepends=True)[:2])
    raise OSError("killed during the rewrite")
  monkeypatch.setattr(metrics_lib.os, "replace", crash)
  with pytest.raises(OSError, match="killed during the rewrite"):
    MetricsWriter(tmp_path, resume_step=20, tensorboard=False)
  assert path.read_bytes() == original              # the old file, whole
  assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary left behind

  monkeypatch.undo()
  calls = []                                        # the temporary is fsynced before the rename
  real_fsync, real_replace = os.fsync, os.replace
  def fsync(fd):
    calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
    real_fsync(fd)
  def replace(src, dst):
    calls.append(("replace", os.path.realpath(src)))
    real_replace(src, dst)
  monkeypatch.setattr(metrics_lib.os, "fsync", fsync)
  monkeypatch.setattr(metrics_lib.os, "replace", replace)
  _log_steps(tmp_path, [30], resume_step=20)
  (_, tmp), = [c for c in calls if c[0] == "replace"]
  if os.path.isdir("/proc/self/fd"):                # Linux names an fd's file there
    assert calls.index(("fsync", tmp)) < calls.index(("replace", tmp))
  assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]
  assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_an_unchanged_file_is_not_rewritten(tmp_path, monkeypatch):
  _log_steps(tmp_path, [10, 20])
  monkeypatch.setattr(metrics_lib.os, "replace", lambda *a: pytest.fail("needless rewrite"))
  _log_steps(tmp_path, [30], resume_step=20)
  assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]


def test_tensorboard_shows_no_duplicated_steps_after_a_resume(tmp_path):
  # The first run checkpointed step 4, logged steps 5-6, then crashed; the resume restarts at 4.
  _log_steps(tmp_path, range(1, 7), tensorboard=True)
  _log_steps(tmp_path, range(5, 9), resume_step=4, offset=100.0, tensorboard=True)
  expected = [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 9)]
  assert _tensorboard_scalars(tmp_path) == {"loss": expected}
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == expected
  # Both runs' event files are kept (a resume within the same second must not truncate the first).
  assert len(list((tmp_path / TENSORBOARD_DIR).glob("*tfevents*"))) == 2

  # A restart from scratch (no checkpoint yet) hides everything logged before.
  _log_steps(tmp_path, range(1, 3), offset=1000.0, tensorboard=True)
  assert _tensorboard_scalars(tmp_path) == {"loss": [(1, 1001.0), (2, 1002.0)]}


def test_tensorboard_event_accumulator_agrees(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  _log_steps(tmp_path, range(1, 7), tensorboard=True)
  _log_steps(tmp_path, range(5, 9), resume_step=4, offset=100.0, tensorboard=True)
  acc = event_accumulator.EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == (
      [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 9)])
