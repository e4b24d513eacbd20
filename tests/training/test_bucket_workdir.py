"""A run whose workdir is a bucket (``gs://``), against a GCS emulator on localhost.

Train, SIGKILL, resume, eval and analyze all read and write the bucket; nothing of the run is
written to local disk; a second ``train`` on the same bucket workdir is refused while the first
holds its lease; the lease itself is tested against the emulator (with GCS's generation
preconditions, ``tests/gcs_emulator.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.gcs_emulator import gcs_env
from tests.training._micro import REPO, cpu_env, losses, train_command

pytest.importorskip("gcp_storage_emulator", reason='the GCS emulator: pip install -e ".[test]"')
pytest.importorskip("gcsfs", reason='gs:// workdirs need pip install -e ".[gcs]"')

BUCKET = "runs"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
  """The emulator's port, serving an empty bucket ``runs`` until the module's tests are done."""
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", f"--port={port}",
                           f"--bucket={BUCKET}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}", timeout=2).read()
      break
    except OSError:
      if time.monotonic() > deadline or proc.poll() is not None:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start") from None
      time.sleep(0.1)
  yield port
  proc.kill()
  proc.wait()


@pytest.fixture
def gcs(emulator, monkeypatch):
  """This process's Google clients pointed at the emulator; a ``storage.Bucket`` of ``runs``."""
  for k, v in gcs_env(emulator).items():
    monkeypatch.setenv(k, v)
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  return storage.Client().bucket(BUCKET)


def _names(bucket, prefix: str) -> list[str]:
  return sorted(b.name[len(prefix):] for b in bucket.list_blobs(prefix=prefix))


def _bucket_losses(bucket, run: str) -> dict[int, float]:
  blob = bucket.get_blob(f"{run}/metrics.jsonl")
  if blob is None:
    return {}
  records = [json.loads(l) for l in blob.download_as_text().splitlines() if l.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _checkpoint_steps(bucket, run: str) -> list[int]:
  """Finalized checkpoint steps (Orbax writes ``commit_success.txt`` last on object stores)."""
  names = _names(bucket, f"{run}/checkpoints/")
  return sorted({int(n.split("/")[0]) for n in names
                 if n.split("/")[0].isdigit() and n.endswith("commit_success.txt")})


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(gcs, monkeypatch):
  from softmax_one_jax.errors import WorkdirBusyError  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training import workdir_lock  # pylint: disable=import-outside-toplevel
  uri = f"gs://{BUCKET}/lease-test/train.lock"
  first = workdir_lock.GcsLease(uri, refresh_s=0.2)
  first.acquire()
  generation = gcs.get_blob("lease-test/train.lock").generation
  time.sleep(0.5)
  assert gcs.get_blob("lease-test/train.lock").generation != generation   # renewed
  with pytest.raises(WorkdirBusyError, match="in use by another training run"):
    workdir_lock.GcsLease(uri, refresh_s=0.2).acquire()      # waits, sees renewals, refuses
  first.release()
  assert gcs.get_blob("lease-test/train.lock") is None

  # A lease of a run on another host that stopped renewing: taken over after 2.5 intervals.
  gcs.blob("lease-test/train.lock").upload_from_string(
      json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
  t0 = time.monotonic()
  second = workdir_lock.GcsLease(uri, refresh_s=0.2)
  second.acquire()
  assert 0.45 < time.monotonic() - t0 < 5
  assert json.loads(gcs.get_blob("lease-test/train.lock").download_as_text())["pid"] == os.getpid()

  # Overwritten by someone else: the holder notices at its next renewal and stops its run.
  interrupted = []
  monkeypatch.setattr(workdir_lock._thread, "interrupt_main", lambda: interrupted.append(1))
  gcs.blob("lease-test/train.lock").upload_from_string(json.dumps({"host": "thief", "pid": 2}))
  deadline = time.monotonic() + 5
  while not interrupted and time.monotonic() < deadline:
    time.sleep(0.05)
  assert interrupted and second.lost
  second.release()                     # leaves the other run's lease alone
  assert json.loads(gcs.get_blob("lease-test/train.lock").download_as_text())["host"] == "thief"


@pytest.mark.slow
def test_train_kill_resume_eval_analyze_all_in_a_bucket(gcs, emulator, tmp_path):
  run = "micro"
  workdir = f"gs://{BUCKET}/{run}"
  # A fixed decay horizon makes the schedule independent of num_train_steps: the killed run is
  # open-ended, the resume stops 10 steps after the step it restores.
  common = ("--config.optimizer.decay_steps=100", "--config.checkpoint.every_steps=5",
            "--config.log_every_steps=1")
  cwd, cache = tmp_path / "cwd", tmp_path / "cache"
  cwd.mkdir()
  env = {**cpu_env(1), **gcs_env(emulator), "SOFTMAX_ONE_LEASE_REFRESH_S": "2",
         "SOFTMAX_ONE_JAX_CACHE": str(cache), "HOME": str(tmp_path / "home")}
  first = subprocess.Popen(train_command(workdir, "--config.num_train_steps=100000", *common),
                           env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  try:
    deadline = time.monotonic() + 240
    while not _checkpoint_steps(gcs, run):
      assert first.poll() is None, first.stderr.read()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint reached the bucket"
      time.sleep(0.1)
    # A second train on the same bucket workdir is refused while the first holds the lease.
    second = subprocess.run(train_command(workdir, "--config.num_train_steps=100000", *common),
                            env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert second.returncode != 0
    assert "in use by another training run" in second.stderr, second.stderr[-3000:]
    assert first.poll() is None, "the first run stopped while the second was refused"
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == -signal.SIGKILL
  killed_at = max(_checkpoint_steps(gcs, run))
  steps = killed_at + 10
  flags = (f"--config.num_train_steps={steps}", *common)

  resumed = subprocess.run(train_command(workdir, *flags), env=env, cwd=cwd, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed {workdir} from step {killed_at}" in resumed.stderr
  reference = subprocess.run(train_command(tmp_path / "local", *flags), env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=300)
  assert reference.returncode == 0, reference.stderr[-3000:]
  want, got = losses(tmp_path / "local"), _bucket_losses(gcs, run)
  assert sorted(got) == list(range(1, steps + 1))       # the killed run's later records dropped
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])

  for cmd in ("eval", "analyze"):
    done = subprocess.run([sys.executable, "-m", "softmax_one_jax.cli", cmd,
                           f"--workdir={workdir}"], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
  names = _names(gcs, f"{run}/")
  for expected in ("config.json", "metrics.jsonl", "analysis/table.md", "analysis/metrics.json",
                   "analysis/first_token_per_layer.png", f"checkpoints/{steps}/commit_success.txt"):
    assert expected in names, names
  assert any(n.startswith("tensorboard/") and "tfevents" in n for n in names), names
  assert gcs.get_blob(f"{run}/train.lock") is None      # released by the run that finished
  # Nothing of the run on local disk: the working directory stays empty (no "gs:" folder).
  assert list(cwd.iterdir()) == []
