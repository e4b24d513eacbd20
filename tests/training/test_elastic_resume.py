"""Elastic resume: the data state is saved per data shard, so a run resumes on another process
count with the same global batches; another ``config.data_shards`` is refused with the fix.

Example:
  JAX_PLATFORMS=cpu python -m pytest tests/training/test_elastic_resume.py -q -n 0
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess

import grain.checkpoint
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from softmax_one_jax import rundir
from softmax_one_jax.data import get_tokenizer
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.checkpoint import data_files_to_read
from softmax_one_jax.training.data_iter import ShardedIterator
from softmax_one_jax.training.state import TrainState
from tests.training._micro import cpu_env, losses, micro_config, train_command

# ------------------------------------------------------------------ which files a process reads

_TWO = {"shard_0-of-2.json", "shard_1-of-2.json"}


def test_each_process_reads_the_files_of_its_own_shards():
  assert data_files_to_read(_TWO, (0, 1), 2, 0, 1) == (["shard_0-of-2.json", "shard_1-of-2.json"],
                                                       False)
  assert data_files_to_read(_TWO, (1,), 2, 1, 2) == (["shard_1-of-2.json"], False)


def test_another_data_shards_is_refused_with_the_fix():
  with pytest.raises(ConfigError, match=r"data_shards=2.*--config\.data_shards=2"):
    data_files_to_read(_TWO, (0,), 1, 0, 1)


def test_a_per_process_checkpoint_restores_on_its_own_process_count_only():
  names = {"process_0-of-2.json", "process_1-of-2.json"}
  assert data_files_to_read(names, (1,), 2, 1, 2) == (["process_1-of-2.json"], True)
  with pytest.raises(ConfigError, match=r"per process by 2 process\(es\).*once with 2"):
    data_files_to_read(names, (0, 1), 2, 0, 1)


def test_a_missing_shard_file_is_a_corrupt_step():
  with pytest.raises(FileNotFoundError, match="shard_1-of-2.json"):
    data_files_to_read({"shard_0-of-2.json"}, (0, 1), 2, 0, 1)
  with pytest.raises(FileNotFoundError, match="process_1-of-2.json"):
    data_files_to_read({"process_0-of-2.json"}, (1,), 2, 1, 2)


# -------------------------------------------------------------- the handler, in one process

def test_the_handler_restores_the_shards_it_is_asked_for(tmp_path: pathlib.Path):
  # Distinct states per shard (the pipeline's shards often hold equal ones, which would hide a
  # mix-up): what process 1 of 2 reads is shard 1's, and one process reads both in order.
  handler = ckpt_lib.DataShardsHandler()
  handler.save(tmp_path, ckpt_lib.DataShardsSave(
      states={s: json.dumps({"next_index": 10 + s}) for s in range(4)}, num_shards=4))
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard_{s}-of-4.json" for s in range(4)]
  read = lambda ids: handler.restore(tmp_path, ckpt_lib.DataShardsRestore(ids, num_shards=4))
  assert read((2, 3)) == [{"next_index": 12}, {"next_index": 13}]
  assert read((0, 1, 2, 3)) == [{"next_index": 10 + s} for s in range(4)]


def _state(mesh) -> TrainState:
  rep = mesh_lib.replicated(mesh)
  put = lambda x: jax.device_put(jnp.asarray(x), rep)
  return TrainState(step=put(np.int32(3)), params={"w": put(np.ones(4, np.float32))}, opt_state=(),
                    rng=put(np.zeros(2, np.uint32)), nonfinite_streak=put(np.int32(0)),
                    nonfinite_total=put(np.int32(0)))


def _abstract(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@pytest.fixture(scope="module")
def tokenizer():
  return get_tokenizer(micro_config().data)


def _iterator(tokenizer, data_shards: int, process_index: int = 0,
              process_count: int = 1) -> ShardedIterator:
  return ShardedIterator(micro_config(data_shards=data_shards), tokenizer, process_index,
                         process_count)


def _assert_batches_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_one_process_saves_every_shard_and_each_of_two_processes_restores_its_own(
    tmp_path: pathlib.Path, tokenizer):
  mesh = mesh_lib.make_mesh(1, -1, 1)
  state = _state(mesh)
  saved = _iterator(tokenizer, data_shards=2)
  next(saved)
  manager = rundir.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 1, state, saved)
  manager.close()
  data_dir = tmp_path / rundir.CHECKPOINT_DIR / "1" / "data"
  assert sorted(p.name for p in data_dir.glob("*.json")) == sorted(_TWO)
  want = next(saved)                    # rows [8, T]: shard 0's 4, then shard 1's 4

  for process, rows in ((0, slice(0, 4)), (1, slice(4, 8))):
    # Process `process` of 2 reads one shard: the handler picks that shard's file.
    resumed = _iterator(tokenizer, data_shards=2, process_index=process, process_count=2)
    manager = rundir.make_manager(tmp_path, read_only=True, async_save=False)
    _, step = ckpt_lib.restore_latest(manager, _abstract(state), resumed)
    manager.close()
    assert step == 1
    _assert_batches_equal(next(resumed), {k: v[rows] for k, v in want.items()})


def test_a_resume_with_another_data_shards_raises_a_config_error(tmp_path: pathlib.Path,
                                                                  tokenizer):
  mesh = mesh_lib.make_mesh(1, -1, 1)
  state = _state(mesh)
  manager = rundir.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 1, state, _iterator(tokenizer, data_shards=2))
  manager.close()
  _assert_refused(tmp_path, state, _iterator(tokenizer, data_shards=1), r"--config\.data_shards=2")


def _assert_refused(workdir: pathlib.Path, state, iterator, match: str) -> None:
  """A training resume of ``workdir`` into ``iterator`` raises ConfigError(match), moving nothing."""
  manager = rundir.make_manager(workdir)
  with pytest.raises(ConfigError, match=match):
    ckpt_lib.restore_latest(manager, _abstract(state), iterator, move_aside_unreadable=True)
  manager.close()
  assert not (workdir / rundir.DAMAGED_DIR).exists()


class _GrainItem:
  """What the old code handed Grain's handler: ``get_state()`` as JSON bytes."""

  def __init__(self, state: dict):
    self._state = json.dumps(state).encode()

  def get_state(self) -> bytes:
    return self._state


