"""Blocked Hadamard / Kronecker rotations (``blocks=``): a fixed block-diagonal ``Q``.

Rotations are checked as dense float64 matrices (orthogonal, block-diagonal, equal to a numpy
construction).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.optim import Hadamard, Kronecker, orthoadam
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
                                       r"\[1, 2, 4, 8\]"):
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
