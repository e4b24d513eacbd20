"""First-token statistics from (lse, row_max, first_logit) against float64 numpy probabilities.

"First" is each query's first visible key: with packed documents the first token of its own
document. The decision is tested on inputs whose dot products are exact in float32 (and in
bfloat16 inputs), so every path computes exactly the scores float64 computes and must give its
answer on exact ties and one-ulp near-ties (``reference_np.tie_case``, which gives every
document's first key the same tie-prone score); on random inputs only rows whose float64 margin
exceeds float32's error bound are compared.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import attention_stats, first_token_stats
from softmax_one_jax.attention import pallas_gpu
from softmax_one_jax.attention import stats as stats_lib
from tests.attention.reference_np import (KEY0_SCORE, assert_ties_present, np_attention,
                                          np_attention_parts, np_decidable, np_first_and_rest,
                                          np_first_token, np_first_visible, np_logits,
                                          np_null_logits, packed_segment_ids, random_sinks,
                                          tie_case)

IMPLEMENTATIONS = ("xla", "chunked", "pallas")
EPS32 = float(np.finfo(np.float32).eps)
# In float32, 14 * 0.3 == (14 + 2^-20) * 0.3: scaling merges key 0's score with a rival one
# ulp above it, so only a decision taken before the scaling gets those rows right.
MERGING_SCALE = 0.3
assert np.float32(KEY0_SCORE) * np.float32(MERGING_SCALE) == (
    np.float32(KEY0_SCORE + 2.0**-20) * np.float32(MERGING_SCALE))


def np_stats(q, k, softmax, sinks=None, **kwargs):
  """float64 ``(lse, row_max, first_logit)``; the null key (softmax-1, learned sinks) is an
  explicit extra column of ``lse``, never of ``row_max``; ``first_logit`` is the first visible
  key's."""
  logits = np_logits(q, k, **kwargs)
  row_max = logits.max(axis=-1)
  null = np_null_logits(softmax, logits.shape[1], sinks)
  with np.errstate(divide="ignore"):
    if null is not None:
      null_col = np.broadcast_to(null[None, :, None, None], logits.shape[:-1] + (1,))
      lse = np.logaddexp.reduce(np.concatenate([null_col, logits], -1), axis=-1)
    else:
      lse = np.logaddexp.reduce(logits, axis=-1)
  return lse, row_max, np_first_and_rest(logits)[0]


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


def prob_tol(q, k, softmax, sinks=None, **kwargs):
  """``[B, N, T]`` relative tolerance of ``prob_first`` and ``null_mass`` in float32.

  ``p = exp(x - lse)`` with exact (or half-ulp) logits: ``lse`` sums ``S + 1`` exponentials,
  each within about 2 ulps (relative error <= ``(S + 2) eps``), its log and the additions of the
  row max (in log2 units on the Pallas path: two more roundings of a number of size ``1.44 L``)
  add a few ulps of ``L = max(|lse|, |logits|, |c|)``; ``exp`` turns the absolute error of
  ``x - lse`` into that relative error of ``p``, plus its own ulp. Twice that bound.
  """
  lse, row_max, _ = np_stats(q, k, softmax, sinks, **kwargs)
  big = np.maximum(np.where(np.isfinite(lse), np.abs(lse), 0.0),
                   np.where(np.isfinite(row_max), np.abs(row_max), 0.0))
  null = np_null_logits(softmax, q.shape[2], sinks)
  if null is not None:
    big = np.maximum(big, np.abs(null)[None, :, None])
  return 2 * EPS32 * (k.shape[1] + 4 + 6 * big)


