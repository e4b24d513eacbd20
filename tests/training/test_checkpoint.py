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
from softmax_one_jax.training.state import TrainState, build_run, init_train_state
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


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=".")


def test_orthoadam_moments_saved_in_the_parameter_shape_restore_as_the_matrix_view(
    tmp_path: pathlib.Path, np_rng, caplog):
  # A checkpoint of the releases that kept OrthoAdam's moments in each parameter's own shape
  # (q/k/v kernel [D, H, 3, Dh], bias [H, 3, Dh]) resumes: each moment comes back as numpy's
  # row-major reshape to [d0, rest], in today's sharding (heads on the tensor axis).
  c = micro_config()
  c.mesh.fsdp, c.mesh.tensor = 4, 2
  _, _, model_cfg, setup = build_run(c)
  fresh = init_train_state(setup, model_cfg, seed=0)
  param_shape = {_name(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(fresh.params)[0]}

  def moment_of(name: str) -> str | None:
    """The parameter a leaf is a moment of (None: not a moment)."""
    for kind in (".mu.", ".nu."):
      if kind in name:
        return name.split(kind, 1)[1]
    return None

  # Fresh moments are zero, which any reshape keeps: random values in every moment instead.
  moments = {_name(p): np_rng.normal(size=x.shape).astype(np.float32)
             for p, x in jax.tree_util.tree_flatten_with_path(fresh)[0] if moment_of(_name(p))}
  old = jax.tree_util.tree_map_with_path(
      lambda p, x: (x if moment_of(_name(p)) is None else
                    jnp.asarray(moments[_name(p)].reshape(param_shape[moment_of(_name(p))]))),
      fresh)
  converted = sorted(n for n in moments if len(param_shape[moment_of(n)]) >= 3)
  assert [n for n in converted if ".mu." in n] == [
      "opt_state.1.0.mu.blocks.0.attn.qkv_proj.bias.value",
      "opt_state.1.0.mu.blocks.0.attn.qkv_proj.kernel.value"]

  manager = rundir.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 6, old, None)
  manager.close()
  manager = rundir.make_manager(tmp_path)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt_lib.restore_latest(manager, setup.abstract_state)
  manager.close()
  assert step == 6
  assert any(f"holds {len(converted)} OrthoAdam moments" in r.getMessage() for r in caplog.records)
  for (path, x), a in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                          jax.tree.leaves(setup.abstract_state)):
    want = moments.get(_name(path), None)
    if want is not None:
      np.testing.assert_array_equal(np.asarray(x), want, err_msg=_name(path))
    assert x.shape == a.shape and x.sharding.is_equivalent_to(a.sharding, x.ndim), _name(path)
  _assert_equal(restored.params, fresh.params)


def test_an_optimizer_leaf_of_another_shape_still_does_not_fit(tmp_path: pathlib.Path, np_rng):
  # Only the matrix view of the saved shape converts: [4, 2, 4] saved where [8, 4] is asked for
  # holds as many numbers but is another parameter, and the restore refuses it.
  mesh = mesh_lib.make_mesh(1, 4, 2)
  state = _state(np_rng, mesh)
  state = TrainState(**{**vars(state), "opt_state": (
      jnp.asarray(np_rng.normal(size=(4, 2, 4)), jnp.float32), state.opt_state[1])})
  manager = rundir.make_manager(tmp_path, async_save=False)
  ckpt_lib.save(manager, 3, state, None)
  manager.close()
  asked = _abstract(state)
  asked = TrainState(**{**vars(asked), "opt_state": (
      jax.ShapeDtypeStruct((8, 4), jnp.float32), asked.opt_state[1])})
  manager = rundir.make_manager(tmp_path, read_only=True, async_save=False)
  with pytest.raises(RuntimeError, match="No readable checkpoint"):
    ckpt_lib.restore_latest(manager, asked)
  manager.close()
