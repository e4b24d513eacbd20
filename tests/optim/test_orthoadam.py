"""OrthoAdam against an independent float64 numpy Algorithm 1, optax.adamw, and optax wrappers."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softmax_one_jax.optim import (
    Block,
    ScaleByOrthoAdamState,
    orthoadam,
    param_key,
    scale_by_orthoadam,
)
from softmax_one_jax.optim import rotations as R
from softmax_one_jax.runtime import apply_cpu_workarounds
from tests.optim.test_rotations import explicit_matrix

SHAPES = {"w": (4, 6), "b": (5,), "g": (), "t": (3, 2, 5)}


def _params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _grads(num_steps, seed=1):
  rng = np.random.default_rng(seed)
  return [{k: rng.standard_normal(s) * rng.uniform(0.1, 3.0) for k, s in SHAPES.items()}
          for _ in range(num_steps)]


def numpy_orthoadam(qs, params, grads, lrs, b1s, b2s, eps, weight_decay):
  """Algorithm 1 of Kaul et al. in float64 numpy, AdamW-style decoupled decay, per-step hparams."""
  p = {k: np.asarray(v, np.float64).reshape(-1) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for t, g in enumerate(grads, start=1):
    lr, b1, b2 = lrs[t - 1], b1s[t - 1], b2s[t - 1]
    for k in p:
      g_rot = qs[k] @ np.asarray(g[k], np.float64).reshape(-1)
      m[k] = b1 * m[k] + (1 - b1) * g_rot
      v[k] = b2 * v[k] + (1 - b2) * g_rot**2
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      u = qs[k].T @ (m_hat / (np.sqrt(v_hat) + eps))
      p[k] = p[k] - lr * (u + weight_decay * p[k])
    history.append({k: x.reshape(SHAPES[k]).copy() for k, x in p.items()})
  return history


def _run(tx, params, grads, hparam_edits=None):
  state = jax.jit(tx.init)(params)
  step = jax.jit(lambda g, s, p: _apply(tx, g, s, p))
  history = []
  for t, g in enumerate(grads):
    if hparam_edits and t in hparam_edits:
      state = hparam_edits[t](state)
    params, state = step(jax.tree.map(lambda x, p: jnp.asarray(x, p.dtype), g, params), state,
                         params)
    history.append(params)
  return history, state, step


def _apply(tx, g, s, p):
  u, s = tx.update(g, s, p)
  return optax.apply_updates(p, u), s


def _orthoadam_state(state) -> ScaleByOrthoAdamState:
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByOrthoAdamState))
           if isinstance(x, ScaleByOrthoAdamState)]
  assert len(found) == 1
  return found[0]


def _qs(state):
  rots = _orthoadam_state(state).rotations
  return {k: explicit_matrix(rots[k], SHAPES[k]) for k in SHAPES}


def _assert_history_close(got, want, atol):
  for t, (a, b) in enumerate(zip(got, want)):
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], atol=atol, rtol=0,
                                 err_msg=f"step {t + 1}, param {k}")


FAMILIES = ["dense", "kronecker", Block(size=4), "hadamard", "identity"]


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_matches_float64_numpy_algorithm_1_over_many_steps(family):
  params, grads = _params(), _grads(40)
  lr, wd = 1e-2, 0.1
  tx = orthoadam(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=wd, rotation=family, seed=3)
  got, state, _ = _run(tx, params, grads)
  want = numpy_orthoadam(_qs(state), params, grads, [lr] * 40, [0.9] * 40, [0.99] * 40, 1e-8, wd)
  # float32 vs float64 over 40 steps of size ~lr: errors ~1e-6 per step, far below lr.
  _assert_history_close(got, want, atol=2e-5)


def test_dense_updates_are_not_adamw():
  # The rotation matters: the same run with "identity" differs by O(lr).
  params, grads = _params(), _grads(3)
  a, _, _ = _run(orthoadam(1e-2, rotation="dense"), params, grads)
  b, _, _ = _run(orthoadam(1e-2, rotation="identity"), params, grads)
  assert np.abs(np.asarray(a[-1]["w"]) - np.asarray(b[-1]["w"])).max() > 1e-3


def test_identity_equals_optax_adamw():
  params, grads = _params(), _grads(25)
  kw = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05)
  got, _, _ = _run(orthoadam(3e-3, rotation="identity", **kw), params, grads)
  want, _, _ = _run(optax.adamw(3e-3, **kw), params, grads)
  for a, b in zip(got, want):
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-7)


def test_rotations_fixed_count_increments_and_no_recompilation():
  params, grads = _params(), _grads(4)
  tx = orthoadam(1e-3)
  init_state = jax.jit(tx.init)(params)
  _, state, step = _run(tx, params, grads)
  assert step._cache_size() == 1
  s0, s1 = _orthoadam_state(init_state), _orthoadam_state(state)
  assert int(s1.count) == 4
  for a, b in zip(jax.tree.leaves(s0.rotations), jax.tree.leaves(s1.rotations)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rotations_deterministic_from_seed_and_path():
  params = _params()
  init = jax.jit(lambda p, seed: orthoadam(1e-3, seed=seed).init(p))  # seed may be an array.
  a = _orthoadam_state(init(params, 5)).rotations
  b = _orthoadam_state(init(params, 5)).rotations
  c = _orthoadam_state(init(params, 6)).rotations
  # A parameter's rotation depends only on (seed, path), not on the other parameters.
  d = _orthoadam_state(orthoadam(1e-3, seed=5).init({"w": params["w"]})).rotations
  same = lambda x, y: all(np.array_equal(np.asarray(u), np.asarray(v))
                          for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert same(a, b) and same(a["w"], d["w"])
  assert a["t"].mixes and not same(a["t"], c["t"])


@pytest.mark.parametrize("family", ["hadamard", "kronecker", "dense"])
def test_each_parameter_gets_its_own_rotation_from_its_path(family):
  # One Q per parameter, drawn from fold_in(key(seed), crc32(path)): parameters of one shape (one
  # vmapped draw) get different matrices, each the one its family draws from its own key.
  shape = (4, 6)
  params = {"a": jnp.zeros(shape), "b": jnp.zeros(shape), "c": jnp.zeros((3, 8))}
  rots = _orthoadam_state(jax.jit(orthoadam(1e-3, rotation=family, seed=4).init)(params)).rotations
  fam = R.get_family(family)
  for k, p in params.items():
    want = jax.jit(lambda key, shape=p.shape: fam.init(key, shape))(param_key(4, k))
    for x, y in zip(jax.tree.leaves(rots[k]), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
  q_a, q_b = (explicit_matrix(rots[k], shape) for k in "ab")
  assert np.abs(q_a - q_b).max() > 0.1


def test_rotation_policies_callable_and_pytree():
  params = _params()
  policy = lambda path, shape: "dense" if math.prod(shape) <= 24 else "kronecker"
  rots = _orthoadam_state(jax.jit(orthoadam(1e-3, rotation=policy).init)(params)).rotations
  assert isinstance(rots["w"], R.DenseRotation) and isinstance(rots["t"], R.KroneckerRotation)
  tree = {"w": "hadamard", "b": Block(size=2), "g": "identity", "t": "dense"}
  rots = _orthoadam_state(jax.jit(orthoadam(1e-3, rotation=tree).init)(params)).rotations
  assert isinstance(rots["w"], R.HadamardRotation) and isinstance(rots["b"], R.BlockRotation)
  assert isinstance(rots["g"], R.IdentityRotation) and isinstance(rots["t"], R.DenseRotation)
  with pytest.raises(ValueError, match="no entry for parameter 'b'"):
    orthoadam(1e-3, rotation={"w": "dense"}).init(params)
  with pytest.raises(ValueError, match="unknown rotation"):
    orthoadam(1e-3, rotation="haar")


def test_inject_hyperparams_matches_numpy_with_changing_hyperparameters():
  params, grads = _params(), _grads(6)
  tx = optax.inject_hyperparams(orthoadam, static_args=("seed",))(
      learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-8, rotation="hadamard", seed=1)

  def edit(state):
    new = dict(learning_rate=5e-3, b1=0.7, b2=0.9, eps=1e-7)
    hp = {k: jnp.asarray(new.get(k, x), x.dtype) for k, x in state.hyperparams.items()}
    return state._replace(hyperparams=hp)

  got, state, step = _run(tx, params, grads, hparam_edits={3: edit})
  assert step._cache_size() == 1
  # Changing eps mid-run and per-step bias correction with the current b: optax's semantics.
  qs = _qs(state)
  p = {k: np.asarray(v, np.float64).reshape(-1) for k, v in params.items()}
  m = {k: np.zeros_like(x) for k, x in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads, start=1):
    lr, b1, b2, eps = (1e-2, 0.9, 0.99, 1e-8) if t <= 3 else (5e-3, 0.7, 0.9, 1e-7)
    for k in p:
      g_rot = qs[k] @ g[k].reshape(-1)
      m[k] = b1 * m[k] + (1 - b1) * g_rot
      v[k] = b2 * v[k] + (1 - b2) * g_rot**2
      u = qs[k].T @ ((m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps))
      p[k] = p[k] - lr * u
    for k in p:
      np.testing.assert_allclose(np.asarray(got[t - 1][k], np.float64).reshape(-1), p[k],
                                 atol=1e-5, rtol=0, err_msg=f"step {t} {k}")


def test_multisteps_accumulates_then_applies_the_mean_gradient():
  params, grads = _params(), _grads(4)
  inner = orthoadam(1e-2, rotation="kronecker")
  got, _, _ = _run(optax.MultiSteps(inner, every_k_schedule=2), params, grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
  want, _, _ = _run(inner, params, means)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[0][k]), np.asarray(params[k]))  # Mini-step.
    np.testing.assert_allclose(np.asarray(got[1][k]), np.asarray(want[0][k]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got[3][k]), np.asarray(want[1][k]), atol=1e-6)


def test_masked_and_partition_use_the_same_rotation_as_alone():
  params, grads = _params(), _grads(3)
  sub = {"w": params["w"], "t": params["t"]}
  sub_grads = [{"w": g["w"], "t": g["t"]} for g in grads]
  alone, _, _ = _run(orthoadam(1e-2), sub, sub_grads)
  mask = {"w": True, "b": False, "g": False, "t": True}
  masked = optax.chain(optax.masked(orthoadam(1e-2), mask),
                       optax.masked(optax.sgd(1e-2), jax.tree.map(lambda x: not x, mask)))
  got_m, _, _ = _run(masked, params, grads)
  labels = {"w": "o", "b": "a", "g": "a", "t": "o"}
  part = optax.partition({"o": orthoadam(1e-2), "a": optax.adamw(1e-2)}, labels)
  got_p, _, _ = _run(part, params, grads)
  for k in ("w", "t"):
    np.testing.assert_allclose(np.asarray(got_m[-1][k]), np.asarray(alone[-1][k]), atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_p[-1][k]), np.asarray(alone[-1][k]), atol=1e-7)
  sgd_b = np.asarray(params["b"]) - 1e-2 * sum(g["b"] for g in grads)
  np.testing.assert_allclose(np.asarray(got_m[-1]["b"]), sgd_b, atol=1e-6)


def test_clip_and_apply_if_finite_in_a_chain():
  params, grads = _params(), _grads(3)
  grads[1] = dict(grads[1], w=np.full(SHAPES["w"], np.inf))
  tx = optax.apply_if_finite(
      optax.chain(optax.clip_by_global_norm(0.5), orthoadam(1e-2, rotation="dense")), 3)
  got, _, _ = _run(tx, params, grads)
  for k in SHAPES:  # The non-finite step is skipped.
    np.testing.assert_array_equal(np.asarray(got[1][k]), np.asarray(got[0][k]))
  # Otherwise: Algorithm 1 on clipped gradients (numpy clipping, steps 1 and 3 only).
  clipped = []
  for g in (grads[0], grads[2]):
    norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
    clipped.append({k: x * min(1.0, 0.5 / norm) for k, x in g.items()})
  _, state, _ = _run(orthoadam(1e-2, rotation="dense"), params, grads[:1])
  want = numpy_orthoadam(_qs(state), params, clipped, [1e-2] * 2, [0.9] * 2, [0.999] * 2, 1e-8, 0)
  _assert_history_close([got[0], got[2]], want, atol=1e-5)


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_bfloat16_parameters(mu_dtype):
  params, grads = _params(dtype=jnp.bfloat16), _grads(5)
  lr = 1e-2
  tx = orthoadam(lr, rotation="hadamard", mu_dtype=mu_dtype)

  @jax.jit
  def step(g, s, p):
    u, s = tx.update(g, s, p)
    return u, s, optax.apply_updates(p, u)

  state, p, updates, history = jax.jit(tx.init)(params), params, [], []
  for g in grads:
    u, state, p = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g), state, p)
    updates.append(u)
    history.append(p)
  s = _orthoadam_state(state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((updates, history)))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((s.mu, s.nu)))
  # The updates against float64 Algorithm 1 on the same (bf16-rounded) inputs, step by step (with
  # no weight decay the updates do not depend on the parameters). Each step stores m and v in bf16
  # (unit roundoff 2^-9) and casts the update to bf16 once: after t steps, at most (t + 1) 2^-9
  # relative error per rotated coordinate, x4 for cancellation in m, and Q keeps the L2 norm:
  # |u - u_ref| <= (t + 1) 2^-7 |u_ref| (measured: <= 0.008 for t <= 5). Zero updates or no bias
  # correction are off by >= 1 |u_ref|.
  params64 = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32), np.float64), params)
  grads64 = [jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32),
                                               np.float64), g) for g in grads]
  want = numpy_orthoadam(_qs(state), params64, grads64, [lr] * 5, [0.9] * 5, [0.999] * 5,
                         1e-8, 0.0)
  previous = params64
  for t, (u, p_t, want_t) in enumerate(zip(updates, history, want), start=1):
    for k in SHAPES:
      u_ref = want_t[k] - previous[k]  # -lr * u_ref of Algorithm 1, in float64.
      err = np.linalg.norm(np.asarray(u[k].astype(jnp.float32), np.float64) - u_ref)
      assert err <= (t + 1) * 2**-7 * np.linalg.norm(u_ref), (t, k, err / np.linalg.norm(u_ref))
      # The bf16 parameter is the bf16 rounding of p + u, exactly (optax.apply_updates).
      p_prev = (params if t == 1 else history[t - 2])[k].astype(jnp.float32)
      np.testing.assert_array_equal(np.asarray(p_t[k]),
                                    np.asarray((p_prev + u[k].astype(jnp.float32)).astype(
                                        jnp.bfloat16)))
    previous = want_t


def test_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp

  params, grads = _params(), _grads(3)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   orthoadam(1e-2, rotation={"w": "hadamard", "b": "dense", "g": "identity",
                                             "t": Block(size=4)}))
  _, state, step = _run(tx, params, grads[:2])
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", jax.eval_shape(lambda: state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  g = jax.tree.map(jnp.asarray, grads[2])
  p1, _ = step(g, state, params)
  p2, _ = step(g, restored, params)
  for k in SHAPES:
    np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p2[k]))


def test_scale_by_orthoadam_alone_has_unit_scale_updates():
  params = _params()
  tx = scale_by_orthoadam(rotation="hadamard")
  g = jax.tree.map(jnp.asarray, _grads(1)[0])
  u, _ = jax.jit(tx.update)(g, jax.jit(tx.init)(params))
  # First step: m_hat / sqrt(v_hat) = sign(g~) elementwise, so |u| has norm sqrt(n).
  for k, s in SHAPES.items():
    np.testing.assert_allclose(float(jnp.linalg.norm(u[k])), math.sqrt(math.prod(s)), rtol=1e-5)


_HAAR_INIT_SCRIPT = """
import jax, jax.numpy as jnp
from softmax_one_jax.optim import Block, orthoadam
params = {"a": jnp.zeros((128, 128)), "b": jnp.zeros((512, 128)), "c": jnp.zeros((256, 128))}
jax.block_until_ready(jax.jit(orthoadam(1e-3, rotation=Block(size=64)).init)(params))
print("done")
"""


def test_haar_inits_of_several_shapes_finish_under_the_cpu_workaround():
  # Three Block groups in one jit parked every thread of jax 0.10's CPU runtime (4 of 4 tries);
  # runtime.apply_cpu_workarounds (applied by `softmax-one train` for Haar families, the optimizer
  # bench and conftest) avoids it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  apply_cpu_workarounds(["block"], env)
  out = subprocess.run([sys.executable, "-c", _HAAR_INIT_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=240)
  assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
