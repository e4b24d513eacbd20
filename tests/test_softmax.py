"""softmax1 / log_softmax1 / logsumexp1 against float64 numpy computed in log space."""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax import log_softmax1, logsumexp1, softmax1
from softmax_one_jax.softmax import normalize


def np_log_softmax1(x: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
  """float64 log softmax-1 via logaddexp over the row with an explicit zero logit."""
  x = np.asarray(x, np.float64)
  if where is not None:
    x = np.where(where, x, -np.inf)
  zero = np.zeros(x.shape[:-1] + (1,))
  log_norm = np.logaddexp.reduce(np.concatenate([zero, x], axis=-1), axis=-1, keepdims=True)
  return x - log_norm


def np_softmax1(x, where=None):
  return np.exp(np_log_softmax1(x, where))


def random_logits(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
  return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0, 1e4])
def test_softmax1_matches_float64_reference(np_rng, scale):
  x = random_logits(np_rng, (5, 7, 33), scale)
  np.testing.assert_allclose(softmax1(x), np_softmax1(x), rtol=2e-6, atol=1e-7)
  log_norm = np.logaddexp.reduce(np.concatenate([np.zeros((5, 7, 1)), x], -1), axis=-1)
  np.testing.assert_allclose(logsumexp1(x), log_norm, rtol=2e-6, atol=1e-5)


def test_softmax1_is_not_max_shifted_softmax_plus_one():
  # The common bug: exp(x - max) / (1 + sum exp(x - max)). For x = [10, 10] softmax-1 gives
  # e^10 / (1 + 2 e^10) ~ 0.499977, the bug gives 1/3.
  x = np.array([10.0, 10.0], np.float32)
  np.testing.assert_allclose(softmax1(x), np_softmax1(x), rtol=1e-6)
  assert float(softmax1(x)[0]) > 0.4999


def test_extreme_and_masked_logits(np_rng):
  x = np.array([[1e4, -1e4, 0.0, -np.inf],
                [-1e4, -1e4, -1e4, -1e4],
                [-np.inf] * 4,
                [88.0, 89.0, -3.0, 2.0]], np.float32)
  y = np.asarray(softmax1(x))
  assert np.isfinite(y).all()
  np.testing.assert_allclose(y, np_softmax1(x), atol=1e-7)
  np.testing.assert_array_equal(y[2], 0.0)
  # A random mask with one fully masked row.
  x = random_logits(np_rng, (6, 10), 5.0)
  where = np_rng.random((6, 10)) < 0.6
  where[3] = False
  y = np.asarray(softmax1(x, where=where))
  np.testing.assert_allclose(y, np_softmax1(x, where), rtol=2e-6, atol=1e-7)
  np.testing.assert_array_equal(y[3], 0.0)
  np.testing.assert_array_equal(y[~where], 0.0)
  log_y = np.asarray(log_softmax1(x, where=where))
  assert np.isneginf(log_y[~where]).all()
  np.testing.assert_allclose(log_y[where], np_log_softmax1(x, where)[where], rtol=1e-5, atol=1e-5)


def test_log_softmax1_matches_reference(np_rng):
  x = random_logits(np_rng, (4, 50), 20.0)
  np.testing.assert_allclose(log_softmax1(x), np_log_softmax1(x), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_analytic_jacobian(np_rng, masked):
  # For y = softmax1(x): d<w, y>/dx = y * (w - <w, y>), the same form as softmax.
  x = random_logits(np_rng, (3, 12), 4.0)
  w = np_rng.standard_normal((3, 12))
  where = (np_rng.random((3, 12)) < 0.7) if masked else None
  if masked:
    where[1] = False
  grad = jax.grad(lambda x: jnp.sum(softmax1(x, where=where) * w))(x)
  y = np_softmax1(x, where)
  expected = y * (w - np.sum(w * y, axis=-1, keepdims=True))
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  grad_log = jax.grad(lambda x: jnp.sum(log_softmax1(x) * w))(x)
  y = np_softmax1(x)
  np.testing.assert_allclose(
      grad_log, w - y * np.sum(w, axis=-1, keepdims=True), rtol=1e-5, atol=1e-5
  )


def test_gradients_numerically_in_float64(np_rng):
  with jax.enable_x64(True):
    x = jnp.asarray(np_rng.standard_normal((2, 6)) * 3.0)
    where = jnp.asarray(np_rng.random((2, 6)) < 0.7).at[:, 0].set(True)
    jax.test_util.check_grads(lambda x: softmax1(x, where=where), (x,), order=2, eps=1e-4)
    jax.test_util.check_grads(log_softmax1, (x,), order=2, eps=1e-4)


def test_gradient_of_fully_masked_and_neg_inf_rows_is_zero_not_nan():
  x = jnp.array([[-jnp.inf, -jnp.inf], [1.0, -jnp.inf]])
  g = jax.grad(lambda x: jnp.sum(softmax1(x) ** 2))(x)
  assert np.isfinite(np.asarray(g)).all()
  g = jax.grad(lambda x: jnp.sum(softmax1(x, where=jnp.zeros_like(x, bool))))(jnp.ones((2, 2)))
  np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_in_bfloat16_out(np_rng):
  x = random_logits(np_rng, (4, 64), 6.0)
  y = softmax1(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  # bf16 inputs are rounded first; the float32-inside result is then within bf16 output rounding.
  x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(y, np.float32), np_softmax1(x_rounded), rtol=8e-3, atol=1e-6)
  assert log_softmax1(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_axis_argument(np_rng):
  x = random_logits(np_rng, (6, 5, 4), 2.0)
  np.testing.assert_allclose(
      softmax1(x, axis=1), np.moveaxis(np_softmax1(np.moveaxis(x, 1, -1)), -1, 1), rtol=1e-6
  )


def test_rows_sum_below_one_and_softmax_switch(np_rng):
  x = random_logits(np_rng, (8, 16), 2.0)
  assert (np.asarray(softmax1(x)).sum(-1) < 1).all()
  np.testing.assert_allclose(normalize(x, "softmax"), jax.nn.softmax(x), rtol=1e-6)
  masked = normalize(x, "softmax", where=np.zeros_like(x, bool))
  np.testing.assert_array_equal(masked, 0.0)  # jax.nn.softmax would give NaN here
  with pytest.raises(ValueError, match="softmax='sparsemax' is not known"):
    normalize(x, "sparsemax")
