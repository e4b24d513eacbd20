"""optimizer_state_shardings on an 8-device CPU mesh (2 x 4): moments, rotations, any chain."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from softmax_one_jax.optim import (
    Block,
    ScaleByOrthoAdamState,
    optimizer_state_shardings,
    orthoadam,
)
from softmax_one_jax.optim import rotations as R

SPECS = {"w": ((16, 32), P("data", "model")), "v": ((32, 12), P("model", None)),
         "b": ((12,), P(None)), "s": ((), P())}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _setup(mesh):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, (s, _) in SPECS.items()}
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, (s, _) in SPECS.items()}
  return params, shardings, grads


def _find(tree, cls):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, cls))
          if isinstance(x, cls)]


def _same(a, b, ndim):
  assert a.is_equivalent_to(b, ndim), (a, b)


@pytest.mark.parametrize("rotation,axis_type", [
    ("hadamard", AxisType.Auto), ("kronecker", AxisType.Auto), (Block(size=8), AxisType.Auto),
    ("hadamard", AxisType.Explicit), ("kronecker", AxisType.Explicit)], ids=str)
def test_sharded_init_and_update_match_unsharded(rotation, axis_type):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  params, p_shard, grads = _setup(mesh)
  tx = optax.chain(optax.clip_by_global_norm(1.0), orthoadam(1e-2, rotation=rotation))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  s_shard = optimizer_state_shardings(tx, abstract, p_shard)
  assert jax.tree.structure(s_shard) == jax.tree.structure(jax.eval_shape(tx.init, abstract))

  sp = jax.device_put(params, p_shard)
  state = jax.jit(tx.init, in_shardings=(p_shard,), out_shardings=s_shard)(sp)
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(s_shard)):
    _same(leaf.sharding, want, leaf.ndim)

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  sharded_step = jax.jit(step, in_shardings=(p_shard, s_shard, p_shard),
                         out_shardings=(p_shard, s_shard))
  new_p, new_s = sharded_step(jax.device_put(grads, p_shard), state, sp)
  ref_p, ref_s = jax.jit(step)(grads, jax.jit(tx.init)(params), params)
  for k in SPECS:
    _same(new_p[k].sharding, p_shard[k], new_p[k].ndim)
    np.testing.assert_allclose(np.asarray(new_p[k]), np.asarray(ref_p[k]), atol=1e-6)
  (o,) = _find(new_s, ScaleByOrthoAdamState)
  (o_ref,) = _find(ref_s, ScaleByOrthoAdamState)
  # Per-axis rotations leave the moments where their last axis was rotated (optim/layout.py);
  # "block" rotates the flattened parameter, gathered, so its moments keep the param's layout.
  per_axis = rotation != Block(size=8)
  moments = {"w": P(("model", "data")), "v": P(None, "model")} if per_axis else {}
  for k in SPECS:
    want = NamedSharding(mesh, moments[k]) if k in moments else p_shard[k]
    _same(o.mu[k].sharding, want, o.mu[k].ndim)
    _same(o.nu[k].sharding, want, o.nu[k].ndim)
    np.testing.assert_allclose(np.asarray(o.mu[k]), np.asarray(o_ref.mu[k]), atol=1e-6)
  for a, b in zip(jax.tree.leaves(o.rotations), jax.tree.leaves(o_ref.rotations)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert o.count.sharding.is_fully_replicated


def test_rotation_sharding_rules(mesh):
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in SPECS.items()}
  p_shard = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  policy = {"w": "kronecker", "v": "hadamard", "b": Block(size=3), "s": "dense"}
  shard = optimizer_state_shardings(orthoadam(1e-3, rotation=policy), abstract, p_shard)
  (o,) = _find(shard, ScaleByOrthoAdamState)
  # A one-block Kronecker factor is applied where its axis is whole: replicated.
  assert o.rotations["w"].factors[0].spec == P()
  assert o.rotations["w"].factors[1].spec == P()
  # Hadamard: per-axis [d_i] signs and permutations, replicated.
  assert all(s.spec == P() for s in jax.tree.leaves(o.rotations["v"]))
  assert o.rotations["b"].full[0].spec == P(None, None, None)  # 4 blocks; unsharded param.
  assert o.rotations["s"].q_nn.spec == P()
  assert o.mu["w"].spec == P(("model", "data")) and o.count.spec == P()


def test_any_chain_inject_multisteps_masked_adamw(mesh):
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in SPECS.items()}
  p_shard = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  inner = optax.inject_hyperparams(orthoadam, static_args=("seed",))(learning_rate=1e-3)
  mask = {"w": True, "v": True, "b": False, "s": False}
  tx = optax.MultiSteps(optax.chain(optax.masked(inner, mask), optax.adamw(1e-3)), 4)
  shard = optimizer_state_shardings(tx, abstract, p_shard)
  assert jax.tree.structure(shard) == jax.tree.structure(jax.eval_shape(tx.init, abstract))
  assert shard.acc_grads["w"].spec == P("data", "model")
  assert shard.mini_step.spec == P()
  (o,) = _find(shard, ScaleByOrthoAdamState)
  assert o.mu["v"].spec == P(None, "model")   # Where its rotation ends (optim/layout.py).
  assert isinstance(o.mu["b"], optax.MaskedNode)
  adam = _find(shard, optax.ScaleByAdamState)[0]
  assert adam.mu["w"].spec == P("data", "model") and adam.count.spec == P()
  state = jax.jit(tx.init, out_shardings=shard)(
      jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
  assert state.acc_grads["w"].sharding.spec == P("data", "model")


def test_llama7b_shaped_state_is_sharded_not_replicated(mesh):
  # A llama2-7b MLP weight, abstract only: per-device optimizer bytes must be ~AdamW's / 8.
  abstract = {"up": jax.ShapeDtypeStruct((4096, 11008), jnp.float32)}
  p_shard = {"up": NamedSharding(mesh, P("data", "model"))}

  def per_device_bytes(tx):
    shard = optimizer_state_shardings(tx, abstract, p_shard)
    state = jax.eval_shape(tx.init, abstract)
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shard)))

  ortho, adamw = per_device_bytes(orthoadam(1e-3)), per_device_bytes(optax.adamw(1e-3))
  assert adamw == 2 * 4096 * 11008 * 4 // 8 + 4
  assert ortho <= 1.1 * adamw, (ortho, adamw)
