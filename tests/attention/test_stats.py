"""First-token statistics from (lse, row_max, first_logit) against float64 numpy probabilities."""

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import attention_stats, first_token_stats
from softmax_one_jax.attention import stats as stats_lib
from tests.attention.reference_np import (np_allowed, np_attention, np_attention_parts,
                                          np_null_logits, random_sinks)


def np_logits(q, k, *, is_causal=False, segment_ids=None, mask=None, scale=None):
  """float64 ``[B, N, T, S]`` logits with ``-inf`` where masked, written out per head."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  allowed = np_allowed(b, n, t, s, is_causal=is_causal, segment_ids=segment_ids, mask=mask)
  logits = np.stack([np.einsum("bth,bsh->bts", q[:, :, ni], k[:, :, ni // (n // kh)]) * scale
                     for ni in range(n)], axis=1)
  return np.where(allowed, logits, -np.inf)


def np_stats(q, k, softmax, sinks=None, **kwargs):
  """float64 ``(lse, row_max, first_logit)``; the null key (softmax-1, learned sinks) is an
  explicit extra column of ``lse``, never of ``row_max``."""
  logits = np_logits(q, k, **kwargs)
  row_max = logits.max(axis=-1)
  null = np_null_logits(softmax, logits.shape[1], sinks)
  with np.errstate(divide="ignore"):
    if null is not None:
      null_col = np.broadcast_to(null[None, :, None, None], logits.shape[:-1] + (1,))
      lse = np.logaddexp.reduce(np.concatenate([null_col, logits], -1), axis=-1)
    else:
      lse = np.logaddexp.reduce(logits, axis=-1)
  return lse, row_max, logits[..., 0]


def case(rng, b=2, t=20, s=20, n=4, kh=2, h=32, segments="self"):
  q = rng.standard_normal((b, t, n, h)).astype(np.float32) * 2
  k = rng.standard_normal((b, s, kh, h)).astype(np.float32) * 2
  k[:, 0] *= 3  # make key 0 the argmax for some queries and not for others
  ids = None
  if segments == "self":
    ids = np.sort(rng.integers(0, 2, (b, t)), axis=1).astype(np.int32)
  elif segments == "cross":  # some queries see no key at all
    ids = (np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32),
           np.sort(rng.integers(1, 3, (b, s)), axis=1).astype(np.int32))
  return q, k, ids


def assert_stats_close(got, want):
  for g, w in zip(got, want):
    g = np.asarray(g, np.float64)
    np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
    finite = np.isfinite(w)
    np.testing.assert_allclose(g[finite], w[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "pallas"])
@pytest.mark.parametrize("softmax,is_causal,segments",
                         [("softmax1", True, "self"), ("softmax", False, "cross"),
                          ("learned_sink", True, "cross")])
def test_attention_stats_match_numpy(np_rng, implementation, softmax, is_causal, segments):
  q, k, ids = case(np_rng, segments=segments)
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  got = attention_stats(q, k, softmax=softmax, sinks=sinks, is_causal=is_causal, segment_ids=ids,
                        implementation=implementation, interpret=True)
  assert_stats_close(got, np_stats(q, k, softmax, sinks, is_causal=is_causal, segment_ids=ids))


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_chunked_stats_over_many_chunks(np_rng, softmax):
  q, k, ids = case(np_rng, t=30, s=45, segments="cross")
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  sinks_n = np.zeros(q.shape[2], np.float32) if sinks is None else sinks
  got = stats_lib._chunked_stats(jnp.asarray(q), jnp.asarray(k), jnp.asarray(sinks_n), True, ids,
                                 None, chunk=16)
  want = np_stats(q, k, softmax, sinks, is_causal=True, segment_ids=ids)
  assert_stats_close(got + (want[2],), want)


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
def test_first_token_stats_match_probabilities(np_rng, softmax):
  q, k, ids = case(np_rng, segments="cross")
  v = np_rng.standard_normal(k.shape)
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  mask = np_rng.random((2, 1, 20, 20)) < 0.9
  opts = dict(softmax=softmax, sinks=sinks, is_causal=True, segment_ids=ids, mask=mask,
              scale=0.3)
  got = first_token_stats(q, k, **opts)
  _, probs, null = np_attention_parts(q, k, v, **opts)
  logits = np_logits(q, k, is_causal=True, segment_ids=ids, mask=mask, scale=0.3)
  np.testing.assert_allclose(got["prob_first"], probs[..., 0], rtol=1e-5, atol=1e-6)
  # The argmax is over real keys only: the null key never counts, whatever its logit.
  want_argmax = np.isfinite(logits[..., 0]) & (logits[..., 0] >= logits.max(axis=-1))
  assert want_argmax.any() and not want_argmax.all()
  np.testing.assert_array_equal(got["argmax_first"], want_argmax)
  if softmax == "softmax":
    assert "null_mass" not in got
  else:  # the null key's share: exp(c - lse) = 1 - sum_j p_j
    np.testing.assert_allclose(got["null_mass"], null, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["null_mass"], 1.0 - probs.sum(axis=-1), rtol=1e-5, atol=1e-6)


def test_pallas_stats_through_first_token_stats(np_rng):
  q, k, ids = case(np_rng, segments="self")
  v = np_rng.standard_normal(k.shape)
  got = first_token_stats(q, k, is_causal=True, segment_ids=ids, implementation="pallas",
                          interpret=True)
  _, probs = np_attention(q, k, v, is_causal=True, segment_ids=ids)
  # p = exp(s_0 - lse): the kernel's lse and the XLA logit s_0 are float32, rounded on separate
  # paths (the kernel works in base 2). A float32 dot product q.k is exact to a few ulps of
  # sum_h |q_h k_h|, so s_0 - lse carries an absolute error of a few ulps of the row's largest
  # such sum (or of |lse|), and p that error relative to itself.
  lse, _, _ = np_stats(q, k, "softmax1", is_causal=True, segment_ids=ids)
  abs_logits = np_logits(np.abs(q), np.abs(k), is_causal=True, segment_ids=ids)
  size = np.maximum(np.nan_to_num(np.abs(lse), posinf=0.0),
                    np.where(np.isinf(abs_logits), 0.0, abs_logits).max(axis=-1))
  ulps = 8 * np.finfo(np.float32).eps * size
  tol = 1e-6 + probs[..., 0] * ulps
  assert np.all(np.abs(np.asarray(got["prob_first"], np.float64) - probs[..., 0]) <= tol)
  np.testing.assert_allclose(got["null_mass"], 1.0 - probs.sum(axis=-1), rtol=1e-5, atol=1e-6)


def test_dense_mask_needs_xla():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="dense"):
    attention_stats(q, q, mask=jnp.ones((4, 4), bool), implementation="chunked")


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_forward_kernel_returns_output_and_stats_in_one_pass(np_rng, softmax):
  from softmax_one_jax.attention import pallas_gpu  # pylint: disable=g-import-not-at-top

  q, k, ids = case(np_rng, t=33, s=33, segments="self")
  v = np_rng.standard_normal(k.shape).astype(np.float32)
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  opts = dict(softmax=softmax, sinks=sinks, is_causal=True, segment_ids=ids)
  out, lse, row_max = pallas_gpu.flash_attention_with_stats(q, k, v, interpret=True, **opts)
  want_out, _ = np_attention(q, k, v, **opts)
  np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-5)
  want_lse, want_max, _ = np_stats(q, k, softmax, sinks, is_causal=True, segment_ids=ids)
  assert_stats_close((lse, row_max), (want_lse, want_max))