def tie_inputs(rng, b=2, t=20, segments=None, **opts):
  """``(q, k, opts)``: a ``tie_case`` whose documents' first keys all score 14, with segment ids
  in ``opts``: "self" (two documents), "packed" (four documents and some padding per row) or
  "cross" (query and key ids differ: some queries see no key at all)."""
  if segments == "self":
    opts["segment_ids"] = np.sort(rng.integers(0, 2, (b, t)), axis=1).astype(np.int32)
  elif segments == "packed":
    opts["segment_ids"] = packed_segment_ids(rng, b, t)
  elif segments == "cross":
    opts["segment_ids"] = (np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32),
                           np.sort(rng.integers(1, 3, (b, t)), axis=1).astype(np.int32))
  q, k = tie_case(rng, b=b, t=t, s=t, segment_ids=opts.get("segment_ids"))
  return q, k, opts


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
  assert_stats_close(got[:3], want)
  want_hit, _, _ = np_first_token(q, k, is_causal=True, segment_ids=ids)
  ok = np_decidable(q, k, is_causal=True, segment_ids=ids)
  np.testing.assert_array_equal(np.asarray(got[3])[ok], want_hit[ok])


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
  pos, _ = np_first_visible(logits)  # the mask hides key 0 (and others) from some queries
  assert (pos > 0).any()
  want_p = np.take_along_axis(probs, pos[..., None], -1)[..., 0]
  np.testing.assert_allclose(got["prob_first"], want_p, rtol=1e-5, atol=1e-6)
  # The argmax is over real keys only: the null key never counts, whatever its logit. Rows
  # closer to a tie than float32 can resolve are left to the exact-score tests.
  first, rest = np_first_and_rest(logits)
  want_argmax = np.isfinite(first) & (first >= rest)
  ok = np_decidable(q, k, is_causal=True, segment_ids=ids, mask=mask, scale=0.3)
  assert want_argmax[ok].any() and not want_argmax[ok].all() and ok.mean() > 0.95
  assert want_argmax[ok & (pos > 0)].any()
  np.testing.assert_array_equal(np.asarray(got["argmax_first"])[ok], want_argmax[ok])
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
  pos, _ = np_first_visible(np_logits(q, k, is_causal=True, segment_ids=ids))
  probs_first = np.take_along_axis(probs, pos[..., None], -1)[..., 0]  # the document's first key
  # p = exp(s_f - lse): the kernel's lse and its logit s_f are float32, rounded on separate
  # paths (the kernel works in base 2). A float32 dot product q.k is exact to a few ulps of
  # sum_h |q_h k_h|, so s_0 - lse carries an absolute error of a few ulps of the row's largest
  # such sum (or of |lse|), and p that error relative to itself.
  lse, _, _ = np_stats(q, k, "softmax1", is_causal=True, segment_ids=ids)
  abs_logits = np_logits(np.abs(q), np.abs(k), is_causal=True, segment_ids=ids)
  size = np.maximum(np.nan_to_num(np.abs(lse), posinf=0.0),
                    np.where(np.isinf(abs_logits), 0.0, abs_logits).max(axis=-1))
  ulps = 8 * np.finfo(np.float32).eps * size
  tol = 1e-6 + probs_first * ulps
  assert np.all(np.abs(np.asarray(got["prob_first"], np.float64) - probs_first) <= tol)
  np.testing.assert_allclose(got["null_mass"], 1.0 - probs.sum(axis=-1), rtol=1e-5, atol=1e-6)


def test_dense_mask_needs_xla():
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="dense"):
    attention_stats(q, q, mask=jnp.ones((4, 4), bool), implementation="chunked")


@pytest.mark.parametrize("platform,want", [("gpu", "chunked"), ("tpu", "chunked"),
                                            ("cpu", "xla")])
def test_statistics_are_their_own_pass_whichever_path_ran_the_forward(monkeypatch, platform,
                                                                       want):
  """On GPUs the forward is cuDNN's, which returns no logsumexp the diagnostics can use: the
  statistics default to the chunked scan over q and k (any platform), never to a kernel's
  residual; a dense mask takes the XLA path."""
  monkeypatch.setattr(stats_lib, "target_platform", lambda: platform)
  assert stats_lib._pick(None, None) == want   # pylint: disable=protected-access
  assert stats_lib._pick(None, jnp.ones((1, 1), bool)) == "xla"   # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# One answer on every path: exact scores, exact ties and one-ulp near-ties, float64 as the judge.


TIE_CASES = [
    ("softmax1", dict(is_causal=True)),
    ("softmax", dict(segments="cross")),  # not causal; some queries see no key, or not key 0
    ("learned_sink", dict(is_causal=True, segments="self")),
    ("softmax1", dict(scale=MERGING_SCALE)),  # rounding the scaled scores ties 14 and 14 + ulp
    ("softmax", dict(is_causal=True, scale=-0.25)),  # the argmax is the smallest product
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softmax,opts", TIE_CASES,
                         ids=["softmax1-causal", "softmax-cross", "sink-causal-self",
                              "merging-scale", "negative-scale"])
