"""SGD with momentum (the lab's control optimizer) against a float64 numpy heavy-ball loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.state import build_optimizer, sgd_momentum
from tests.training._micro import micro_config


def _numpy_heavy_ball(params, grads_seq, lr, momentum, weight_decay):
  """p <- p - lr * (m + wd * p) with m <- momentum * m + g; wd on matrices only."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  for grads in grads_seq:
    for k in p:
      m[k] = momentum * m[k] + np.asarray(grads[k], np.float64)
      decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
      p[k] = p[k] - lr * (m[k] + decay)
  return p


def test_sgd_momentum_matches_numpy_heavy_ball_with_decoupled_decay(np_rng):
  params = {"w": np_rng.normal(size=(3, 4)).astype(np.float32),
            "b": np_rng.normal(size=(4,)).astype(np.float32)}
  grads_seq = [{k: np_rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
               for _ in range(5)]
  lr, momentum, wd = 0.07, 0.9, 0.3
  tx = sgd_momentum(lr, momentum=momentum, weight_decay=wd)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  want = _numpy_heavy_ball(params, grads_seq, lr, momentum, wd)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6)


def test_build_optimizer_sgd_uses_the_schedule_and_momentum():
  c = micro_config(optimizer="adamw")
  c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 0.5, 0.0
  c.optimizer.grad_clip_norm, c.optimizer.warmup_steps = 0.0, 0
  validate_config(c, num_devices=1, process_count=1)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  p = {"w": jnp.ones((2, 2))}
  state = tx.init(p)
  g = {"w": jnp.full((2, 2), 2.0)}
  u1, state = tx.update(g, state, p)
  u2, _ = tx.update(g, state, p)
  np.testing.assert_allclose(np.asarray(u1["w"]), -float(schedule(0)) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u2["w"]), -float(schedule(1)) * 3.0, rtol=1e-6)


def test_sgd_momentum_out_of_range_is_refused():
  c = micro_config(optimizer="adamw")
  c.optimizer.name, c.optimizer.momentum = "sgd", 1.5
  with pytest.raises(ValueError, match="optimizer.momentum"):
    validate_config(c, num_devices=1, process_count=1)
