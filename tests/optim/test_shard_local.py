"""Shard-local rotations: blocked Hadamard / Kronecker, shard_local_rotation, and what XLA compiles.

Rotations are checked as dense float64 matrices (orthogonal, block-diagonal, equal to a numpy
construction); the optimizer on an 8-device CPU mesh against itself on one device and against a
float64 numpy Algorithm 1; communication by reading the collectives in the compiled HLO.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from softmax_one_jax.optim import (
    Block,
    Dense,
    Hadamard,
    Kronecker,
    ScaleByOrthoAdamState,
    optimizer_state_shardings,
    orthoadam,
    shard_local_rotation,
)
from softmax_one_jax.optim import hadamard as H
from softmax_one_jax.optim import rotations as R
from tests.optim.test_rotations import explicit_matrix

# ----------------------------------------------------------------------------- rotations

BLOCKED = [  # (shape, blocks): power-of-two and other block lengths, 1-D to 3-D.
    ((8, 12), (4, 1)), ((16, 8), (2, 4)), ((24,), (3,)), ((6, 16), (2, 2)),
    ((2, 12, 8), (1, 3, 2)),
]


@jax.jit
def _dense_q(rot, eye):
  """Q and Q^T as [n, n] matrices: rotate / unrotate every basis vector (eye: [n, *shape])."""
  n = eye.shape[0]
  q = jax.vmap(rot.rotate)(eye).reshape(n, n).T  # Column j: Q e_j.
  q_t = jax.vmap(rot.unrotate)(eye).reshape(n, n).T
  return q, q_t


def dense_q(rot, shape) -> np.ndarray:
  """float64 [n, n] Q of a rotation state, built by rotating the identity basis."""
  n = math.prod(shape)
  q, q_t = _dense_q(rot, jnp.eye(n, dtype=jnp.float32).reshape((n,) + tuple(shape)))
  q, q_t = np.asarray(q, np.float64), np.asarray(q_t, np.float64)
  np.testing.assert_allclose(q_t, q.T, atol=1e-6)  # unrotate is the transpose of rotate.
  return q


def _same_block(shape, blocks) -> np.ndarray:
  """bool [n, n]: row and column coordinates lie in the same block on every axis."""
  idx = np.indices(shape).reshape(len(shape), -1)  # [ndim, n] coordinates of vec's entries.
  same = np.ones((idx.shape[1],) * 2, bool)
  for axis, (d, k) in enumerate(zip(shape, blocks)):
    block = idx[axis] // (d // k)
    same &= block[:, None] == block[None, :]
  return same


def _init(family, shape, key=0):
  return jax.jit(lambda k: family.init(k, shape, "p"))(jax.random.key(key))


@pytest.mark.parametrize("cls", [Hadamard, Kronecker], ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape,blocks", BLOCKED, ids=str)
def test_blocked_rotation_is_orthogonal_block_diagonal_and_matches_numpy(cls, shape, blocks):
  rot = _init(cls(blocks=blocks), shape, key=sum(shape))
  q = dense_q(rot, shape)
  n = q.shape[0]
  np.testing.assert_allclose(q.T @ q, np.eye(n), atol=2e-6)
  np.testing.assert_allclose(q, explicit_matrix(rot, shape), atol=2e-6)
  same = _same_block(shape, blocks)
  assert np.all(q[~same] == 0), "Q mixes coordinates of different blocks"
  block_lengths = [d // k for d, k in zip(shape, blocks)]
  # Every coordinate of a block mixes with every other (any block length for both families).
  assert np.all(q[same] != 0), "Q is sparse within a block"
  if cls is Hadamard and all(H.is_power_of_two(b) for b in block_lengths):
    # |Q_rc| = 1/sqrt(block size).
    np.testing.assert_allclose(np.abs(q[same]), 1 / math.sqrt(math.prod(block_lengths)),
                               rtol=1e-6)
  # Blocks are independent draws, not one matrix repeated.
  counts = rot.block_counts()
  blocked = [np.asarray(x) for x, axis in zip(jax.tree.leaves(rot),
                                                jax.tree.leaves(rot.leaf_axes()))
             if counts[axis] > 1]
  assert blocked and all(any(not np.array_equal(x[j], x[0]) for j in range(1, len(x)))
                         for x in blocked)


def test_no_blocks_is_the_unblocked_rotation_bit_for_bit():
  # Pinned signs (key 11, shape (3, 4)); the length-3 axis also draws a 3 x 3 mix R.
  rot = _init(Hadamard(), (3, 4), key=11)
  assert [np.asarray(s).tolist() for s in rot.signs] == [[-1, -1, 1], [1, -1, 1, 1]]
  assert rot.perms == () and rot.inv_perms == () and [r.shape for r in rot.mixes] == [(3, 3)]

  @jax.jit
  def draws(key):
    rots = [cls(blocks=b).init(key, (6, 20)) for cls in (Hadamard, Kronecker) for b in ((), (1, 1))]
    keys = jax.random.split(key, 2)  # Kronecker's per-axis keys.
    return rots, [R.haar_orthogonal(keys[0], 6), R.haar_orthogonal(keys[1], 20)]

  (hadamard, hadamard_11, kronecker, kronecker_11), haar = draws(jax.random.key(5))
  for got, want in ((hadamard_11, hadamard), (kronecker_11, kronecker),
                    (kronecker, R.KroneckerRotation(tuple(haar)))):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_counts_are_in_the_state_shapes_and_a_checkpoint_refuses_another(tmp_path):
  import orbax.checkpoint as ocp

  shapes = lambda fam: [x.shape for x in jax.tree.leaves(
      jax.eval_shape(lambda: fam.init(jax.random.key(0), (8, 12))))]
  assert shapes(Hadamard()) == [(8,), (12,), (3, 3)]  # Signs, signs, R of 12 = 3 * 4.
  assert shapes(Hadamard(blocks=(4, 1))) == [(4, 2), (12,), (3, 3)]
  assert shapes(Hadamard(blocks=(2, 2))) == [(2, 4), (2, 6), (2, 3, 3)]
  assert shapes(Kronecker(blocks=(4, 3))) == [(4, 2, 2), (3, 4, 4)]
  params = {"w": jnp.zeros((8, 12))}
  state = jax.jit(orthoadam(1e-3, rotation=Hadamard(blocks=(4,))).init)(params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    for other in (Hadamard(blocks=(2,)), Hadamard()):
      target = jax.eval_shape(orthoadam(1e-3, rotation=other).init, params)
      with pytest.raises(ValueError, match="shape"):
        ckpt.restore(tmp_path / "opt", target)


def test_block_counts_that_do_not_divide_are_refused_with_the_fix():
  with pytest.raises(ValueError, match=r"blocks.0.w .*blocks\[0\]=5 .*axis 0 of length 8.*"
                                       r"\[1, 2, 4, 8\].*shard_local_rotation"):
    Hadamard(blocks=(5, 1)).init(jax.random.key(0), (8, 12), "blocks.0.w")
  with pytest.raises(ValueError, match=r"'kronecker' for parameter w .*blocks\[1\]=5"):
    orthoadam(1e-3, rotation=Kronecker(blocks=(1, 5))).init({"w": jnp.zeros((8, 12))})
  with pytest.raises(ValueError, match=r"3 block counts for 2 axes"):
    Hadamard(blocks=(2, 2, 2)).init(jax.random.key(0), (8, 12), "w")
  with pytest.raises(ValueError, match=r"blocks=\(0,\); expected a tuple of positive"):
    Hadamard(blocks=(0,))
  assert Kronecker(blocks=[4, np.int64(1)]).blocks == (4, 1)  # Hashable, plain ints.
  with pytest.raises(ValueError, match="max_dim=4"):  # The limit applies to the block length.
    Kronecker(max_dim=4, blocks=(1,)).init(jax.random.key(0), (8,))
  Kronecker(max_dim=4, blocks=(2,)).init(jax.random.key(0), (8,))


# ----------------------------------------------------------------------------- on a mesh

SPECS = {  # name: (shape, spec, shard count per axis)
    "w": ((16, 24), P("fsdp", None), (4, 1)),
    "u": ((12, 32), P(None, ("data", "fsdp")), (1, 8)),
    "m": ((8, 16), P("data", "fsdp"), (2, 4)),
    "b": ((24,), P("fsdp"), (4,)),
}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
  return jax.make_mesh((2, 4), ("data", "fsdp"))


def _abstract(specs, scale=1):
  return {k: jax.ShapeDtypeStruct(tuple(d * scale for d in s), jnp.float32)
          for k, (s, _, _) in specs.items()}


def _shardings(mesh, specs):
  return {k: NamedSharding(mesh, spec) for k, (_, spec, _) in specs.items()}


def test_shard_local_rotation_takes_blocks_from_the_partition_specs(mesh):
  specs = dict(SPECS, odd=((6, 8), P("fsdp", "data"), (1, 2)), s=((), P(), ()))
  abstract, shardings = _abstract(specs), _shardings(mesh, specs)
  abstract["one"] = jax.ShapeDtypeStruct((8, 4), jnp.float32)
  shardings["one"] = SingleDeviceSharding(jax.devices()[0])
  policy = shard_local_rotation(Hadamard(blocks=(2, 2)), abstract, shardings)
  assert {k: f.blocks for k, f in policy.items()} == dict(
      {k: c for k, (_, _, c) in specs.items()}, one=(1, 1))
  assert all(isinstance(f, Hadamard) for f in policy.values())

  # A callable policy: families without per-axis blocks pass through unchanged.
  fams = {"w": "kronecker", "u": Dense(max_size=4096), "m": Block(size=4), "b": "identity",
          "odd": Kronecker(max_dim=64, blocks=(3, 1)), "s": "hadamard", "one": "kronecker"}
  policy = shard_local_rotation(lambda path, shape: fams[path], abstract, shardings)
  assert policy["w"] == Kronecker(blocks=(4, 1)) and policy["odd"] == Kronecker(64, (1, 2))
  assert policy["u"] == Dense(max_size=4096) and policy["m"] == Block(size=4)
  assert policy["b"] == R.Identity() and policy["s"] == Hadamard(blocks=())
  state = jax.eval_shape(orthoadam(1e-3, rotation=policy).init, abstract)
  assert state[0].rotations["w"].factors[0].shape == (4, 4, 4)


def test_blocked_rotation_states_are_sharded_with_their_blocks(mesh):
  abstract, shardings = _abstract(SPECS), _shardings(mesh, SPECS)
  for family in ("hadamard", "kronecker"):
    tx = orthoadam(1e-3, rotation=shard_local_rotation(family, abstract, shardings))
    rots = optimizer_state_shardings(tx, abstract, shardings)[0].rotations
    specs = {k: [s.spec for s in jax.tree.leaves(r)] for k, r in rots.items()}
    if family == "kronecker":  # [k_i, b_i, b_i]: block axis like the param's axis i.
      assert specs == {"w": [P("fsdp", None, None), P(None, None)],
                       "u": [P(None, None), P(("data", "fsdp"), None, None)],
                       "m": [P("data", None, None), P("fsdp", None, None)],
                       "b": [P("fsdp", None, None)]}
    else:  # Blocked [k_i, b_i] signs, [k_i, m_i, m_i] mixes likewise; unblocked ones replicated.
      assert specs == {"w": [P("fsdp", None), P(), P()],
                       "u": [P(), P(("data", "fsdp"), None), P()],
                       "m": [P("data", None), P("fsdp", None)],
                       "b": [P("fsdp", None), P("fsdp", None, None)]}


def _numpy_adamw_in_basis(qs, params, grads, lr, b1, b2, eps, wd, max_norm):
  """Clipped Algorithm 1 in float64: g~ = Q g, Adam moments, u = Q^T m_hat/(sqrt(v_hat)+eps)."""
  p = {k: np.asarray(v, np.float64).reshape(-1) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for t, g in enumerate(grads, start=1):
    norm = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in g.values()))
    scale = 1.0 if norm < max_norm else max_norm / norm
    for k in p:
      g_rot = qs[k] @ (np.asarray(g[k], np.float64).reshape(-1) * scale)
      m[k] = b1 * m[k] + (1 - b1) * g_rot
      v[k] = b2 * v[k] + (1 - b2) * g_rot**2
      u = qs[k].T @ ((m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps))
      p[k] = p[k] - lr * (u + wd * p[k])
    history.append({k: x.reshape(params[k].shape) for k, x in p.items()})
  return history


def test_shard_local_orthoadam_sharded_equals_one_device_and_numpy(mesh):
  abstract, shardings = _abstract(SPECS), _shardings(mesh, SPECS)
  # Kronecker on the parameter blocked on both axes, Hadamard elsewhere: one compile for both.
  policy = shard_local_rotation(lambda path, shape: "kronecker" if path == "m" else "hadamard",
                                abstract, shardings)
  lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   orthoadam(lr, b1, b2, eps, weight_decay=wd, rotation=policy, seed=2))
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for k, a in abstract.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(a.shape) * rng.uniform(0.1, 2.0), jnp.float32)
            for k, a in abstract.items()} for _ in range(3)]
  state_shardings = optimizer_state_shardings(tx, abstract, shardings)

  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  sharded_step = jax.jit(step, in_shardings=(shardings, state_shardings, shardings),
                         out_shardings=(shardings, state_shardings))
  one_step, op, os_ = jax.jit(step), params, jax.jit(tx.init)(params)
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves((op, os_)))
  sp, ss = jax.device_put(params, shardings), jax.device_put(os_, state_shardings)
  sharded, one = [], []
  for g in grads:
    sp, ss = sharded_step(jax.device_put(g, shardings), ss, sp)
    op, os_ = one_step(g, os_, op)
    sharded.append(sp)
    one.append(op)
  assert all(sp[k].sharding.is_equivalent_to(shardings[k], sp[k].ndim) for k in SPECS)

  rots = [x for x in jax.tree.leaves(os_, is_leaf=lambda x: isinstance(x, ScaleByOrthoAdamState))
          if isinstance(x, ScaleByOrthoAdamState)][0].rotations
  assert isinstance(rots["m"], R.KroneckerRotation) and rots["m"].factors[1].shape == (4, 4, 4)
  assert isinstance(rots["b"], R.HadamardRotation) and rots["b"].mixes[0].shape == (4, 3, 3)
  # Q from the state arrays by numpy alone (checked above against rotating the identity basis).
  qs = {k: explicit_matrix(rots[k], a.shape) for k, a in abstract.items()}
  want = _numpy_adamw_in_basis(qs, params, grads, lr, b1, b2, eps, wd, max_norm=1.0)
  for t in range(len(grads)):
    for k in SPECS:
      np.testing.assert_allclose(np.asarray(sharded[t][k]), np.asarray(one[t][k]), atol=1e-6,
                                 rtol=0, err_msg=f"sharded vs one device, step {t + 1}, {k}")
      np.testing.assert_allclose(np.asarray(one[t][k], np.float64), want[t][k], atol=1e-5,
                                 rtol=0, err_msg=f"vs float64 numpy, step {t + 1}, {k}")


# ----------------------------------------------------------------------------- communication

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\([^)]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """``{op: (count, result bytes)}`` of the collective ops in an HLO module's text."""
  out: dict[str, tuple[int, int]] = {}
  for match in _COLLECTIVE.finditer(hlo):
    size = sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", match["type"]))
    count, total = out.get(match["op"], (0, 0))
    out[match["op"]] = (count + 1, total + size)
  return out


