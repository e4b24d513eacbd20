"""The XLA attention paths against float64 numpy and, for gradients, against jax.nn and numpy.

Also the learned-sink rule shared by every path: sinks of 0 are softmax-1, sinks of -1e9 softmax.
"""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import dot_product_attention, reference_attention, xla_attention
from softmax_one_jax.attention.xla import MIN_BLOCKED_LEN, default_query_blocks
from tests.attention.reference_np import (np_attention, np_attention_grads,
                                          np_attention_parts, random_sinks, sink_grad_atol)


def qkv(rng, b=2, t=9, s=None, n=4, k=2, h=16, dtype=np.float32):
  s = t if s is None else s
  return (rng.standard_normal((b, t, n, h)).astype(dtype),
          rng.standard_normal((b, s, k, h)).astype(dtype),
          rng.standard_normal((b, s, k, h)).astype(dtype))


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_matches_numpy(np_rng, softmax, is_causal, heads):
  q, k, v = qkv(np_rng, n=heads[0], k=heads[1])
  sinks = random_sinks(np_rng, heads[0]) if softmax == "learned_sink" else None
  opts = dict(softmax=softmax, is_causal=is_causal, sinks=sinks)
  out, probs = reference_attention(q, k, v, return_probs=True, **opts)
  want_out, want_probs, want_null = np_attention_parts(q, k, v, **opts)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)
  # Rows sum to one minus the null key's share (softmax: no null key, one).
  np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0 - want_null, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dot_product_attention(q, k, v, **opts), want_out,
                             rtol=1e-5, atol=1e-5)


def test_segment_ids_mask_and_scale(np_rng):
  q, k, v = qkv(np_rng, t=12)
  seg = np.sort(np_rng.integers(0, 3, size=(2, 12)), axis=1)
  mask = np_rng.random((2, 1, 12, 12)) < 0.8
  got = dot_product_attention(q, k, v, is_causal=True, segment_ids=seg, mask=mask, scale=0.3)
  want, _ = np_attention(q, k, v, is_causal=True, segment_ids=seg, mask=mask, scale=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Cross-attention with a (q, kv) segment-id pair and different lengths.
  q, k, v = qkv(np_rng, t=5, s=7)
  ids = (np_rng.integers(0, 2, (2, 5)), np_rng.integers(0, 2, (2, 7)))
  np.testing.assert_allclose(
      dot_product_attention(q, k, v, segment_ids=ids), np_attention(q, k, v, segment_ids=ids)[0],
      rtol=1e-5, atol=1e-5,
  )


def test_no_attention_across_segments(np_rng):
  q, k, v = qkv(np_rng, b=1, t=10)
  seg = np.array([[1] * 4 + [2] * 6])
  out = dot_product_attention(q, k, v, is_causal=True, segment_ids=seg)
  v2 = v.copy()
  v2[:, :4] = np_rng.standard_normal(v2[:, :4].shape)  # change only document 1's values
  out2 = dot_product_attention(q, k, v2, is_causal=True, segment_ids=seg)
  np.testing.assert_array_equal(out[:, 4:], out2[:, 4:])


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
def test_fully_masked_rows_output_zero(np_rng, softmax):
  q, k, v = qkv(np_rng)
  sinks = jnp.asarray(random_sinks(np_rng, 4)) if softmax == "learned_sink" else None
  mask = np.ones((2, 1, 9, 9), bool)
  mask[:, :, 3] = False
  out = np.asarray(dot_product_attention(q, k, v, softmax=softmax, mask=mask, sinks=sinks))
  np.testing.assert_array_equal(out[:, 3], 0.0)
  grads = jax.grad(lambda q, k, v, c: jnp.sum(
      dot_product_attention(q, k, v, softmax=softmax, mask=mask, sinks=c) ** 2),
      argnums=(0, 1, 2))(q, k, v, sinks)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def _softmax1_via_zero_key(q, k, v, is_causal, scale):
  """softmax-1 attention == softmax attention with an extra all-zero key and value at index 0."""
  b, _, kh, h = k.shape
  t, s = q.shape[1], k.shape[1]
  zero = jnp.zeros((b, 1, kh, h), k.dtype)
  k1, v1 = jnp.concatenate([zero, k], 1), jnp.concatenate([zero, v], 1)
  allowed = jnp.tril(jnp.ones((t, s), bool)) if is_causal else jnp.ones((t, s), bool)
  allowed = jnp.concatenate([jnp.ones((t, 1), bool), allowed], axis=1)
  return jax.nn.dot_product_attention(q, k1, v1, mask=allowed[None, None], scale=scale)


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_match_jax_nn_with_a_zero_key(np_rng, is_causal):
  q, k, v = qkv(np_rng, n=4, k=2)
  w = np_rng.standard_normal(q.shape).astype(np.float32)
  ours = lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, is_causal=is_causal))
  theirs = lambda q, k, v: jnp.sum(w * _softmax1_via_zero_key(q, k, v, is_causal, 0.25))
  # Outputs entry by entry: the weighted sum `ours` cancels (seed 1872005539: -0.101 from terms
  # whose sizes add to 375), so its relative error says nothing about attention's. An output is a
  # convex combination of values, so its float32 error scales with the largest one.
  out_theirs = np.asarray(_softmax1_via_zero_key(q, k, v, is_causal, 0.25))
  np.testing.assert_allclose(dot_product_attention(q, k, v, is_causal=is_causal), out_theirs,
                             rtol=1e-5, atol=1e-6 * float(np.abs(out_theirs).max()))
  for g_ours, g_theirs in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(theirs, (0, 1, 2))(q, k, v)):
    # Two float32 algorithms: an entry near zero is a difference of O(|g|) terms, so its error
    # scales with the gradient's size, not its own (a fixed 1e-5 failed once in ~1000 draws).
    scale = float(np.abs(g_theirs).max())
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_gradients_numerically_in_float64(np_rng):
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(a, jnp.float64) for a in qkv(np_rng, b=1, t=5, n=2, k=1, h=4))
    fn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=True)
    jax.test_util.check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-4)
    # Learned sinks: the sinks' gradient too, forward and reverse mode (custom_jvp rule).
    sinks = jnp.asarray(np_rng.standard_normal(2), jnp.float64)
    fn = lambda q, k, v, c: dot_product_attention(q, k, v, is_causal=True,
                                                  softmax="learned_sink", sinks=c)
    jax.test_util.check_grads(fn, (q, k, v, sinks), order=1, modes=["fwd", "rev"], eps=1e-4)


