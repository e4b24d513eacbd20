"""Fault injection: each fault ends in an exact resume or a clear refusal, never in lost data.

Here: a SIGKILL in the middle of an asynchronous checkpoint save, a second run started on a live
run's workdir, a lock left by a killed run, and a full disk during a save. The other faults of
the suite live beside the feature they exercise:

  SIGKILL at a random step, SIGTERM mid-run    tests/training/test_resume.py
  a damaged or half-written newest step        tests/training/test_damaged_checkpoint.py
  a torn metrics.jsonl record                  tests/training/test_metrics_log.py
  user errors (files, globs, config, workdir)  tests/test_cli_errors.py
  one host sees a damaged step; transient reads tests/training/test_restore_agreement.py
  a resume on another process count            tests/training/test_elastic_resume.py
  a bucket workdir: kill, resume, second run   tests/training/test_bucket_workdir.py

Faults inside Orbax's background save are injected by ``_fault_driver.py``, which runs the real
``softmax-one`` command.

Example:
  JAX_PLATFORMS=cpu python -m pytest tests/training/test_faults.py -q -n 0
"""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import sys
import threading

import pytest

from softmax_one_jax.training import workdir_lock
from tests.training._micro import MICRO, cpu_env, losses, train_command

STEPS = 6                     # checkpoints at 2, 4, 6 (micro config saves every 2 steps)
FAULT_STEP = 4
FLAGS = (f"--config.num_train_steps={STEPS}",)
DRIVER = pathlib.Path(__file__).with_name("_fault_driver.py")


def _train(workdir: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *FLAGS), env=cpu_env(1), capture_output=True,
                        text=True, timeout=300)


def _driver_command(fault: str, workdir: pathlib.Path) -> list[str]:
  return [sys.executable, str(DRIVER), fault, str(FAULT_STEP), "--", "train",
          f"--config={MICRO}:adamw", f"--workdir={workdir}", *FLAGS]


def _steps(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
  """The losses of an uninterrupted run."""
  workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
  done = _train(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  want = losses(workdir)
  assert sorted(want) == list(range(1, STEPS + 1))
  return want


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
  """The first stdout line of ``proc`` that starts with ``prefix`` ("" if it exits first)."""
  found: list[str] = []
  def read():
    for line in proc.stdout:
      if line.startswith(prefix):
        found.append(line.strip())
        return
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout)
  return found[0] if found else ""


@pytest.mark.slow
def test_sigkill_during_an_async_save_refuses_a_second_run_then_resumes_exactly(
    reference: dict[int, float], tmp_path: pathlib.Path):
  workdir = tmp_path / "run"
  first = subprocess.Popen(_driver_command("pause", workdir), env=cpu_env(1), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    paused = _wait_for_line(first, "SAVE PAUSED ", timeout=240)
    assert paused, first.stderr.read()[-3000:] if first.poll() is not None else "no pause"
    tmp_dir = pathlib.Path(paused.split(" ", 2)[2])
    assert tmp_dir.name.startswith(f"{FAULT_STEP}.orbax-checkpoint-tmp"), tmp_dir
    assert any(f.is_file() for f in tmp_dir.rglob("*")), "the save had written nothing yet"

    # A second run on the live run's workdir is refused at once, naming the holder.
    second = _train(workdir)
    assert second.returncode == 2, second.stderr[-3000:]
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith("softmax-one train: error: "), second.stderr[-3000:]
    assert f"pid {first.pid} on host {socket.gethostname()}" in message
    assert "Traceback" not in second.stderr
    assert not (workdir / "checkpoints" / str(FAULT_STEP + 2)).exists()
  finally:
    first.kill()                       # SIGKILL, with step 4's save half written
    first.wait(timeout=60)
  assert first.returncode == -signal.SIGKILL
  assert str(FAULT_STEP) not in _steps(workdir)
  assert workdir_lock.read_holder(workdir)["pid"] == first.pid    # the dead run's lock is left

  # The next run takes the dead run's lock over, passes the half-written step and reproduces
  # every loss of the uninterrupted run; it leaves the lock free.
  rerun = _train(workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"took over the lock of a run that is no longer alive (pid {first.pid}" in rerun.stderr
  assert f"Resumed {workdir} from step {FAULT_STEP - 2}." in rerun.stderr, rerun.stderr[-3000:]
  assert losses(workdir) == reference          # bitwise
  assert str(FAULT_STEP) in _steps(workdir)
  assert workdir_lock.read_holder(workdir) is None


@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_with_one_message_and_loses_nothing(
    reference: dict[int, float], tmp_path: pathlib.Path):
  workdir = tmp_path / "run"
  full = subprocess.run(_driver_command("disk_full", workdir), env=cpu_env(1),
                        capture_output=True, text=True, timeout=300)
  assert full.returncode == 2, full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]
  message = full.stderr.strip().splitlines()[-1]
  assert message.startswith("softmax-one train: error: no space left on the device while writing "
                            f"{workdir / 'checkpoints'}"), message
  assert "rerun the same command" in message
  assert str(FAULT_STEP - 2) in _steps(workdir)        # the previous checkpoint is intact
  assert workdir_lock.read_holder(workdir) is None     # the lock was released on the way out

  rerun = _train(workdir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed {workdir} from step {FAULT_STEP - 2}." in rerun.stderr, rerun.stderr[-3000:]
  assert losses(workdir) == reference
