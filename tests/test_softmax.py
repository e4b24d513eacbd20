"""softmax1 / log_softmax1 / logsumexp1 / learned-sink softmax against float64 numpy computed in
log space."""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax import log_softmax1, logsumexp1, softmax1
from softmax_one_jax.softmax import normalize, resolve_sinks, softmax_with_sink


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


def np_softmax_with_sink(x, sink, where=None):
  """float64 ``exp(x_i) / (exp(c) + sum_j exp(x_j))`` via logaddexp over ``[c, x]``; ``sink``
  ``[rows]``."""
  x = np.asarray(x, np.float64)
  if where is not None:
    x = np.where(where, x, -np.inf)
  c = np.asarray(sink, np.float64).reshape(-1, 1)
  log_norm = np.logaddexp.reduce(np.concatenate([c, x], axis=-1), axis=-1, keepdims=True)
  return np.exp(x - log_norm), np.exp(c - log_norm)[:, 0]


def test_softmax_with_sink_matches_float64_reference(np_rng):
  # Sinks from far below to far above the logits, and -inf (plain softmax); a fully masked row.
  x = random_logits(np_rng, (8, 20), 4.0)
  sink = np.array([0.0, -1e9, -30.0, -2.0, 1.5, 12.0, 60.0, -np.inf], np.float32)
  where = np_rng.random(x.shape) < 0.8
  where[1] = False
  for w in (None, where):
    want, null = np_softmax_with_sink(x, sink, w)
    got = softmax_with_sink(x, sink[:, None], where=w)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0 - null, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(normalize(x, "learned_sink", where=w, sinks=sink[:, None]), got)
  np.testing.assert_array_equal(softmax_with_sink(x, sink[:, None], where=where)[1], 0.0)
  # The limits: a sink of 0 is softmax-1, of -inf softmax.
  np.testing.assert_allclose(softmax_with_sink(x, 0.0), softmax1(x), rtol=1e-7)
  np.testing.assert_allclose(softmax_with_sink(x, -jnp.inf), jax.nn.softmax(x), rtol=1e-6)


def test_softmax_with_sink_gradients(np_rng):
  # Analytic: for L = <w, y>, dL/dx = y * (w - <w, y>) and dL/dc = -p_null * <w, y>.
  x = random_logits(np_rng, (4, 9), 3.0)
  w = np_rng.standard_normal((4, 9))
  sink = np.array([-1.0, 0.5, 4.0, -20.0], np.float32)
  gx, gc = jax.grad(lambda x, c: jnp.sum(softmax_with_sink(x, c[:, None]) * w), (0, 1))(x, sink)
  y, null = np_softmax_with_sink(x, sink)
  wy = np.sum(w * y, axis=-1)
  np.testing.assert_allclose(gx, y * (w - wy[:, None]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gc, -null * wy, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):  # forward and reverse mode, second order, against finite differences
    x64, c64 = jnp.asarray(x, jnp.float64), jnp.asarray(sink, jnp.float64)[:, None]
    where = jnp.asarray(np_rng.random(x.shape) < 0.7).at[:, 0].set(True)
    jax.test_util.check_grads(lambda x, c: softmax_with_sink(x, c, where=where), (x64, c64),
                              order=2, eps=1e-4)


def test_resolve_sinks_is_the_one_rule():
  assert resolve_sinks("softmax", None) is None
  np.testing.assert_array_equal(resolve_sinks("softmax1", None, (3,)), np.zeros(3))
  np.testing.assert_array_equal(resolve_sinks("learned_sink", [1.0, 2.0], (2,)), [1.0, 2.0])
  assert resolve_sinks("learned_sink", jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(ValueError, match="softmax='learned_sink' needs the sink logits"):
    resolve_sinks("learned_sink", None, (2,))
  with pytest.raises(ValueError, match="softmax='softmax1' takes no sinks"):
    resolve_sinks("softmax1", jnp.zeros(2))
  with pytest.raises(ValueError, match=r"sinks has shape \(3,\); expected \(2,\)"):
    resolve_sinks("learned_sink", jnp.zeros(3), (2,))
  with pytest.raises(ValueError, match="softmax='sink' is not known"):
    resolve_sinks("sink", None)