def test_first_token_stats_agree_with_float64_on_ties(np_rng, dtype, softmax, opts):
  """Hits equal float64's exactly on every path (so across paths), prob_first and null_mass
  within ``prob_tol``, and attention_stats' ``first_logit >= row_max`` is the same decision."""
  q, k, opts = tie_inputs(np_rng, **opts)
  if opts.get("scale", 0.25) > 0:  # a negative scale turns the ties into the row's minimum
    assert_ties_present(q, k, **opts)
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  want_hit, want_p, want_null = np_first_token(q, k, softmax=softmax, sinks=sinks, **opts)
  tol = prob_tol(q, k, softmax, sinks, **opts)
  assert want_hit.any() and not want_hit.all()
  qx, kx = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  assert np.array_equal(np.asarray(qx, np.float32), q)  # exact in bfloat16 too
  hits = {}
  for impl in IMPLEMENTATIONS:
    kw = dict(softmax=softmax, sinks=sinks, implementation=impl, interpret=True, **opts)
    got = first_token_stats(qx, kx, **kw)
    hits[impl] = np.asarray(got["argmax_first"])
    np.testing.assert_array_equal(hits[impl], want_hit, err_msg=impl)
    p = np.asarray(got["prob_first"], np.float64)
    assert np.all(np.abs(p - want_p) <= tol * want_p + 1e-30), impl
    if softmax == "softmax":
      assert "null_mass" not in got
    else:
      null = np.asarray(got["null_mass"], np.float64)
      assert np.all(np.abs(null - want_null) <= tol * want_null + 1e-30), impl
    # attention_stats' contract: a finite first_logit >= row_max is the same decision.
    _, row_max, first = attention_stats(qx, kx, **kw)
    first, row_max = np.asarray(first), np.asarray(row_max)
    np.testing.assert_array_equal(np.isfinite(first) & (first >= row_max), want_hit,
                                  err_msg=impl)
  assert all(np.array_equal(hits["xla"], h) for h in hits.values())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("softmax", ["softmax", "softmax1", "learned_sink"])
def test_packed_documents_decide_on_each_documents_first_key(np_rng, dtype, softmax):
  """Causal attention over four packed documents per row (and padding): each query's first key
  is its own document's, which ties or near-ties (one ulp) other keys of that document. The
  documents span several chunks / key tiles (8 / 16 keys), so the first key often lies in an
  earlier chunk or tile than the row max, and later documents start inside a chunk or tile.
  Every path gives float64's hits, and its row max and first logit exactly (exact scores)."""
  q, k, opts = tie_inputs(np_rng, t=40, segments="packed", is_causal=True)
  assert_ties_present(q, k, later_documents=True, **opts)
  sinks = random_sinks(np_rng, q.shape[2]) if softmax == "learned_sink" else None
  logits = np_logits(q, k, **opts)
  pos, _ = np_first_visible(logits)
  want_hit, want_p, want_null = np_first_token(q, k, softmax=softmax, sinks=sinks, **opts)
  later = pos > 0  # queries of a document that does not start at key 0
  assert want_hit[later].any() and not want_hit[later].all()
  want_max, want_first = logits.max(axis=-1), np_first_and_rest(logits)[0]
  qx, kx = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  ids = opts["segment_ids"]
  sinks_n = {"softmax": None, "softmax1": jnp.zeros(q.shape[2]),
             "learned_sink": None if sinks is None else jnp.asarray(sinks)}[softmax]
  paths = {
      "xla": stats_lib._xla_stats(qx, kx, sinks_n, True, ids, None, None),
      "chunked": stats_lib._chunked_stats(qx, kx, sinks_n, True, ids, None, chunk=8),
      "pallas": pallas_gpu.flash_stats(qx, kx, softmax=softmax, sinks=sinks, interpret=True,
                                       block_sizes=pallas_gpu.BlockSizes(block_q=16, block_k=16),
                                       **opts),
  }
  for name, (_, row_max, first, hit) in paths.items():
    np.testing.assert_array_equal(hit, want_hit, err_msg=name)
    np.testing.assert_array_equal(row_max, want_max, err_msg=name)  # exact scores, scale 1/4
    np.testing.assert_array_equal(first, want_first, err_msg=name)
  # Through the public entry with each path's default chunk / tiles: the same hits, and the
  # probability on each document's first key.
  tol = prob_tol(q, k, softmax, sinks, **opts)
  for impl in IMPLEMENTATIONS:
    got = first_token_stats(qx, kx, softmax=softmax, sinks=sinks, implementation=impl,
                            interpret=True, **opts)
    np.testing.assert_array_equal(got["argmax_first"], want_hit, err_msg=impl)
    p = np.asarray(got["prob_first"], np.float64)
    assert np.all(np.abs(p - want_p) <= tol * want_p + 1e-30), impl
    if softmax != "softmax":
      null = np.asarray(got["null_mass"], np.float64)
      assert np.all(np.abs(null - want_null) <= tol * want_null + 1e-30), impl


def test_dense_mask_decision_on_xla(np_rng):
  """A dense mask hides key 0 from some queries (their first key is the first one the mask
  allows) and the best key from others."""
  q, k = tie_case(np_rng)
  mask = np_rng.random((2, 1, 20, 20)) < 0.7
  assert_ties_present(q, k, mask=mask)
  want_hit, want_p, _ = np_first_token(q, k, softmax="softmax", mask=mask)
  pos, _ = np_first_visible(np_logits(q, k, mask=mask))
  assert want_hit[pos > 0].any() and not want_hit[pos > 0].all()
  got = first_token_stats(q, k, softmax="softmax", mask=mask, implementation="xla")
  np.testing.assert_array_equal(got["argmax_first"], want_hit)
  np.testing.assert_allclose(got["prob_first"], want_p, rtol=1e-5, atol=0)
