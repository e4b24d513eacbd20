"""Rotation families: each is orthogonal, matches an independent numpy matrix, is deterministic."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from softmax_one_jax.optim import hadamard as H
from softmax_one_jax.optim import rotations as R

SHAPES = [(), (5,), (4, 6), (3, 11, 7)]
FAMILIES = ["identity", "dense", "kronecker", R.Block(size=4), "hadamard"]


def _np_hadamard_axis(dim: int) -> np.ndarray:
  """Block-diagonal normalised Hadamard: blocks are the binary digits of dim, largest first."""
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
    perms = iter(rot.perms)
    for signs in rot.signs:
      # Signs [b] (one block) or [k, b] (k blocks of length b, each its own H P D).
      signs = np.asarray(signs, np.float64).reshape(-1, np.shape(signs)[-1])
      b = signs.shape[1]
      perm = np.asarray(next(perms)).reshape(signs.shape) if b & (b - 1) else None
      blocks = []
      for j in range(signs.shape[0]):
        p_bb = np.eye(b)
        if perm is not None:  # Only blocks whose length is not a power of two are permuted.
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


@pytest.mark.parametrize("impl", [
    (("butterfly", 2), ("butterfly", 2)), (("matmul", 1), ("matmul", 1)),
    (("matmul", 3), ("matmul", 3)), (("matmul", 7), ("matmul", 7)),
    (("left_matmul", 2), ("left_matmul", 2)), (("matmul", 2), ("left_matmul", 1)),
    (("matmul", 5), ("left_matmul", 3)), (("matmul", 5), ("butterfly", 2)),
    (("right_left", 5), ("left_matmul", 3)), (("right_left", 1), ("right_left", 2))])
def test_hadamard_implementation_does_not_change_the_matrix(monkeypatch, impl):
  # (last axis, other axes): CPU multiplies small Hadamard factors from the right on the last
  # axis and from the left elsewhere, GPU/TPU use <= 128x128 matmuls, butterflies only add: all
  # are the same Sylvester matrix.
  monkeypatch.setattr(H, "_HADAMARD_IMPL", {jax.default_backend(): impl})
  rot = init_rotation("hadamard", jax.random.key(4), (128, 6, 4))
  x = np.random.default_rng(1).standard_normal((128, 6, 4)).astype(np.float32)
  y = np.asarray(jax.jit(lambda r, x: r.rotate(x))(rot, jnp.asarray(x)))
  q_nn = explicit_matrix(rot, (128, 6, 4))
  np.testing.assert_allclose(y.reshape(-1), q_nn @ x.reshape(-1).astype(np.float64), atol=2e-5)