def test_a_checkpoint_written_per_process_by_grain_still_restores(tmp_path: pathlib.Path,
                                                                   tokenizer):
  mesh = mesh_lib.make_mesh(1, -1, 1)
  state = _state(mesh)
  saved = _iterator(tokenizer, data_shards=2)
  next(saved)
  manager = rundir.make_manager(tmp_path, async_save=False)
  manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_GrainItem({"shards": saved.get_shard_states()}))))
  manager.close()
  data_dir = tmp_path / rundir.CHECKPOINT_DIR / "1" / "data"
  assert [p.name for p in data_dir.glob("*.json")] == ["process_0-of-1.json"]

  resumed = _iterator(tokenizer, data_shards=2)
  manager = rundir.make_manager(tmp_path)
  _, step = ckpt_lib.restore_latest(manager, _abstract(state), resumed)
  manager.close()
  assert step == 1
  _assert_batches_equal(next(resumed), next(saved))

  # The same files as if 2 processes had written them: one process cannot take them over.
  (data_dir / "process_0-of-1.json").rename(data_dir / "process_0-of-2.json")
  (data_dir / "process_1-of-2.json").write_text(json.dumps({"shards": []}))
  _assert_refused(tmp_path, state, _iterator(tokenizer, data_shards=2),
                  r"written per process by 2 process\(es\)")


# ---------------------------------------------------- 2 processes x 2 devices -> 1 x 4 devices

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_run_saved_by_two_processes_resumes_on_one_with_the_same_batches(
    tmp_path: pathlib.Path):
  # One learning-rate schedule for every run (by default it spans num_train_steps).
  flags = ("--config.data_shards=2", "--config.optimizer.decay_steps=20",
           "--config.checkpoint.every_steps=5", "--config.mesh.data=2", "--config.mesh.fsdp=2")
  one, elastic = tmp_path / "one", tmp_path / "elastic"
  ref = subprocess.Popen(train_command(one, "--config.num_train_steps=20", *flags),
                         env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  port = _free_port()
  two = [subprocess.Popen(
      train_command(elastic, "--config.num_train_steps=10", *flags,
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}"),
      env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    results = [p.communicate(timeout=240) for p in (ref, *two)]
  finally:
    for p in (ref, *two):
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip((ref, *two), results):
    assert p.returncode == 0, err[-3000:]
  data_dir = elastic / rundir.CHECKPOINT_DIR / "10" / "data"
  assert sorted(p.name for p in data_dir.glob("*.json")) == sorted(_TWO)

  resumed = subprocess.run(train_command(elastic, "--config.num_train_steps=20", *flags),
                           env=cpu_env(4), capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed {elastic} from step 10." in resumed.stderr, resumed.stderr[-3000:]
  want, got = losses(one), losses(elastic)
  assert sorted(want) == sorted(got) == list(range(1, 21))
  np.testing.assert_allclose([got[s] for s in range(11, 21)], [want[s] for s in range(11, 21)],
                             rtol=1e-6)