def test_numpy_reference_gradients_match_finite_differences(np_rng):
  """The hand-written float64 numpy backward (the oracle of every path) against central finite
  differences of the numpy forward, including the learned sinks' gradient."""
  b, t, n, kh, h = 1, 6, 4, 2, 3
  q, k, v = (a.astype(np.float64) for a in qkv(np_rng, b=b, t=t, n=n, k=kh, h=h))
  w = np_rng.standard_normal(q.shape)
  sinks = random_sinks(np_rng, n).astype(np.float64)
  sinks[-1] = -2.0  # a sink whose share is not negligible, so every head's gradient is sizeable
  seg = np.array([[1, 1, 1, 2, 2, 2]])
  opts = dict(softmax="learned_sink", is_causal=True, segment_ids=seg)

  def loss(q, k, v, c):
    return float(np.sum(w * np_attention(q, k, v, sinks=c, **opts)[0]))

  want = np_attention_grads(q, k, v, w, sinks=sinks, **opts)[1:]
  args, eps = [q, k, v, sinks], 1e-6
  for i, (arg, grad) in enumerate(zip(args, want)):
    numeric = np.zeros_like(arg)
    for idx in np.ndindex(arg.shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=f"argument {i}")


@pytest.mark.parametrize("is_causal,segments", [(True, True), (False, False)])
def test_learned_sink_gradients_match_numpy(np_rng, is_causal, segments):
  # float32 XLA autodiff (through the custom_jvp of the normaliser) against the float64 analytic
  # gradient; grouped-query heads, T >= MIN_BLOCKED_LEN so causal runs the blocked path.
  t = MIN_BLOCKED_LEN
  q, k, v = qkv(np_rng, b=2, t=t, n=4, k=2, h=8)
  w = np_rng.standard_normal(q.shape).astype(np.float32)
  sinks = random_sinks(np_rng, 4)
  seg = np.sort(np_rng.integers(0, 3, size=(2, t)), axis=1) if segments else None
  opts = dict(softmax="learned_sink", is_causal=is_causal, segment_ids=seg)
  loss = lambda q, k, v, c: jnp.sum(w * dot_product_attention(q, k, v, sinks=c, **opts))
  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, jnp.asarray(sinks))
  want = np_attention_grads(q, k, v, w, sinks=sinks, **opts)
  for name, g, x in zip(("dq", "dk", "dv"), got, want[1:4]):
    np.testing.assert_allclose(g, x, rtol=1e-4, atol=2e-5, err_msg=name)
  np.testing.assert_allclose(got[3], want[4], rtol=1e-5, atol=sink_grad_atol(w, want[0]))


