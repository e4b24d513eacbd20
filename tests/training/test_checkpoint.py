"""Orbax checkpoints: state + data-iterator round trip, and fallback past a corrupt latest step."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.data import build_train_iterator, get_tokenizer
from softmax_one_jax import rundir
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.state import TrainState
from tests.training._micro import micro_config


def _state(rng: np.random.Generator, mesh) -> TrainState:
  """A small TrainState-shaped pytree with sharded and replicated leaves."""
  sh = mesh_lib.logical_sharding(("embed", "mlp"), (8, 4), mesh)
  rep = mesh_lib.replicated(mesh)
  put = lambda x, s: jax.device_put(jnp.asarray(x), s)
  return TrainState(
      step=put(np.int32(rng.integers(0, 100)), rep),
      params={"w": put(rng.normal(size=(8, 4)).astype(np.float32), sh),
              "b": put(rng.normal(size=(4,)).astype(np.float32), rep)},
      opt_state=(put(rng.normal(size=(8, 4)).astype(np.float32), sh),
                 {"rotation": put(rng.normal(size=(4, 4)).astype(np.float32), rep)}),
      rng=put(rng.integers(0, 2**31, 2).astype(np.uint32), rep),
      nonfinite_streak=put(np.int32(0), rep), nonfinite_total=put(np.int32(1), rep))


def _abstract(state: TrainState) -> TrainState:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_falls_back_past_a_corrupt_latest_step(tmp_path: pathlib.Path, np_rng, caplog):
  mesh = mesh_lib.make_mesh(1, 4, 2)
  c = micro_config()
  tok = get_tokenizer(c.data)
  it = build_train_iterator(c.data, tokenizer=tok, seq_len=c.seq_len, global_batch_size=4, seed=3)
  manager = rundir.make_manager(tmp_path, max_to_keep=3, async_save=True)
  states = {}
  for step in (2, 4):
    next(it)
    states[step] = _state(np_rng, mesh)
    ckpt_lib.save(manager, step, states[step], it)
    if step == 2:
      after_two = [next(it) for _ in range(2)]     # what a resumed run at step 2 must see next
  manager.wait_until_finished()
  manager.close()

  # Intact latest step: state and iterator come back exactly.
  manager = rundir.make_manager(tmp_path)
  fresh = build_train_iterator(c.data, tokenizer=tok, seq_len=c.seq_len, global_batch_size=4, seed=3)
  restored, step = ckpt_lib.restore_latest(manager, _abstract(states[4]), fresh)
  assert step == 4
  _assert_equal(restored, states[4])
  assert restored.params["w"].sharding == states[4].params["w"].sharding

  # Corrupt step 4's array data: it is reported by step number and step 2 is used.
  for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  fresh = build_train_iterator(c.data, tokenizer=tok, seq_len=c.seq_len, global_batch_size=4, seed=3)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt_lib.restore_latest(manager, _abstract(states[4]), fresh)
  manager.close()
  assert step == 2
  assert any("step 4" in r.getMessage() for r in caplog.records)
  _assert_equal(restored, states[2])
  for want in after_two:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_no_checkpoint_returns_none(tmp_path: pathlib.Path):
  manager = rundir.make_manager(tmp_path)
  assert ckpt_lib.restore_latest(manager, None) is None
  manager.close()


def test_restore_params_reads_weights_whatever_the_optimizer_state(tmp_path: pathlib.Path,
                                                                    np_rng):
  mesh = mesh_lib.make_mesh(1, 4, 2)
  state = _state(np_rng, mesh)
  manager = rundir.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 3, state, None)
  manager.close()
  # Today's optimizer state may have another structure: the full restore refuses it ...
  changed = _abstract(state)
  changed = TrainState(**{**vars(changed), "opt_state": (changed.opt_state[0],
                                                         {"rotation": changed.opt_state[1],
                                                          "mixes": ()})})
  manager = rundir.make_manager(tmp_path, read_only=True, async_save=False)
  with pytest.raises(RuntimeError, match="No readable checkpoint"):
    ckpt_lib.restore_latest(manager, changed)
  manager.close()
  # ... while the weights alone come back exactly, with their shardings.
  params, step = rundir.restore_params(tmp_path, _abstract(state).params)
  assert step == 3
  _assert_equal(params, state.params)
  assert params["w"].sharding == state.params["w"].sharding
