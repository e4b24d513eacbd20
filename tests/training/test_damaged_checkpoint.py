"""A damaged newest checkpoint step: training moves it aside and resumes bit-exactly on CPU.

Example:
  JAX_PLATFORMS=cpu python -m pytest tests/training/test_damaged_checkpoint.py -q -n 0
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import subprocess

import pytest

from softmax_one_jax import rundir
from tests.training._micro import cpu_env, losses, train_command

STEPS = 6                     # checkpoints at 2, 4, 6 (micro config saves every 2 steps)
FLAGS = (f"--config.num_train_steps={STEPS}",)


def _train(workdir: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *FLAGS), env=cpu_env(1), capture_output=True,
                        text=True, timeout=300)


def _damage(step_dir: pathlib.Path) -> None:
  """Overwrites the array files of a step's state item; its metadata files stay readable."""
  damaged = 0
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name.lower():
      f.write_bytes(b"garbage")
      damaged += 1
  assert damaged, f"no array files under {step_dir}"


def _files(d: pathlib.Path) -> dict[str, bytes]:
  return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """An uninterrupted micro run of ``STEPS`` steps (copied by each test, never changed)."""
  workdir = tmp_path_factory.mktemp("damaged") / "uninterrupted"
  done = _train(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(losses(workdir)) == list(range(1, STEPS + 1))
  return workdir


def test_training_resume_moves_a_damaged_newest_step_aside_and_reproduces_the_losses(
    trained: pathlib.Path, tmp_path: pathlib.Path):
  run_dir = tmp_path / "run"
  shutil.copytree(trained, run_dir)
  want = losses(trained)
  newest = run_dir / "checkpoints" / str(STEPS)
  _damage(newest)
  damaged_files = _files(newest)

  rerun = _train(run_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed {run_dir} from step {STEPS - 2}." in rerun.stderr, rerun.stderr[-3000:]

  # The damaged step went to the place the warning names, whole, and was saved again.
  moved = re.search(rf"Moved unreadable checkpoint step {STEPS} from \S+ to (\S+) \(kept",
                    rerun.stderr)
  assert moved, rerun.stderr[-3000:]
  target = pathlib.Path(moved.group(1))
  assert target.parent == run_dir / rundir.DAMAGED_DIR
  assert re.fullmatch(rf"{STEPS}-\d{{8}}T\d{{12}}Z", target.name), target.name
  assert _files(target) == damaged_files
  assert (run_dir / "checkpoints" / str(STEPS) / "state").is_dir()
  assert _files(run_dir / "checkpoints" / str(STEPS) / "state") != _files(target / "state")

  # metrics.jsonl drops the records after the resume point, so steps 5.. are the rerun's.
  got = losses(run_dir)
  assert got == want          # bitwise: the same floats at every step


def test_training_resume_passes_a_half_written_step(trained: pathlib.Path, tmp_path: pathlib.Path):
  run_dir = tmp_path / "run"
  shutil.copytree(trained, run_dir)
  want = losses(trained)
  # What a kill during the async save of the newest step leaves on a local disk: Orbax's
  # temporary directory, never renamed to the step's name.
  newest = run_dir / "checkpoints" / str(STEPS)
  newest.rename(newest.with_name(f"{STEPS}.orbax-checkpoint-tmp-1700000000000000"))

  rerun = _train(run_dir)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Resumed {run_dir} from step {STEPS - 2}." in rerun.stderr, rerun.stderr[-3000:]
  assert (run_dir / "checkpoints" / str(STEPS) / "state").is_dir()
  assert losses(run_dir) == want


def test_read_only_load_skips_a_damaged_step_without_moving_it(
    trained: pathlib.Path, tmp_path: pathlib.Path, caplog):
  run_dir = tmp_path / "run"
  shutil.copytree(trained, run_dir)
  newest = run_dir / "checkpoints" / str(STEPS)
  _damage(newest)
  before = _files(run_dir / "checkpoints")

  with caplog.at_level(logging.WARNING):
    model, config = rundir.load_model(run_dir)
  assert model is not None and config.num_train_steps == STEPS
  assert any(f"step {STEPS}" in r.getMessage() for r in caplog.records)
  assert any(f"Resumed from step {STEPS - 2}" in r.getMessage() for r in caplog.records)
  assert not (run_dir / rundir.DAMAGED_DIR).exists()
  assert _files(run_dir / "checkpoints") == before
