"""Every process restores the same step: a step one process finds corrupt is damaged for all, a
transient read error is retried and then stops the resume without moving anything.

Example:
  JAX_PLATFORMS=cpu python -m pytest tests/training/test_restore_agreement.py -q -n 0
"""

from __future__ import annotations

import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from softmax_one_jax import checkpoint_reads, rundir
from softmax_one_jax.errors import TransientCheckpointError
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.state import TrainState
from tests.training._micro import cpu_env, losses, train_command

FAULTS = pathlib.Path(__file__).with_name("_read_faults.py")


def _state(value: float, mesh) -> TrainState:
  rep = mesh_lib.replicated(mesh)
  put = lambda x: jax.device_put(jnp.asarray(x), rep)
  return TrainState(step=put(np.int32(value)), params={"w": put(np.full((4,), value, np.float32))},
                    opt_state=(), rng=put(np.zeros(2, np.uint32)),
                    nonfinite_streak=put(np.int32(0)), nonfinite_total=put(np.int32(0)))


def _abstract(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _tree(d: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def saved(tmp_path: pathlib.Path) -> tuple[pathlib.Path, TrainState]:
  """A workdir with steps 2 and 4 (params all 2.0 and all 4.0); the abstract state."""
  mesh = mesh_lib.make_mesh(1, -1, 1)
  manager = rundir.make_manager(tmp_path, async_save=False)
  for step in (2, 4):
    ckpt_lib.save(manager, step, _state(step, mesh))
  manager.close()
  return tmp_path, _abstract(_state(0, mesh))


def _flaky_reads(monkeypatch, step: int, failures: int) -> dict[str, int]:
  """Orbax reads of ``step`` raise ``TimeoutError`` ``failures`` times; counts reads per step."""
  calls: dict[str, int] = {}
  restore = ocp.Checkpointer.restore

  def flaky(self, directory, *args, **kwargs):
    name = pathlib.Path(str(directory)).name
    calls[name] = calls.get(name, 0) + 1
    if name == str(step) and calls[name] <= failures:
      raise TimeoutError(f"The read operation timed out (injected, read {calls[name]})")
    return restore(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.Checkpointer, "restore", flaky)
  monkeypatch.setattr(checkpoint_reads, "READ_BACKOFF_S", 0.0)
  return calls


def test_a_transient_error_is_retried_and_the_step_then_restores(saved, monkeypatch):
  workdir, abstract = saved
  calls = _flaky_reads(monkeypatch, step=4, failures=checkpoint_reads.READ_ATTEMPTS - 1)
  manager = rundir.make_manager(workdir)
  state, step = ckpt_lib.restore_latest(manager, abstract, move_aside_unreadable=True)
  manager.close()
  assert step == 4 and float(state.params["w"][0]) == 4.0
  assert calls == {"4": checkpoint_reads.READ_ATTEMPTS}
  assert not (workdir / rundir.DAMAGED_DIR).exists()


def test_a_persistent_transient_error_stops_the_resume_and_moves_nothing(saved, monkeypatch):
  workdir, abstract = saved
  before = _tree(workdir)
  calls = _flaky_reads(monkeypatch, step=4, failures=10 ** 6)
  manager = rundir.make_manager(workdir)
  with pytest.raises(TransientCheckpointError) as raised:
    ckpt_lib.restore_latest(manager, abstract, move_aside_unreadable=True)
  manager.close()
  text = str(raised.value)
  assert "transient" in text and "step 4" in text and "TimeoutError" in text, text
  assert str(workdir / rundir.CHECKPOINT_DIR / "4") in text, text
  assert "rerun the same command" in text, text
  # Retried, then stopped: step 2 was not restored in its place, and nothing moved.
  assert calls == {"4": checkpoint_reads.READ_ATTEMPTS}
  assert _tree(workdir) == before
  assert not (workdir / rundir.DAMAGED_DIR).exists()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


FLAGS = ("--config.num_train_steps=4", "--config.data_shards=2",
         "--config.checkpoint.every_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=2")


def _two_processes(workdir: pathlib.Path, prefix: list[str] | None = None,
                   timeout: float = 240) -> list[tuple[int, str]]:
  """``softmax-one train`` on 2 processes x 2 CPU devices; ``(returncode, stderr)`` of each."""
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = train_command(workdir, *FLAGS, f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=2", f"--process_id={i}")
    if prefix is not None:
      cmd = [sys.executable, str(FAULTS), *prefix, "--", *cmd[3:]]      # drop "python -m cli"
    procs.append(subprocess.Popen(cmd, env=cpu_env(2), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  try:
    results = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, err) for p, err in zip(procs, results)]


@pytest.mark.slow
def test_a_step_only_process_1_finds_corrupt_is_damaged_for_both(tmp_path: pathlib.Path):
  workdir = tmp_path / "run"
  for code, err in _two_processes(workdir):
    assert code == 0, err[-3000:]
  want = losses(workdir)
  assert sorted(want) == [1, 2, 3, 4]

  # Process 1's reads of step 4 fail as damaged data; process 0 reads step 4 fine.
  resumed = _two_processes(workdir, prefix=["corrupt", "4", "1"])
  for code, err in resumed:
    assert code == 0, err[-3000:]
  (_, err0), (_, err1) = resumed
  assert f"Resumed {workdir} from step 2." in err0, err0[-3000:]
  # Both processes restored step 2, having agreed that step 4 is corrupt (on process 1).
  for err in (err0, err1):
    assert re.search(r"Checkpoint step 4 in \S+ is corrupt on process\(es\) \[1\]", err), (
        err[-3000:])
    assert "Resumed from step 2 after skipping unreadable steps" in err, err[-3000:]
  # Moved aside exactly once (by process 0), kept whole, and saved again by the resumed run.
  assert (err0 + err1).count("Moved unreadable checkpoint step 4 ") == 1, err0[-3000:]
  moved = [p for p in (workdir / rundir.DAMAGED_DIR).iterdir() if p.is_dir()]   # not its README.txt
  assert [p.name.split("-")[0] for p in moved] == ["4"], moved
  assert (moved[0] / "state").is_dir() and (moved[0] / "data").is_dir()
  assert (workdir / rundir.CHECKPOINT_DIR / "4" / "state").is_dir()
  got = losses(workdir)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-6)
