"""OrthoAdam on a mesh: the same Q everywhere, each axis rotated where it is whole.

The optimizer on an 8-device CPU mesh against itself on one device and against a float64 numpy
Algorithm 1 with the same Q; the layouts (``optim/layout.py``) as plans; communication by reading
the collectives of the update compiled for a TPU v5e slice (XLA:CPU's partitioner lowers some
reshards to all-gathers, so only the TPU program says what a pod moves).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from softmax_one_jax.optim import (ScaleByOrthoAdamState, mixing_plan, reset_moments,
                                   optimizer_state_shardings, orthoadam)
from softmax_one_jax.optim import rotations as R
from softmax_one_jax.optim.layout import matrix_view
from softmax_one_jax.training import hlo
from tests.optim.test_rotations import explicit_matrix

# ----------------------------------------------------------------------------- plans

MESH = {"data": 2, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("shape,spec,steps,moments", [
    # FSDP matrix: axis 1 where it lies, then fsdp moved to axis 1 and axis 0 rotated.
    ((768, 3072), P("fsdp"), [(P("fsdp"), (1,)), (P(None, "fsdp"), (0,))], P(None, "fsdp")),
    # Both axes sharded: each one's mesh axes move onto the other in turn.
    ((768, 3072), P("fsdp", "tensor"),
     [(P(None, ("tensor", "fsdp")), (0,)), (P(("tensor", "fsdp")), (1,))], P(("tensor", "fsdp"))),
    # Unsharded: one step, in place.
    ((64, 48), P(), [(P(), (0, 1))], P()),
    # A vector has no other axis: gathered, rotated, sliced back.
    ((3072,), P("fsdp"), [(P(), (0,))], P("fsdp")),
    # fsdp does not divide axis 1 (6): axis 0 is gathered instead; moments keep the param's.
    ((8, 6), P("fsdp"), [(P("fsdp"), (1,)), (P(), (0,))], P("fsdp")),
    # A length-1 axis takes the moved axes only if they divide it (they do not): gathered.
    ((1, 64), P(None, "fsdp"), [(P(None, "fsdp"), (0,)), (P(), (1,))], P(None, "fsdp")),
    # Three or more axes run as the matrix [d_0, d_1 * ... ] (matrix_view): a long minor axis.
    ((512, 8, 3, 64), P("fsdp"), [(P("fsdp"), (1,)), (P(None, "fsdp"), (0,))], P(None, "fsdp")),
    # The merged axis keeps axis 1's mesh axes (its shards are contiguous ranges of it).
    ((512, 8, 3, 64), P("fsdp", "tensor"),
     [(P(None, ("tensor", "fsdp")), (0,)), (P(("tensor", "fsdp")), (1,))], P(("tensor", "fsdp"))),
], ids=["fsdp", "fsdp-tensor", "unsharded", "vector", "indivisible", "length-1", "qkv",
        "qkv-tensor"])
def test_mixing_plan_rotates_every_axis_once_where_it_is_whole(shape, spec, steps, moments):
  plan = mixing_plan(shape, spec, MESH, separable=True)
  assert [(s, tuple(a)) for s, a in plan.steps] == steps
  assert plan.moments == moments
  rotated = sorted(a for _, axes in plan.steps for a in axes)
  assert rotated == list(range(len(matrix_view(shape))))
  for layout, axes in plan.steps:   # Each axis is whole where it is rotated.
    entries = tuple(layout) + (None,) * len(shape)
    assert all(entries[a] is None for a in axes), (layout, axes)


def test_a_rotation_of_the_flattened_parameter_runs_gathered():
  plan = mixing_plan((16, 24), P("fsdp"), MESH, separable=False)
  assert plan.steps == ((P(), None),) and plan.moments == P("fsdp")


# ----------------------------------------------------------------------------- one Q on any mesh

SPECS = {  # name: (shape, spec)
    "w": ((16, 24), P("fsdp", None)),
    "u": ((12, 32), P(None, ("data", "fsdp"))),
    "m": ((8, 16), P("data", "fsdp")),
    "b": ((24,), P("fsdp")),
    "odd": ((8, 6), P("fsdp")),   # fsdp does not divide 6: axis 0 is rotated gathered.
    "qkv": ((8, 2, 3, 4), P("fsdp")),         # moments as the matrix [8, 24]
    "heads": ((8, 4, 3, 2), P("fsdp", "data")),   # the merged axis sharded like axis 1
}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
  # Auto axes, as the trainer's mesh: the compiler partitions, OrthoAdam's layouts steer it.
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _abstract(specs, scale=1):
  return {k: jax.ShapeDtypeStruct(tuple(d * scale for d in s), jnp.float32)
          for k, (s, _) in specs.items()}


def _shardings(mesh, specs):
  return {k: NamedSharding(mesh, spec) for k, (_, spec) in specs.items()}


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


def _orthoadam_state(state):
  return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByOrthoAdamState))
          if isinstance(x, ScaleByOrthoAdamState)][0]


def test_sharded_orthoadam_equals_one_device_and_numpy_with_the_same_q(mesh):
  abstract, shardings = _abstract(SPECS), _shardings(mesh, SPECS)
  rotation = lambda path, shape: "kronecker" if path == "m" else "hadamard"  # noqa: E731
  lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
  make = lambda **kw: optax.chain(  # noqa: E731
      optax.clip_by_global_norm(1.0),
      orthoadam(lr, b1, b2, eps, weight_decay=wd, rotation=rotation, seed=2, **kw))
  tx, one_tx = make(shardings=shardings), make()
  rng = np.random.default_rng()
  params = {k: jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for k, a in abstract.items()}
  grads = [{k: jnp.asarray(rng.standard_normal(a.shape) * rng.uniform(0.1, 2.0), jnp.float32)
            for k, a in abstract.items()} for _ in range(3)]
  state_shardings = optimizer_state_shardings(tx, abstract, shardings)
  moments = _orthoadam_state(state_shardings).mu
  assert moments["w"].spec == P(None, "fsdp") and moments["odd"].spec == P("fsdp")
  assert moments["qkv"].spec == P(None, "fsdp") and moments["heads"].spec == P(("data", "fsdp"))

  def step(tx):
    def run(g, s, p):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s
    return run

  sharded_step = jax.jit(step(tx), in_shardings=(shardings, state_shardings, shardings),
                         out_shardings=(shardings, state_shardings))
  one_step, op, os_ = jax.jit(step(one_tx)), params, jax.jit(one_tx.init)(params)
  sp = jax.device_put(params, shardings)
  ss = jax.jit(tx.init, out_shardings=state_shardings)(sp)
  # The same Q, drawn on the mesh and on one device.
  for a, b in zip(jax.tree.leaves(_orthoadam_state(ss).rotations),
                  jax.tree.leaves(_orthoadam_state(os_).rotations)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sharded, one = [], []
  for g in grads:
    sp, ss = sharded_step(jax.device_put(g, shardings), ss, sp)
    op, os_ = one_step(g, os_, op)
    sharded.append(sp)
    one.append(op)
  assert all(sp[k].sharding.is_equivalent_to(shardings[k], sp[k].ndim) for k in SPECS)

  rots = _orthoadam_state(os_).rotations
  assert isinstance(rots["m"], R.KroneckerRotation)
  qs = {k: explicit_matrix(rots[k], a.shape) for k, a in abstract.items()}
  # Every coordinate mixes with the whole parameter (no block structure from the mesh).
  assert all(np.count_nonzero(np.abs(q) > 1e-9) == q.size for q in qs.values())
  want = _numpy_adamw_in_basis(qs, params, grads, lr, b1, b2, eps, wd, max_norm=1.0)
  for t in range(len(grads)):
    for k in SPECS:
      np.testing.assert_allclose(np.asarray(sharded[t][k]), np.asarray(one[t][k]), atol=1e-6,
                                 rtol=0, err_msg=f"sharded vs one device, step {t + 1}, {k}")
      np.testing.assert_allclose(np.asarray(one[t][k], np.float64), want[t][k], atol=1e-5,
                                 rtol=0, err_msg=f"vs float64 numpy, step {t + 1}, {k}")


# ----------------------------------------------------------------------------- communication


@pytest.fixture(scope="module")
def tpu_mesh():
  """A 4-chip v5e mesh of compile-only devices (libtpu, from the tpu-aot extra)."""
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  except Exception as e:  # noqa: BLE001  (no libtpu: say so)
    pytest.skip(f"no TPU compiler here ({type(e).__name__}: {e}); pip install -e '.[tpu-aot]'")
  return Mesh(np.array(devices).reshape(4), ("fsdp",))


LARGE = {  # GPT-2-like: an MLP matrix, an embedding whose vocab axis is odd-part 393, a gain.
    "mlp": ((768, 3072), P("fsdp", None)),
    "embed": ((50304, 768), P(None, "fsdp")),
    "gain": ((768,), P("fsdp")),
}


def _update_collectives(inner, abstract, shardings) -> dict[str, hlo.CollectiveStats]:
  tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
  state_shardings = optimizer_state_shardings(tx, abstract, shardings)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(tx.init, abstract), state_shardings)
  args = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[k])
          for k, a in abstract.items()}
  update = jax.jit(tx.update, out_shardings=(shardings, state_shardings))
  return hlo.collective_stats(update.lower(args, state, args).compile().as_text())


def test_the_update_moves_about_a_shard_per_matrix_not_the_parameter(tpu_mesh):
  abstract, shardings = _abstract(LARGE), _shardings(tpu_mesh, LARGE)
  planned = _update_collectives(orthoadam(1e-3, shardings=shardings), abstract, shardings)
  placed = _update_collectives(orthoadam(1e-3), abstract, shardings)
  adamw = _update_collectives(optax.adamw(1e-3), abstract, shardings)
  shard_bytes = sum(math.prod(a.shape) * 4 for a in abstract.values()) // 4
  total = lambda stats: sum(s.bytes for s in stats.values())  # noqa: E731
  print({"planned": planned, "compiler-placed": placed, "adamw": adamw, "shard": shard_bytes})
  # Two all-to-alls per matrix (the gradient to its moments' layout, the update back), nothing
  # gathered but the gain's 3 KiB.
  assert planned["all-gather"].bytes <= 768 * 4, planned
  assert planned["all-to-all"].count == 4, planned
  assert total(planned) <= 2.05 * shard_bytes + total(adamw), (planned, adamw)
  # Left to the compiler, the rotation of a sharded axis gathers whole parameters.
  assert placed["all-gather"].bytes >= 4 * shard_bytes, placed


# ----------------------------------------------------------------------------- what Q is keyed on


def test_q_is_keyed_on_the_path_and_a_reshaped_state_is_refused():
  x = jnp.zeros((12, 8))
  def q(params, top):
    rot = _orthoadam_state(orthoadam(1e-3, seed=3).init(params)).rotations[top]["w"]
    return explicit_matrix(rot, x.shape)
  same = q({"blocks": {"w": x}}, "blocks")
  np.testing.assert_array_equal(q({"blocks": {"w": x}, "other": jnp.zeros((4,))}, "blocks"), same)
  renamed = q({"layers": {"w": x}}, "layers")   # A rename draws another Q.
  assert np.abs(renamed - same).max() > 0.1
  tx = orthoadam(1e-3)
  state = tx.init({"w": x})
  with pytest.raises(ValueError, match=r"parameter 'w' was drawn for shape \(12, 8\).*\(8, 12\)"
                                       r".*tx.init\(params\)"):
    tx.update({"w": x.T}, state, {"w": x.T})


# ----------------------------------------------------------------------------- a rotation kept


FAMILY_CASES = [R.Hadamard(), R.Hadamard(blocks=(2,)), R.Kronecker(), R.Dense(), R.Block(size=8)]


@pytest.mark.parametrize("family", FAMILY_CASES, ids=lambda f: repr(f)[:24])
def test_a_zeroed_rotation_is_an_error_naming_the_parameter(family):
  params = {"attn": {"w": jnp.ones((12, 8))}, "scale": jnp.ones((24,))}
  tx = orthoadam(1e-3, rotation=family)
  step = jax.jit(lambda g, s: tx.update(g, s, params)[0])
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                       params)
  state = tx.init(params)
  jax.block_until_ready(step(grads, state))           # An intact state passes.
  zeroed = jax.tree.map(jnp.zeros_like, state)        # The common reset idiom.
  with pytest.raises(Exception, match=r"rotation for parameter\(s\) \['attn.w', 'scale'\] is no "
                                      r"longer orthogonal.*reset_moments"):
    jax.block_until_ready(step(grads, zeroed))
  # Overwriting one parameter's rotation names that parameter only.
  inner = _orthoadam_state(state)
  broken = inner._replace(rotations={**inner.rotations, "scale": jax.tree.map(
      lambda a: a * 2, inner.rotations["scale"])})
  with pytest.raises(Exception, match=r"parameter\(s\) \['scale'\] is no longer"):
    jax.block_until_ready(step(grads, (broken, *state[1:])))


def test_reset_moments_restarts_adam_and_keeps_q():
  params = {"w": jnp.ones((12, 8))}
  tx = orthoadam(1e-2, weight_decay=0.1)
  g1 = {"w": jnp.sin(jnp.arange(96.0)).reshape(12, 8)}
  g2 = {"w": jnp.cos(jnp.arange(96.0)).reshape(12, 8)}
  fresh = tx.init(params)
  _, after = tx.update(g1, fresh, params)
  reset = optax.tree_utils.tree_get(reset_moments(after), "count")
  assert int(reset) == 0
  # From a reset state the next update is a fresh run's first: the same Q, zero moments.
  np.testing.assert_array_equal(tx.update(g2, reset_moments(after), params)[0]["w"],
                                tx.update(g2, fresh, params)[0]["w"])


def test_the_check_reads_values_under_vmap_and_can_be_switched_off():
  params = {"w": jnp.ones((12, 8))}
  grads = {"w": jnp.ones((12, 8))}
  tx = orthoadam(1e-3)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), tx.init(params))
  # Under vmap the cond is a select and the callback runs: intact states raise nothing.
  jax.block_until_ready(jax.vmap(lambda s: tx.update(grads, s, params)[0])(stacked))
  off = orthoadam(1e-3, check_rotations=False)
  zeroed = jax.tree.map(jnp.zeros_like, off.init(params))
  update = jax.jit(lambda s: off.update(grads, s, params)[0])(zeroed)
  np.testing.assert_array_equal(update["w"], 0.0)   # What the check is there to catch.


def test_a_renamed_parameter_is_an_error_naming_both_paths():
  tx = orthoadam(1e-3)
  state = tx.init({"attn": {"w": jnp.ones((4, 3))}})
  renamed = {"attn": {"kernel": jnp.ones((4, 3))}}
  with pytest.raises(ValueError, match=r"no rotation for parameters \['attn.kernel'\].*"
                                       r"\['attn.w'\] instead.*tx.init\(params\)"):
    tx.update(renamed, state, renamed)


@pytest.mark.parametrize("shape", [(4100,), (6, 4), (3,)])
def test_rotation_intact_holds_for_every_family_and_fails_on_each_broken_array(shape):
  for family in (R.Hadamard(), R.Kronecker(), R.Dense(max_size=5000), R.Block(size=4)):
    rot = family.init(jax.random.key(1), shape)
    assert bool(R.rotation_intact(rot)), family
    leaves, treedef = jax.tree.flatten(rot)
    for i in range(len(leaves)):   # Zeroing any single array is caught.
      broken = leaves[:i] + [jnp.zeros_like(leaves[i])] + leaves[i + 1:]
      assert not bool(R.rotation_intact(treedef.unflatten(broken))), (family, i)
