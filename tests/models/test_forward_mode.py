"""Forward-mode autodiff through the model and the loss: jvp, jacfwd, HVPs, transposition.

Each derivative is checked against an independent one: a central finite difference, reverse mode
(``jacrev``, reverse-over-reverse), or the adjoint identity ``<u, J v> == <J^T u, v>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.models import Transformer, preset
from softmax_one_jax.models.loss import linear_cross_entropy

FLAVOURS = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                  tie_embeddings=False, num_kv_heads=2),
}
BATCH, SEQ, VOCAB = 2, 8, 64
CHUNK = 2  # Four sequence chunks of the loss: the scan over chunks is exercised.


def _model(flavour: str, num_layers: int = 2):
  """A tiny float32 model split into ``(apply(params, tokens) -> logits, loss(params), params)``."""
  cfg = preset("tiny", vocab_size=VOCAB, num_layers=num_layers, d_model=32, num_heads=4,
               mlp_dim=64, max_seq_len=32, dtype="float32", param_dtype="float32",
               **FLAVOURS[flavour])
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  keys = jax.random.split(jax.random.key(1), 2)
  tokens = jax.random.randint(keys[0], (BATCH, SEQ), 0, VOCAB)
  targets = jax.random.randint(keys[1], (BATCH, SEQ), 0, VOCAB)
  weights = jnp.ones((BATCH, SEQ), jnp.float32).at[0, -1].set(0.0)

  def logits(params, tokens=tokens):
    return nnx.merge(graphdef, params, rest)(tokens)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    s, n = linear_cross_entropy(m.features(tokens), m.unembedding(), targets, weights,
                                chunk=CHUNK)
    return s / n

  return logits, loss, params


def _random_like(tree, seed: int, scale: float = 1.0):
  """A standard-normal tree shaped like ``tree`` (a tangent or cotangent)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _axpy(a: float, x, y):
  return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _vdot(x, y) -> float:
  return sum(float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))
             for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def _assert_trees_close(got, want, rtol: float, atol: float):
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_jvp_of_logits_and_loss_matches_central_differences(flavour):
  logits, loss, params = _model(flavour)
  v = _random_like(params, seed=2, scale=0.02)
  for f in (logits, loss):
    _, jv = jax.jit(lambda p, v: jax.jvp(f, (p,), (v,)))(params, v)
    # Central difference along the tangent, in float64 from float32 evaluations: its error is
    # O(eps^2) truncation plus O(float32 eps / eps) rounding, under 1e-3 relative at eps = 0.01.
    eps = 0.01
    plus, minus = jax.jit(f)(_axpy(eps, v, params)), jax.jit(f)(_axpy(-eps, v, params))
    fd = (np.asarray(plus, np.float64) - np.asarray(minus, np.float64)) / (2 * eps)
    jv = np.asarray(jv, np.float64)
    assert np.linalg.norm(jv) > 0
    assert np.linalg.norm(jv - fd) <= 5e-3 * np.linalg.norm(jv), (np.linalg.norm(jv - fd),
                                                                   np.linalg.norm(jv))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_jacfwd_equals_jacrev_for_a_small_parameter_leaf(flavour):
  logits, loss, params = _model(flavour, num_layers=1)
  tokens = jnp.array([[3, 1, 4, 1]], jnp.int32)
  # A one-axis leaf (a norm gain or bias, [32]) that both the logits and the loss depend on.
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [x for _, x in paths_leaves]
  index = next(i for i, (path, x) in enumerate(paths_leaves)
               if x.ndim == 1 and "final" in jax.tree_util.keystr(path))

  def of_leaf(fn):
    return lambda leaf: fn(jax.tree_util.tree_unflatten(
        treedef, leaves[:index] + [leaf] + leaves[index + 1:]))

  leaf = leaves[index]
  for fn in (lambda p: logits(p, tokens), loss):
    fwd = jax.jit(jax.jacfwd(of_leaf(fn)))(leaf)
    rev = jax.jit(jax.jacrev(of_leaf(fn)))(leaf)
    assert np.abs(np.asarray(fwd)).max() > 0
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=1e-4, atol=1e-6)


def test_loss_jacfwd_equals_jacrev_in_the_features_over_several_chunks():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, SEQ, 4)), jnp.float32)
  w_vd = jnp.asarray(rng.normal(size=(VOCAB, 4)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  weights = jnp.asarray(rng.random((BATCH, SEQ)), jnp.float32)
  f = lambda x, w: linear_cross_entropy(x, w, targets, weights, chunk=CHUNK)[0]
  for argnum in (0, 1):
    fwd = jax.jit(jax.jacfwd(f, argnums=argnum))(x, w_vd)
    rev = jax.jit(jax.jacrev(f, argnums=argnum))(x, w_vd)
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_forward_over_reverse_hvp_equals_reverse_over_reverse(flavour):
  _, loss, params = _model(flavour)
  v = _random_like(params, seed=3)
  fwd_rev = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
  rev_rev = jax.jit(lambda p, v: jax.grad(
      lambda q: sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss)(q)),
                                                   jax.tree_util.tree_leaves(v))))(p))(params, v)
  assert _vdot(fwd_rev, fwd_rev) > 0
  _assert_trees_close(fwd_rev, rev_rev, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_transpose_of_the_linearised_model_is_its_adjoint(flavour):
  logits, loss, params = _model(flavour)
  v = _random_like(params, seed=4)
  for f in (logits, loss):
    y, f_jvp = jax.linearize(f, params)
    f_t = jax.linear_transpose(f_jvp, params)
    u = jax.random.normal(jax.random.key(5), y.shape, y.dtype)
    (jt_u,) = f_t(u)
    lhs, rhs = _vdot(u, f_jvp(v)), _vdot(jt_u, v)
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + abs(rhs)) + 1e-5, (lhs, rhs)
