"""The fused LM head + loss (linear_cross_entropy) against float64 numpy and the unfused path."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.models import Transformer, preset
from softmax_one_jax.models.loss import (linear_cross_entropy, sequence_chunk,
                                         weighted_cross_entropy)
from softmax_one_jax.training.mesh import make_mesh


def _np_reference(x, w_vd, targets, weights):
  """float64 loss sums and the analytic gradients d loss_sum / d (x, w_vd, weights)."""
  x, w_vd = x.astype(np.float64), w_vd.astype(np.float64)
  logits = x @ w_vd.T
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  nll = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
  onehot = np.eye(w_vd.shape[0])[targets]
  g_logits = (p - onehot) * weights[..., None]
  return ((nll * weights).sum(), weights.sum()), (g_logits @ w_vd,
                                                  np.einsum("btv,btd->vd", g_logits, x), nll)


def _inputs(rng, b=3, t=12, d=8, v=37):
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  w_vd = (rng.normal(size=(v, d)) * 0.7).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.25).astype(np.float32)
  return x, w_vd, targets, weights


@pytest.mark.parametrize("chunk", [1, 4, 12, None])
def test_loss_and_gradients_match_float64_numpy(np_rng, chunk):
  x, w_vd, targets, weights = _inputs(np_rng)
  (s_ref, n_ref), (gx_ref, gw_ref, gweights_ref) = _np_reference(x, w_vd, targets, weights)
  a, c = np_rng.normal(size=2)  # Arbitrary cotangents for both outputs.

  def objective(x, w_vd, weights):
    s, n = linear_cross_entropy(x, w_vd, targets, weights, chunk=chunk)
    return a * s + c * n, (s, n)

  (_, (s, n)), (gx, gw, gweights) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(x, w_vd, weights)
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-5)
  assert float(n) == n_ref
  np.testing.assert_allclose(np.asarray(gx), a * gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), a * gw_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gweights), a * gweights_ref + c, rtol=1e-4, atol=1e-5)
  # Without differentiation (evaluation) the same sums come from the forward-only path.
  s2, _ = jax.jit(lambda *args: linear_cross_entropy(*args, chunk=chunk))(x, w_vd, targets, weights)
  np.testing.assert_allclose(float(s2), s_ref, rtol=1e-5)


@pytest.mark.parametrize("chunk", [3, None])
def test_jvp_is_the_float64_directional_derivative(np_rng, chunk):
  # Tangents along the hidden states, the unembedding and the weights at once; with chunk=3 the
  # twelve positions span four chunks, so the rule's per-chunk gradients and their sum are used.
  x, w_vd, targets, weights = _inputs(np_rng)
  dx, dw_vd = np_rng.normal(size=x.shape), np_rng.normal(size=w_vd.shape)
  dweights = np_rng.normal(size=weights.shape)
  (s_ref, _), (gx_ref, gw_ref, gweights_ref) = _np_reference(x, w_vd, targets, weights)
  want = (gx_ref * dx).sum() + (gw_ref * dw_vd).sum() + (gweights_ref * dweights).sum()
  f = lambda x, w_vd, weights: linear_cross_entropy(x, w_vd, targets, weights, chunk=chunk)
  (s, n), (ds, dn) = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))(
      x, w_vd, weights, *(t.astype(np.float32) for t in (dx, dw_vd, dweights)))
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-5)
  np.testing.assert_allclose(float(ds), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(dn), dweights.astype(np.float32).sum(), rtol=1e-5)


def test_gradient_reuses_the_forward_logits_and_evaluation_skips_the_gradient():
  # Matmuls in the traced programs (a scan body's counted once): evaluation makes the logits
  # only; the gradient adds d/dx and d/dunembed from the same chunk, with no second logits matmul
  # (a rematerialised backward pass would have four).
  x, w_vd, targets, weights = _inputs(np.random.default_rng(0))
  f = lambda x, w_vd: linear_cross_entropy(x, w_vd, targets, weights, chunk=4)[0]
  matmuls = lambda fn: str(jax.make_jaxpr(fn)(x, w_vd)).count("dot_general")
  assert matmuls(f) == 1
  assert matmuls(jax.grad(f, (0, 1))) == 3


def test_equals_unfused_head_and_loss_under_grad(np_rng):
  x, w_vd, targets, weights = _inputs(np_rng, b=2, t=16, d=16, v=64)
  fused = lambda x, w: linear_cross_entropy(x, w, targets, weights, chunk=4)[0]
  unfused = lambda x, w: weighted_cross_entropy(jnp.einsum("btd,vd->btv", x, w), targets,
                                                weights)[0]
  for f_out, u_out in zip(jax.grad(fused, (0, 1))(x, w_vd), jax.grad(unfused, (0, 1))(x, w_vd)):
    np.testing.assert_allclose(np.asarray(f_out), np.asarray(u_out), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_model_features_times_unembedding_are_the_logits(tie):
  cfg = preset("tiny").replace(tie_embeddings=tie, vocab_size=96, num_layers=1)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
  logits = model(tokens)
  via_features = jnp.einsum("btd,vd->btv", model.features(tokens), model.unembedding())
  np.testing.assert_allclose(np.asarray(via_features), np.asarray(logits), rtol=1e-5, atol=1e-5)


def _largest_chunk(b: int, t: int, v: int, max_rows: int, max_logits: int) -> int:
  return max([1] + [c for c in range(1, t + 1)
                    if t % c == 0 and b * c <= max_rows and b * c * v <= max_logits])


# mesh layout -> (devices sharding the batch, shards of the vocabulary); None: outside a mesh.
CHUNK_MESHES = {None: (1, 1), (1, 8, 1): (8, 1), (2, 4, 1): (8, 1), (1, 4, 2): (4, 2),
                (2, 2, 2): (4, 2)}


def _in_mesh(layout):
  """The mesh of ``layout`` in context (nothing for None)."""
  if layout is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(make_mesh(*layout).abstract_mesh)


@pytest.mark.parametrize("layout", list(CHUNK_MESHES), ids=str)
def test_sequence_chunk_is_the_largest_divisor_within_the_bound(layout):
  # A device holds the chunk's rows over the batch's devices (not the whole mesh: tensor devices
  # share rows) and their logits over its share of the vocabulary.
  rows, words = CHUNK_MESHES[layout]
  for b, t, v, per_device in [(16, 128, 4096, 1 << 20), (8, 256, 50304, 1 << 24), (8, 7, 10, 30),
                              (64, 256, 50304, 1 << 20)]:
    with _in_mesh(layout):
      c = sequence_chunk(b, t, v, logits_per_device=per_device)
    assert t % c == 0
    assert c == _largest_chunk(b, t, v, 512 * rows, per_device * rows * words)


@pytest.mark.parametrize("layout", list(CHUNK_MESHES), ids=str)
def test_default_chunk_is_one_budget_per_device(layout):
  # At most 512 rows and 2^24 logits per device, whatever the platform and the vocabulary: the
  # rows bind at small vocabularies, the logits at large ones.
  rows, words = CHUNK_MESHES[layout]
  # Per device: (rows, positions, words) -> the chunk by hand; half the words per device on a
  # tensor axis let twice the positions fit the logit budget.
  n = rows
  cases = {(16 * n, 128, 4096): 32, (4 * n, 256, 50304): 64 * words,
           (64 * n, 256, 50304): 4 * words, (n, 7, 1 << 25): 1, (2 * n, 1024, 512): 256}
  for (b, t, v), hand in cases.items():
    want = _largest_chunk(b, t, v, 512 * rows, rows * words << 24)
    with _in_mesh(layout):
      assert sequence_chunk(b, t, v) == want
    assert hand is None or want == hand


def test_chunk_counts_the_devices_of_the_batch_not_the_mesh():
  # 16 rows of 512 words: 512 rows per device are 256 positions on fsdp=8, but 128 on fsdp=4 x
  # tensor=2, whose tensor pairs share their rows (counting all 8 devices would say 256 again).
  with _in_mesh((1, 8, 1)):
    assert sequence_chunk(16, 1024, 512) == 256
  with _in_mesh((1, 4, 2)):
    assert sequence_chunk(16, 1024, 512) == 128


def test_bad_shapes_and_chunks_fail_clearly():
  x, w_vd, targets, weights = _inputs(np.random.default_rng(0))
  with pytest.raises(ValueError, match="must divide the sequence length 12"):
    linear_cross_entropy(x, w_vd, targets, weights, chunk=5)
  with pytest.raises(ValueError, match=r"unembed_vd must be \[V, D=8\]"):
    linear_cross_entropy(x, w_vd.T, targets, weights)
  with pytest.raises(ValueError, match="targets and weights must be"):
    linear_cross_entropy(x, w_vd, targets[:, :3], weights)
