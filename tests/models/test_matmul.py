"""The projection matmul's hand-written backward pass against float64 numpy and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.models.matmul import dense_dot_general, matmul


@pytest.mark.parametrize("w_shape", [(5, 7), (5, 3, 4)])
def test_values_and_gradients_match_float64_numpy(np_rng, w_shape):
  x = np_rng.standard_normal((2, 3, 5)).astype(np.float32)
  w = np_rng.standard_normal(w_shape).astype(np.float32)
  out_shape = (2, 3) + w_shape[1:]
  dy = np_rng.standard_normal(out_shape)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  w_kf = w64.reshape(5, -1)
  np.testing.assert_allclose(matmul(x, w), (x64 @ w_kf).reshape(out_shape), rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(lambda x, w: jnp.sum(matmul(x, w) * dy), (0, 1))(x, w)
  dy_mf = dy.reshape(6, -1)
  np.testing.assert_allclose(dx, (dy_mf @ w_kf.T).reshape(x.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, (x64.reshape(6, 5).T @ dy_mf).reshape(w_shape), rtol=1e-5,
                             atol=1e-5)


def test_matches_autodiff_of_the_plain_dot_under_jit_and_vmap(np_rng):
  x = np_rng.standard_normal((4, 6, 8)).astype(np.float32)
  w = np_rng.standard_normal((8, 16)).astype(np.float32)
  loss = lambda mm: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(mm(x, w))), (0, 1)))
  ours, theirs = loss(matmul)(x, w), loss(lambda x, w: x @ w)(x, w)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  per_example = jax.vmap(jax.grad(lambda x, w: jnp.sum(matmul(x, w) ** 2), 1), (0, None))(x, w)
  want = jax.vmap(jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), 1), (0, None))(x, w)
  np.testing.assert_allclose(per_example, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_keeps_dtypes(np_rng):
  x = jnp.asarray(np_rng.standard_normal((3, 8)), jnp.bfloat16)
  w = jnp.asarray(np_rng.standard_normal((8, 4)), jnp.bfloat16)
  y = matmul(x, w)
  assert y.dtype == jnp.bfloat16
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)
  dx, dw = jax.grad(lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32)), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16


def test_nnx_linear_with_dense_dot_general_equals_the_default_layer(np_rng):
  ours = nnx.Linear(8, 5, dot_general=dense_dot_general, rngs=nnx.Rngs(0))
  default = nnx.Linear(8, 5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np_rng.standard_normal((2, 3, 8)), jnp.float32)
  np.testing.assert_allclose(ours(x), default(x), rtol=1e-6, atol=1e-6)
  grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m) for m in (ours, default)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_other_contractions_go_to_lax_dot_general(np_rng):
  a = jnp.asarray(np_rng.standard_normal((2, 3, 4)), jnp.float32)
  b = jnp.asarray(np_rng.standard_normal((2, 4, 5)), jnp.float32)
  batched = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_array_equal(dense_dot_general(a, b, batched),
                                jax.lax.dot_general(a, b, batched))
  w = jnp.asarray(np_rng.standard_normal((4, 5)), jnp.float32)
  plain = (((2,), (0,)), ((), ()))
  high = dense_dot_general(a, w, plain, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_array_equal(high, jax.lax.dot_general(a, w, plain,
                                                          precision=jax.lax.Precision.HIGHEST))


def test_clear_error_for_mismatched_shapes():
  with pytest.raises(ValueError, match=r"x \[\.\.\., K\] and w \[K, \.\.\.\]"):
    matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
