"""bench/train.py's matmul census: every dot_general of a traced step, counted and costed."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np


def _bench_train():
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "train.py"
  spec = importlib.util.spec_from_file_location("bench_train", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _census_flops(bench, fn, *args) -> tuple[int, int]:
  counts = bench.jaxpr_matmuls(jax.make_jaxpr(fn)(*args).jaxpr)
  return sum(counts.values()), sum(n * bench.dot_flops(s) for s, n in counts.items())


def test_matmul_census_counts_scans_nested_jits_and_gradients(np_rng):
  bench = _bench_train()
  m, k, steps = (int(v) for v in np_rng.integers(2, 9, size=3))
  x = jnp.asarray(np_rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(np_rng.normal(size=(k, k)), jnp.float32)
  flops = 2 * m * k * k

  def loss(x, w):
    inner = jax.jit(lambda a, b: jnp.tanh(a @ b))

    def body(h, _):
      return inner(h, w), None
    h, _ = jax.lax.scan(body, x, None, length=steps)
    return jnp.sum(h)

  # The scanned dot runs `steps` times; its gradient adds dh and dw at every iteration.
  assert _census_flops(bench, loss, x, w) == (steps, steps * flops)
  grads = jax.grad(loss, argnums=(0, 1))
  assert _census_flops(bench, grads, x, w) == (3 * steps, 3 * steps * flops)
  counts = bench.jaxpr_matmuls(jax.make_jaxpr(grads)(x, w).jaxpr)
  assert bench._matmuls_of_kind(counts, "2-D") == counts
  assert not bench._matmuls_of_kind(counts, "batched")


def test_dot_flops_of_batched_contractions(np_rng):
  bench = _bench_train()
  b, h, t, s, d = (int(v) for v in np_rng.integers(2, 7, size=5))
  q = jnp.zeros((b, t, h, d))
  k = jnp.zeros((b, h, s, d))
  counts = bench.jaxpr_matmuls(jax.make_jaxpr(
      lambda q, k: jnp.einsum("bthd,bhsd->bhts", q, k))(q, k).jaxpr)
  (spec, count), = counts.items()
  assert count == 1
  assert bench._matmuls_of_kind(counts, "batched") == counts
  assert not bench._matmuls_of_kind(counts, "2-D")
  assert bench.dot_flops(spec) == 2 * b * h * t * s * d
  expected = np.einsum("bthd,bhsd->bhts", np.ones((b, t, h, d)), np.ones((b, h, s, d)))
  assert expected.size * d * 2 == bench.dot_flops(spec)
