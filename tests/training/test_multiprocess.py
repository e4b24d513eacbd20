"""Multi-host: 2 processes (jax.distributed over loopback, 2 CPU devices each) == 1 process x 4."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest

from tests.training._micro import cpu_env, losses, train_command


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path):
  flags = ("--config.num_train_steps=4", "--config.data_shards=2",
           "--config.checkpoint.every_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=2")
  one = subprocess.Popen(train_command(tmp_path / "one", *flags), env=cpu_env(4),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  port = _free_port()
  procs = [subprocess.Popen(
      train_command(tmp_path / "two", *flags, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}"),
      env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=240) for p in (one, *procs)]
  for p, (_, err) in zip((one, *procs), results):
    assert p.returncode == 0, err[-3000:]
  want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert sorted(want) == [1, 2, 3, 4] and sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-6)
  # One data-iterator state per data shard (each process wrote the shard it reads).
  data_dir = tmp_path / "two" / "checkpoints" / "4" / "data"
  assert sorted(p.name for p in data_dir.glob("*.json")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
