"""One run per workdir: a live holder refuses others; a dead holder's lock is taken over."""

from __future__ import annotations

import errno
import json
import logging
import pathlib
import socket
import subprocess
import sys

import pytest

from softmax_one_jax.errors import WorkdirBusyError
from softmax_one_jax.training import workdir_lock
from softmax_one_jax.training.workdir_lock import hold_workdir, read_holder

_HOLDER = """
import sys, time
from softmax_one_jax.training.workdir_lock import hold_workdir
with hold_workdir(sys.argv[1]):
  print("HELD", flush=True)
  time.sleep(600)
"""


def _start_holder(workdir: pathlib.Path) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "HELD"
  return proc


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path, caplog):
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(WorkdirBusyError) as e:
      with hold_workdir(tmp_path):
        pass
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(e.value)
    assert f"kill -TERM {holder.pid}" in str(e.value)
  finally:
    holder.kill()
    holder.wait()
  assert read_holder(tmp_path)["pid"] == holder.pid          # SIGKILL left the record behind
  with caplog.at_level(logging.WARNING):
    with hold_workdir(tmp_path):
      assert read_holder(tmp_path)["pid"] != holder.pid
  assert any(f"pid {holder.pid}" in r.getMessage() and "no longer alive" in r.getMessage()
             for r in caplog.records)
  assert read_holder(tmp_path) is None                       # released: names no holder


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(RuntimeError):
    with hold_workdir(tmp_path):
      raise RuntimeError("the run failed")
  with hold_workdir(tmp_path):
    pass


def test_without_flock_a_live_pid_on_this_host_still_refuses(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  try:
    record = {"host": socket.gethostname(), "pid": holder.pid, "started": "then"}
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid}"):
      with hold_workdir(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  record["pid"] = _dead_pid()
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))
  with hold_workdir(tmp_path):
    assert read_holder(tmp_path)["pid"] != record["pid"]