def test_collectives_parser_on_known_lines():
  hlo = ("%a = f32[8,768]{1,0} all-gather(%x), dimensions={0}\n"
         "%b = (f32[], bf16[4]{0}) all-reduce(%y, %z), to_apply=%add\n"
         "%c = f32[3]{0} collective-permute-start(%w)\n%d = f32[3]{0} collective-permute-done(%c)\n"
         "%e = f32[2]{0} add(%all-gather, %b)\n")
  assert collectives(hlo) == {"all-gather": (1, 8 * 768 * 4), "all-reduce": (1, 4 + 8),
                              "collective-permute": (1, 12)}


_MOVES_DATA = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _compiled_collectives(inner, abstract, shardings) -> dict[str, tuple[int, int]]:
  """Collectives of ``chain(clip_by_global_norm, inner).update``, compiled for the shardings."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  state = jax.eval_shape(tx.init, abstract)
  state_shardings = optimizer_state_shardings(tx, abstract, shardings)
  update = jax.jit(tx.update, in_shardings=(shardings, state_shardings, shardings),
                   out_shardings=(shardings, state_shardings))
  return collectives(update.lower(abstract, state, abstract).compile().as_text())


@pytest.fixture(scope="module")
def large(mesh):
  """Params 4x larger on each axis than SPECS (same specs), and AdamW's collectives for them."""
  abstract, shardings = _abstract(SPECS, scale=4), _shardings(mesh, SPECS)
  adamw = _compiled_collectives(optax.adamw(1e-3, weight_decay=0.1), abstract, shardings)
  return abstract, shardings, adamw


def test_shard_local_orthoadam_moves_no_parameter_data(large):
  abstract, shardings, adamw = large
  families = ("hadamard", "kronecker")
  local = {f: _compiled_collectives(
      orthoadam(1e-3, weight_decay=0.1, rotation=shard_local_rotation(f, abstract, shardings)),
      abstract, shardings) for f in families}
  global_ = _compiled_collectives(orthoadam(1e-3, weight_decay=0.1, rotation="hadamard"),
                                  abstract, shardings)
  print({"adamw": adamw, "global hadamard": global_, **{f"local {k}": v for k, v in local.items()}})
  total = lambda c: sum(b for _, b in c.values())
  assert not any(op in adamw for op in _MOVES_DATA) and 0 < total(adamw) <= 64  # Norm scalars.
  for family, found in local.items():
    assert not any(op in found for op in _MOVES_DATA), (family, found)
    assert total(found) <= 1.1 * total(adamw), (family, found, adamw)
  # The global rotation mixes across shards: XLA gathers parameter-sized data.
  smallest_shard = min(math.prod(a.shape) for a in abstract.values()) * 4 // 8
  assert global_.get("all-gather", (0, 0))[1] >= smallest_shard, global_
  assert total(global_) > 10 * total(adamw)