IMPLEMENTATIONS = ["xla", "pallas_gpu", "pallas_tpu"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_learned_sink_limits_are_softmax1_and_softmax(np_rng, implementation):
  """Property, on every path: sinks of 0 give softmax-1 and sinks of -1e9 give softmax (outputs
  and q/k/v gradients), causal with packed documents and grouped-query heads."""
  q, k, v = qkv(np_rng, b=2, t=20, n=4, k=2, h=16)
  w = np_rng.standard_normal(q.shape).astype(np.float32)
  seg = jnp.asarray(np.sort(np_rng.integers(0, 3, size=(2, 20)), axis=1), jnp.int32)

  def out_and_grads(softmax, sinks=None):
    def loss(q, k, v):
      out = dot_product_attention(q, k, v, softmax=softmax, sinks=sinks, is_causal=True,
                                  segment_ids=seg, implementation=implementation, interpret=True)
      return jnp.sum(w * out), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return (out, *grads)

  for sink, kind in [(0.0, "softmax1"), (-1e9, "softmax")]:
    got = out_and_grads("learned_sink", jnp.full((4,), sink, jnp.float32))
    for name, g, x in zip(("out", "dq", "dk", "dv"), got, out_and_grads(kind)):
      np.testing.assert_allclose(g, x, rtol=1e-6, atol=1e-6, err_msg=f"{kind}: {name}")


def test_bfloat16(np_rng):
  q, k, v = qkv(np_rng)
  qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  out = dot_product_attention(qb, kb, vb, is_causal=True)
  assert out.dtype == jnp.bfloat16
  want, _ = np_attention(*(np.asarray(a, np.float32) for a in (qb, kb, vb)), is_causal=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)


def test_clear_errors(np_rng):
  q, k, v = qkv(np_rng, n=4, k=3)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    dot_product_attention(q, k, v)
  q, k, v = qkv(np_rng)
  with pytest.raises(ValueError, match="implementation='cuda' is not known"):
    dot_product_attention(q, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="softmax='relu' is not known"):
    dot_product_attention(q, k, v, softmax="relu")
  with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
    dot_product_attention(q[0], k, v)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sinks_rule_errors(np_rng, implementation):
  # One rule on every path: learned_sink needs [N] sinks, the other kinds take none.
  q, k, v = qkv(np_rng)
  opts = dict(implementation=implementation, interpret=True)
  with pytest.raises(ValueError, match="softmax='learned_sink' needs the sink logits: pass sinks="):
    dot_product_attention(q, k, v, softmax="learned_sink", **opts)
  for kind in ("softmax1", "softmax"):
    with pytest.raises(ValueError, match=f"softmax='{kind}' takes no sinks"):
      dot_product_attention(q, k, v, softmax=kind, sinks=jnp.zeros(4), **opts)
  with pytest.raises(ValueError, match=r"sinks has shape \(2,\); expected \(4,\)"):
    dot_product_attention(q, k, v, softmax="learned_sink", sinks=jnp.zeros(2), **opts)


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
@pytest.mark.parametrize("query_blocks", [2, 3, 4])
def test_causal_query_blocks_match_numpy_and_reference_gradients(np_rng, softmax, query_blocks):
  # The blocked causal path (each query block sees only its key prefix) against float64 numpy,
  # with packed documents, grouped-query heads and a length the blocks divide; learned sinks'
  # gradients are summed over the blocks.
  t = 12
  q, k, v = qkv(np_rng, t=t, n=4, k=2)
  sinks = random_sinks(np_rng, 4) if softmax == "learned_sink" else None
  seg = np.sort(np_rng.integers(0, 3, size=(2, t)), axis=1)
  opts = dict(softmax=softmax, is_causal=True, segment_ids=seg)
  got = xla_attention(q, k, v, query_blocks=query_blocks, sinks=sinks, **opts)
  want, _ = np_attention(q, k, v, sinks=sinks, **opts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  w = np_rng.standard_normal(q.shape).astype(np.float32)
  blocked = lambda q, k, v, c: jnp.sum(w * xla_attention(
      q, k, v, query_blocks=query_blocks, sinks=c, **opts))
  full = lambda q, k, v, c: jnp.sum(w * reference_attention(q, k, v, sinks=c, **opts))
  argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
  for g_blocked, g_full in zip(jax.grad(blocked, argnums)(q, k, v, sinks),
                               jax.grad(full, argnums)(q, k, v, sinks)):
    np.testing.assert_allclose(g_blocked, g_full, rtol=1e-5, atol=1e-5)


def test_default_xla_path_blocks_long_causal_self_attention(np_rng):
  # From MIN_BLOCKED_LEN tokens on, dot_product_attention's XLA path splits the queries in two;
  # the result is still the numpy attention.
  t = MIN_BLOCKED_LEN
  assert default_query_blocks(t, t) == 2 and default_query_blocks(t - 1, t - 1) == 1
  q, k, v = qkv(np_rng, b=1, t=t, n=2, k=2, h=8)
  got = dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  np.testing.assert_allclose(got, np_attention(q, k, v, is_causal=True)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="query_blocks=5 must be a positive divisor"):
    xla_attention(q, k, v, is_causal=True, query_blocks=5)
