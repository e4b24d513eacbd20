"""Rotation families: each is orthogonal, matches an independent numpy matrix, is deterministic."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from softmax_one_jax.optim import hadamard_rotation as HR
from softmax_one_jax.optim import orthoadam
from softmax_one_jax.optim import hadamard as H
from softmax_one_jax.optim import rotations as R

SHAPES = [(), (5,), (4, 6), (3, 11, 7)]
FAMILIES = ["identity", "dense", "kronecker", R.Block(size=4), "hadamard"]


def _np_hadamard_axis(dim: int) -> np.ndarray:
  """Block-diagonal normalised Hadamard: blocks are the binary digits of dim, largest first (one
  Sylvester block ``H_dim / sqrt(dim)`` for a power of two)."""
  sizes = [1 << b for b in reversed(range(dim.bit_length())) if dim >> b & 1]
  return scipy.linalg.block_diag(*[scipy.linalg.hadamard(s) / math.sqrt(s) for s in sizes])


def explicit_matrix(rot, shape) -> np.ndarray:
  """The float64 [n, n] matrix Q of a rotation state, built with numpy only (row-major vec)."""
  n = math.prod(shape)
  if isinstance(rot, R.IdentityRotation):
    return np.eye(n)
  if isinstance(rot, R.DenseRotation):
    return np.asarray(rot.q_nn, np.float64)
  if isinstance(rot, R.KroneckerRotation):
    # A blocked factor [k, b, b] is the block-diagonal diag(f[0], ..., f[k-1]).
    mats = [scipy.linalg.block_diag(*np.asarray(f, np.float64)) if f.ndim == 3
            else np.asarray(f, np.float64) for f in rot.factors]
    return functools.reduce(np.kron, mats, np.eye(1))
  if isinstance(rot, R.BlockRotation):
    blocks = [np.asarray(b, np.float64) for b in (list(rot.full[0]) if rot.full else [])]
    blocks += [np.asarray(t, np.float64) for t in rot.tail]
    return scipy.linalg.block_diag(*blocks)
  if isinstance(rot, R.HadamardRotation):
    mats = []
    perms, mixes = iter(rot.perms), iter(rot.mixes)
    for signs in rot.signs:
      # Signs [b] (one block) or [k, b] (k blocks of length b, each its own randomized Hadamard).
      signs = np.asarray(signs, np.float64).reshape(-1, np.shape(signs)[-1])
      b = signs.shape[1]
      m = b // (b & -b)  # b = m 2^k, m odd.
      mixed, permuted = 1 < m <= HR.MAX_MIX_DIM, m > HR.MAX_MIX_DIM
      perm = np.asarray(next(perms)).reshape(signs.shape) if permuted else None
      r = np.asarray(next(mixes), np.float64).reshape(-1, m, m) if mixed else None
      blocks = []
      for j in range(signs.shape[0]):
        if mixed:  # (R (x) H_{2^k} / sqrt(2^k)) D: R on the major part of [m, 2^k].
          blocks.append(np.kron(r[j], _np_hadamard_axis(b // m)) @ np.diag(signs[j]))
          continue
        p_bb = np.eye(b)
        if permuted:  # Blocks whose odd part exceeds MAX_MIX_DIM: H P D, H block-diagonal.
          p_bb = np.zeros((b, b))
          p_bb[np.arange(b), perm[j]] = 1.0  # (P x)[i] = x[perm[i]]
        blocks.append(_np_hadamard_axis(b) @ p_bb @ np.diag(signs[j]))
      mats.append(scipy.linalg.block_diag(*blocks))
    return functools.reduce(np.kron, mats, np.eye(1))
  raise TypeError(rot)


def _family(f):
  return R.get_family(f)


def init_rotation(family, key, shape):
  """One jitted init (eager op-by-op init is slow on small CPUs)."""
  fam = _family(family)
  return jax.jit(lambda k: fam.init(k, tuple(shape)))(key)


@jax.jit
def _round_trip(rot, x):
  return rot.rotate(x), rot.unrotate(x)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rotation_is_orthogonal_and_matches_numpy_matrix(family, shape):
  rot = init_rotation(family, jax.random.key(3), shape)
  q_nn = explicit_matrix(rot, shape)
  n = math.prod(shape)
  assert q_nn.shape == (n, n)
  np.testing.assert_allclose(q_nn.T @ q_nn, np.eye(n), atol=2e-6)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  y, back = map(np.asarray, _round_trip(rot, jnp.asarray(x)))
  assert y.shape == x.shape
  np.testing.assert_allclose(y.reshape(-1), q_nn @ x.reshape(-1).astype(np.float64), atol=2e-5)
  np.testing.assert_allclose(back.reshape(-1), q_nn.T @ x.reshape(-1).astype(np.float64),
                             atol=2e-5)


@pytest.mark.parametrize("dim", [1, 2, 5, 16])
def test_haar_is_sign_corrected_qr_of_the_gaussian(dim):
  key = jax.random.key(dim)
  g = np.asarray(jax.random.normal(key, (dim, dim)), np.float64)
  q, r = np.linalg.qr(g)
  q_ref = q * np.sign(np.diag(r))[None, :]
  np.testing.assert_allclose(np.asarray(R.haar_orthogonal(key, dim)), q_ref, atol=1e-5)


def test_haar_first_column_is_uniform_on_the_sphere():
  # Sign correction makes E[Q] = 0 (without it, diag(Q) is biased positive).
  qs = jax.jit(jax.vmap(lambda k: R.haar_orthogonal(k, 4)))(
      jax.random.split(jax.random.key(0), 4000))
  mean = np.asarray(qs).mean(axis=0)
  assert np.abs(mean).max() < 0.05  # Entries have std 1/2; 5 sigma of the mean is ~0.04.


@pytest.mark.parametrize("dim", [256, 8192 + 512 + 3])
def test_hadamard_axis_is_exactly_orthogonal_for_large_and_odd_lengths(dim):
  rot = init_rotation("hadamard", jax.random.key(1), (dim,))
  x = jax.random.normal(jax.random.key(2), (dim,))
  y = jax.jit(lambda r, x: r.rotate(x))(rot, x)
  np.testing.assert_allclose(float(jnp.linalg.norm(y)), float(jnp.linalg.norm(x)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda r, y: r.unrotate(y))(rot, y)),
                             np.asarray(x), atol=1e-5)
  if dim <= 256:
    q_nn = explicit_matrix(rot, (dim,))
    np.testing.assert_allclose(np.asarray(y), q_nn @ np.asarray(x, np.float64), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_init_is_deterministic_in_the_key(family):
  a = init_rotation(family, jax.random.key(7), (4, 6))
  b = init_rotation(family, jax.random.key(7), (4, 6))
  c = init_rotation(family, jax.random.key(8), (4, 6))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if family != "identity":
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_dense_and_kronecker_refuse_large_parameters_with_a_clear_error():
  with pytest.raises(ValueError, match=r"max_size=4096.*'hadamard'"):
    R.Dense().init(jax.random.key(0), (64, 65), "blocks.0.w")
  with pytest.raises(ValueError, match=r"max_dim=8192"):
    R.Kronecker().init(jax.random.key(0), (4, 9000))
  # The limits are explicit: eval_shape shows a 7B-sized matrix is never built.
  with pytest.raises(ValueError, match="dense"):
    jax.eval_shape(lambda: R.Dense().init(jax.random.key(0), (4096, 11008)))


def test_unknown_family_names_are_rejected():
  with pytest.raises(ValueError, match="unknown rotation 'haar'"):
    R.get_family("haar")
  with pytest.raises(ValueError, match="positive block size"):
    R.Block(size=0)


def test_state_bytes_of_the_default_scale_linearly():
  n = 4096 * 11008
  b = R.rotation_state_bytes((4096, 11008), R.DEFAULT_ROTATION)
  assert b < 0.02 * 8 * n  # Under 2% of AdamW's two float32 moments.


@pytest.mark.parametrize("shape", [(128, 6, 4), (4, 256), (32, 2, 64)])
def test_hadamard_factors_are_the_sylvester_matrix(shape):
  # Axes of more than one factor: the last axis's minor factor from the right and the rest from
  # the left, other axes' factors from the left; all make the same Sylvester matrix.
  rot = init_rotation("hadamard", jax.random.key(4), shape)
  x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  y = np.asarray(jax.jit(lambda r, x: r.rotate(x))(rot, jnp.asarray(x)))
  q_nn = explicit_matrix(rot, shape)
  np.testing.assert_allclose(y.reshape(-1), q_nn @ x.reshape(-1).astype(np.float64), atol=2e-5)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("shape,axis", [((2048, 3), 0), ((3, 2048), 1), ((5, 768, 2), 1),
                                        ((2, 16384), 1), ((16384, 2), 0), ((128,), 0)])
def test_block_hadamard_is_the_sylvester_matrix_with_either_platforms_factors(platform, shape,
                                                                              axis):
  # CPU factors (at most 32 x 32 on the last axis, 8 x 8 elsewhere) and accelerator factors (at
  # most 128 x 128) make the same matrix: float64 scipy Hadamard, fresh inputs.
  x = np.random.default_rng(axis + len(shape)).standard_normal(shape).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: H.block_hadamard(v, axis, platform))(jnp.asarray(x)))
  want = np.moveaxis(np.tensordot(_np_hadamard_axis(shape[axis]), x.astype(np.float64),
                                  axes=([1], [axis])), 0, axis)
  np.testing.assert_allclose(got, want, atol=3e-5)


def test_accelerator_factors_are_at_most_two_128_wide_matmuls_per_axis():
  # The transform's passes over the array: one dot_general per factor. A TPU slice compiled ahead
  # of time takes these widths from its mesh (sharding.target_platform).
  def dots(platform, shape, axis):
    jaxpr = jax.make_jaxpr(lambda v: H.block_hadamard(v, axis, platform))(jnp.zeros(shape))
    square = lambda e: next(v.aval.shape[0] for v in e.invars  # noqa: E731  # the H factor
                            if v.aval.ndim == 2 and v.aval.shape[0] == v.aval.shape[1])
    return [square(e) for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots("tpu", (64, 512), 1) == [128, 4]        # last axis: 128 minor, then the rest
  assert dots("tpu", (512, 64), 0) == [32, 16]
  assert dots("tpu", (384, 8), 0) == [16, 16, 128]     # 384 = 256 + 128: blocks of 2 and 1
  assert len(dots("cpu", (512, 64), 0)) == 3                      # 8 x 8 factors: three passes


# ----------------------------------------------------------------------------- dense default Q


def _q_by_rotating_the_basis(rot, dim: int) -> np.ndarray:
  """float64 [dim, dim] Q that the fast path applies to a [dim] parameter: column j = Q e_j."""
  q = jax.jit(jax.vmap(lambda r, e: r.rotate(e), in_axes=(None, 0)))(
      rot, jnp.eye(dim, dtype=jnp.float32))
  return np.asarray(q, np.float64).T


def _np_mixed_axis(r_mm: np.ndarray, signs_d: np.ndarray) -> np.ndarray:
  """(R (x) H_{2^k} / sqrt(2^k)) D in float64 numpy: the axis viewed as [m, 2^k], row-major."""
  m, dim = r_mm.shape[0], signs_d.shape[0]
  h = scipy.linalg.hadamard(dim // m) / math.sqrt(dim // m)
  return np.kron(np.asarray(r_mm, np.float64), h) @ np.diag(np.asarray(signs_d, np.float64))


@pytest.mark.parametrize("dim,m", [(768, 3), (3072, 3)])
def test_default_rotation_is_dense_orthogonal_and_matches_numpy_kronecker(dim, m):
  # 768 = 3 * 256 and 3072 = 3 * 1024, the paper's widths: Q = (R (x) H) D is dense (a
  # block-diagonal Hadamard with binary-digit blocks, 512 + 256, would leave 44% of it zero).
  rot = init_rotation("hadamard", jax.random.key(dim), (dim,))
  assert rot.perms == () and [r.shape for r in rot.mixes] == [(m, m)]
  q = _q_by_rotating_the_basis(rot, dim)
  assert np.count_nonzero(q == 0) == 0, "every entry of Q is nonzero"
  np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=2e-6)
  np.testing.assert_allclose(q, _np_mixed_axis(np.asarray(rot.mixes[0]), np.asarray(rot.signs[0])),
                             atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("shape", [(11008,), (50304,), (12, 11008 // 8)], ids=str)
def test_default_rotation_at_7b_and_vocabulary_lengths_matches_numpy(shape):
  # Too large to build Q at 11008 = 43 * 256 or 50304 = 393 * 128: Q x against numpy's
  # R X H^T D (X: x viewed [m, 2^k]) for a random x, and R dense and orthogonal.
  rot = init_rotation("hadamard", jax.random.key(5), shape)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  y = np.asarray(_round_trip(rot, jnp.asarray(x))[0])
  want = x.astype(np.float64)
  for axis, (signs, r_mm) in enumerate(zip(rot.signs, rot.mixes)):
    r_mm, d = np.asarray(r_mm, np.float64), shape[axis]
    assert np.count_nonzero(r_mm == 0) == 0
    np.testing.assert_allclose(r_mm @ r_mm.T, np.eye(d // (d & -d)), atol=5e-6)
    h = scipy.linalg.hadamard(d & -d) / math.sqrt(d & -d)
    x_axis = np.moveaxis(want, axis, -1) * np.asarray(signs, np.float64)
    x_axis = x_axis.reshape(x_axis.shape[:-1] + (r_mm.shape[0], d & -d))
    x_axis = np.einsum("ab,...bj,ij->...ai", r_mm, x_axis, h).reshape(x_axis.shape[:-2] + (d,))
    want = np.moveaxis(x_axis, -1, axis)
  np.testing.assert_allclose(y, want, atol=2e-5)
  np.testing.assert_allclose(np.asarray(_round_trip(rot, jnp.asarray(y))[1]), x, atol=2e-5)


def test_large_odd_part_keeps_the_permuted_block_hadamard():
  # 1031 is prime (> MAX_MIX_DIM): no m x m R, the random permutation and block-diagonal
  # Hadamard (1024 + 4 + 2 + 1) instead; Q is then not dense.
  rot = init_rotation("hadamard", jax.random.key(2), (1031,))
  assert rot.mixes == () and [p.shape for p in rot.perms] == [(1031,)]
  q = _q_by_rotating_the_basis(rot, 1031)
  np.testing.assert_allclose(q, explicit_matrix(rot, (1031,)), atol=1e-6)
  assert np.count_nonzero(q == 0) == 1031**2 - (1024**2 + 4**2 + 2**2 + 1)


def _np_haar_by_reflections(g_dd: np.ndarray) -> np.ndarray:
  """Householder reflections of the rows of G in float64 (``haar_by_reflections``'s recipe)."""
  dim = g_dd.shape[0]
  q, s = np.eye(dim), np.ones(dim)
  for k in range(dim - 1):
    x = np.where(np.arange(dim) >= k, g_dd[k], 0.0)
    sign = 1.0 if x[k] >= 0 else -1.0
    v = x.copy()
    v[k] += sign * np.linalg.norm(x)
    q = q - 2.0 * np.outer(q @ v, v) / (v @ v)
    s[k] = -sign
  s[-1] = 1.0 if g_dd[-1, -1] >= 0 else -1.0
  return q * s[None, :]


@pytest.mark.parametrize("dim", [3, 43])
def test_haar_by_reflections_matches_numpy(dim):
  key = jax.random.key(dim)
  g = np.asarray(jax.random.normal(key, (dim, dim)), np.float64)
  got = np.asarray(jax.jit(HR.haar_by_reflections, static_argnums=1)(key, dim), np.float64)
  np.testing.assert_allclose(got, _np_haar_by_reflections(g), atol=2e-6)
  np.testing.assert_allclose(got @ got.T, np.eye(dim), atol=2e-6)


def test_haar_by_reflections_is_haar_distributed():
  # For Haar Q on O(3), each entry is uniform on [-1, 1] (a coordinate of a uniform point on the
  # sphere S^2) and det Q = +-1 with probability 1/2 each. 4000 draws: the KS statistic's 0.1%
  # critical value is 1.95 / sqrt(4000) = 0.031; the det share's 5 sigma is 0.04.
  qs = np.asarray(jax.jit(jax.vmap(lambda k: HR.haar_by_reflections(k, 3)))(
      jax.random.split(jax.random.key(0), 4000)), np.float64)
  for i, j in ((0, 0), (1, 2), (2, 1)):
    assert scipy.stats.kstest(qs[:, i, j], scipy.stats.uniform(-1, 2).cdf).statistic < 0.031
  assert abs(np.mean(np.linalg.det(qs) > 0) - 0.5) < 0.04
  assert np.abs(qs.mean(axis=0)).max() < 0.05


# Pinned "hadamard" rotations of power-of-two shapes: checkpoints of power-of-two models must
# restore and continue on the same Q, so their signs, their RNG use and the transform stay fixed.
# Outputs of an integer input are exact (sums of +-integers, then 1/sqrt of a power of 4 or
# 2 * 4^j).
_PINNED = {  # name: (shape, blocks, signs, rotate(x) * scale, scale)
    "plain": ((16, 4), (),
              [[1, 1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, -1, 1, 1, 1], [-1, -1, -1, -1]],
              [19, 1, -19, 7, 25, 27, 19, -7, -19, -1, 19, -7, 7, 13, 5, 7, -3, 7, -21, -7, 3, 9,
               25, -21, 19, -7, 21, 7, 21, 7, 7, -35, 25, -13, -5, -7, -5, -15, 5, 7, 7, -27,
               -19, 7, 5, 15, -5, -7, -21, 9, 25, 35, 21, 7, 35, -7, -3, 7, 7, 21, -5, -7, -35,
               7], 8),
    "blocked": ((4, 16), (1, 4),
                [[1, 1, 1, 1], [[-1, -1, -1, -1], [1, 1, 1, -1], [1, 1, 1, -1], [-1, 1, 1, 1]]],
                [4, -6, 2, 0, 4, 6, -2, 0, -6, -4, 2, -4, 1, 1, 7, -5, 2, 0, 0, 14, 6, -8, -8, -6,
                 6, -8, 6, 8, -1, -13, 1, 1, 4, 14, 14, 0, 12, -2, -2, 16, -2, 12, -2, -12, -9,
                 -5, 9, 9, 14, 0, 0, -14, 14, 0, 0, -14, -14, 0, -14, 0, -7, -7, 7, -21], 4),
    "3d": ((4, 4, 16), (),
           [[1, 1, 1, 1], [-1, -1, -1, -1],
            [1, -1, 1, -1, -1, 1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1]], None, None),
}
_PINNED_TREE = {  # orthoadam(seed=7).init on {"a": (16, 4), "b": (16, 4), "c": (64,)}: the signs.
    "a": [[1, -1, -1, -1, -1, 1, -1, -1, 1, 1, -1, 1, -1, 1, 1, 1], [-1, 1, 1, -1]],
    "b": [[-1, -1, -1, -1, -1, 1, 1, -1, -1, -1, 1, 1, 1, 1, 1, -1], [-1, 1, -1, -1]],
    "c": [[-1, -1, -1, 1, -1, 1, 1, -1, -1, -1, -1, -1, 1, -1, 1, 1, -1, -1, -1, 1, -1, 1, 1, -1,
           1, -1, 1, 1, 1, -1, -1, 1, 1, -1, -1, -1, -1, 1, 1, 1, -1, -1, 1, 1, -1, -1, -1, -1,
           1, 1, 1, -1, 1, 1, 1, -1, -1, -1, -1, 1, -1, -1, -1, -1]],
}


@pytest.mark.parametrize("name", sorted(_PINNED))
def test_power_of_two_rotation_is_the_recorded_one(name):
  shape, blocks, signs, scaled, scale = _PINNED[name]
  fam = R.Hadamard(blocks=blocks)
  rot = jax.jit(lambda k: fam.init(k, shape, "p"))(jax.random.key(2024))
  assert [np.asarray(s).tolist() for s in rot.signs] == signs
  # The pytree keeps the three fields checkpoints were written with (no empty "mixes").
  keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      rot, is_leaf=lambda x: isinstance(x, tuple) and not x)[0]]
  assert keys == [f".signs[{i}]" for i in range(len(shape))] + [".perms", ".inv_perms"]
  n = math.prod(shape)
  rotate = jax.jit(lambda r, x: r.rotate(x))
  if scaled is not None:
    x_int = jnp.asarray((np.arange(n) % 7 - 3).reshape(shape), jnp.float32)
    assert (np.asarray(rotate(rot, x_int)) * scale).reshape(-1).tolist() == scaled
  # On float input, the recorded Q in float64 (numpy only), to float32 rounding: the last bits
  # are the CPU's (its vector width changes the order of the sums), so they are not pinned.
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  q_nn = explicit_matrix(rot, shape)
  unrotate = jax.jit(lambda r, y: r.unrotate(y))
  x_n = x.reshape(-1).astype(np.float64)
  np.testing.assert_allclose(np.asarray(rotate(rot, x)).reshape(-1), q_nn @ x_n, atol=2e-6)
  np.testing.assert_allclose(np.asarray(unrotate(rot, x)).reshape(-1), q_nn.T @ x_n, atol=2e-6)


def test_power_of_two_rotations_through_orthoadam_are_the_recorded_ones():
  # Same RNG consumption: per-parameter keys from (seed, path), shape groups drawn in one vmap.
  params = {"a": jnp.zeros((16, 4)), "b": jnp.zeros((16, 4)), "c": jnp.zeros((64,))}
  rots = jax.jit(orthoadam(1e-2, seed=7).init)(params)[0].rotations
  assert {k: [np.asarray(s).tolist() for s in r.signs] for k, r in rots.items()} == _PINNED_TREE
  assert all(r.perms == () and r.mixes == () for r in rots.values())
