"""Preemption: a run killed with SIGKILL at a random step (and one stopped by SIGTERM) resumes
bit-exactly on CPU."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest

from tests.training._micro import cpu_env, losses, train_command


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _interrupt(cmd, env, sig, min_step, min_checkpoint, workdir, timeout=240) -> subprocess.CompletedProcess:
  """Starts ``cmd``; sends ``sig`` once a step >= min_step is logged and a checkpoint exists."""
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if (max(losses(workdir), default=0) >= min_step and
        any(s >= min_checkpoint for s in _checkpoint_steps(workdir))):
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  out, err = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_reproduce_the_uninterrupted_losses(tmp_path):
  steps = 80          # long enough that the interrupts land before the end, even on fast CPUs
  flags = (f"--config.num_train_steps={steps}", "--config.checkpoint.every_steps=5",
           "--config.log_every_steps=1")
  env = cpu_env(2)
  ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
  # The uninterrupted reference shares nothing with the interrupted run (its own workdir), so it
  # trains alongside it; its losses are read once it has finished.
  # Its output goes to a file: a pipe nobody reads while the other run is driven could fill up.
  ref_log = tmp_path / "uninterrupted.log"
  with open(ref_log, "w", encoding="utf-8") as log:
    ref_proc = subprocess.Popen(train_command(ref_dir, *flags), env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
  try:
    _interrupted_then_resumed(run_dir, flags, env)
    ref_proc.wait(timeout=300)
  finally:
    if ref_proc.poll() is None:
      ref_proc.kill()
      ref_proc.wait()
  assert ref_proc.returncode == 0, ref_log.read_text()[-3000:]
  want = losses(ref_dir)
  assert sorted(want) == list(range(1, steps + 1))
  got = losses(run_dir)
  assert got == want          # bitwise: the same floats at every step


def _interrupted_then_resumed(run_dir: pathlib.Path, flags, env) -> None:
  """SIGKILL at a random step, resume, SIGTERM, resume to the end (losses in run_dir)."""
  cmd = train_command(run_dir, *flags)
  kill_after = 6 + int.from_bytes(os.urandom(1), "little") % 25    # a fresh step in 6..30
  print(f"SIGKILL once step {kill_after} is logged")
  killed = _interrupt(cmd, env, signal.SIGKILL, kill_after, 5, run_dir)
  assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  first_resume_from = max(_checkpoint_steps(run_dir))

  stopped = _interrupt(cmd, env, signal.SIGTERM, first_resume_from + 3, first_resume_from + 1,
                       run_dir)
  assert f"Resumed {run_dir} from step" in stopped.stderr, stopped.stderr[-3000:]
  assert stopped.returncode == 143, stopped.stderr[-3000:]   # saved, stopped, resumable
  assert "Stop requested" in stopped.stderr

  final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "Resumed" in final.stderr
