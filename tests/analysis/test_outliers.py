"""Outlier metrics against float64 numpy references on synthetic data with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.analysis import extreme_tokens as E
from softmax_one_jax.analysis import outliers as O
from softmax_one_jax.analysis import sums as S
from softmax_one_jax.analysis.layout import counted_queries, document_layout
from softmax_one_jax.attention import attention_stats, first_token_stats
from softmax_one_jax.models.intermediates import with_intermediates
from tests.attention.reference_np import (assert_ties_present, np_decidable,
                                          np_first_token, tie_case)


def _np_kurtosis(x):
  x = np.asarray(x, np.float64)
  c = x - x.mean(-1, keepdims=True)
  return (c**4).mean(-1) / (c**2).mean(-1) ** 2


def _np_layout(seg):
  """Reference (loops): first key of each token's document, is-first, valid."""
  b, t = seg.shape
  first = np.zeros((b, t), int)
  is_first = np.zeros((b, t), bool)
  for i in range(b):
    for j in range(t):
      s = j
      while s > 0 and seg[i, s - 1] == seg[i, j]:
        s -= 1
      first[i, j] = s
      is_first[i, j] = s == j and seg[i, j] != 0
  return first, is_first, seg != 0


def _random_segments(rng, b, t):
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - 2), size=2, replace=False))
    seg[i, :cuts[0]], seg[i, cuts[0]:cuts[1]], seg[i, cuts[1]:] = 1, 2, 3
    seg[i, t - rng.integers(0, 3):] = 0  # some padding at the end
  return seg


def test_document_layout_matches_loops():
  rng = np.random.default_rng(0)
  seg = _random_segments(rng, 3, 12)
  first, is_first, valid = document_layout(jnp.asarray(seg), 3, 12)
  ref = _np_layout(seg)
  np.testing.assert_array_equal(np.asarray(first)[ref[2]], ref[0][ref[2]])
  np.testing.assert_array_equal(np.asarray(is_first), ref[1])
  np.testing.assert_array_equal(np.asarray(valid), ref[2])


def test_kurtosis_gaussian_is_about_three_and_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 1024)).astype(np.float32) * 5.0 + 2.0
  k = np.asarray(S.token_kurtosis(jnp.asarray(x)))
  np.testing.assert_allclose(k, _np_kurtosis(x), rtol=1e-4)
  assert abs(k.mean() - 3.0) < 0.1  # sampling sd of the mean is about 0.02


def test_kurtosis_planted_outlier_channel_is_large():
  rng = np.random.default_rng(2)
  d = 256
  x = rng.normal(size=(8, d)).astype(np.float32)
  x[:, 17] = 200.0
  k = np.asarray(S.token_kurtosis(jnp.asarray(x)))
  np.testing.assert_allclose(k, _np_kurtosis(x), rtol=1e-4)
  # One spike among D values: kurtosis -> D - 2 + 1/(D - 1) as the spike dominates.
  assert np.all(k > 0.9 * (d - 2))


def test_hidden_state_sums_first_vs_rest_with_segments():
  rng = np.random.default_rng(3)
  l, b, t, d = 3, 2, 16, 64
  h = rng.normal(size=(l, b, t, d)).astype(np.float32)
  seg = _random_segments(rng, b, t)
  _, is_first, valid = _np_layout(seg)
  h[:, is_first, 5] = 300.0  # massive activation on each document's first token
  sums = S.hidden_state_sums(jnp.asarray(h), jnp.asarray(seg))
  rest = valid & ~is_first
  k = _np_kurtosis(h)
  np.testing.assert_allclose(sums["kurt_first"], k[:, is_first].sum(-1), rtol=1e-4)
  np.testing.assert_allclose(sums["kurt_rest"], k[:, rest].sum(-1), rtol=1e-4)
  assert float(sums["n_first"]) == is_first.sum() and float(sums["n_rest"]) == rest.sum()
  np.testing.assert_allclose(sums["max_first"], np.abs(h[:, is_first]).max((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(sums["max_rest"], np.abs(h[:, rest]).max((1, 2)), rtol=1e-6)
  np.testing.assert_allclose(sums["max_chan_rest"], np.abs(h[:, rest]).max(1), rtol=1e-6)
  rep = O.finalize(sums)
  assert rep.scalars["kurtosis_first"] > 0.9 * (d - 2)
  assert abs(rep.scalars["kurtosis_rest"] - 3.0) < 0.5
  assert rep.scalars["max_abs_first"] == pytest.approx(300.0)


def _causal_probs(rng, l, b, n, t, seg=None, softmax1=False):
  logits = rng.normal(size=(l, b, n, t, t)) * 2.0
  mask = np.tril(np.ones((t, t), bool))[None, None, None]
  if seg is not None:
    mask = mask & (seg[:, :, None] == seg[:, None, :])[None, :, None]
  z = np.where(mask, logits, -np.inf)
  m = np.max(z, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  if softmax1:
    m = np.maximum(m, 0.0)
  e = np.where(mask, np.exp(z - m), 0.0)
  denom = e.sum(-1, keepdims=True) + (np.exp(-m) if softmax1 else 0.0)
  denom = np.where(denom == 0, 1.0, denom)
  lse = (m + np.log(denom))[..., 0]
  return logits, mask, e / denom, lse


def _assert_clear_argmax(logits, mask, gap=1e-3):
  """The fixed draw has no near-tie: in every row the best visible logit beats the second by
  more than ``gap``, far above float32 rounding, so float32 and float64 name the same argmax."""
  z = np.sort(np.where(mask, logits, -np.inf), axis=-1)
  with np.errstate(invalid="ignore"):
    margin = z[..., -1] - z[..., -2]
  assert np.all(~np.isfinite(margin) | (margin > gap)), "near-tie in the draw: pick another seed"


def _np_first_token(probs, seg, argmax_first=None):
  """Loop reference. A query's hit: ``argmax_first`` (logit-decided first-key flags) where
  given, else argmax over its probabilities (first index on ties); the mass is the probability
  on its document's first token."""
  l, b, n, t, _ = probs.shape
  first, is_first, valid = _np_layout(seg) if seg is not None else (
      np.zeros((b, t), int), np.arange(t)[None].repeat(b, 0) == 0, np.ones((b, t), bool))
  hits = np.zeros((l, n))
  mass = np.zeros((l, n))
  count = np.zeros((l, n))
  for li in range(l):
    for bi in range(b):
      for ni in range(n):
        for ti in range(t):
          if not valid[bi, ti] or is_first[bi, ti]:
            continue
          row = probs[li, bi, ni, ti]
          if argmax_first is not None:
            hits[li, ni] += argmax_first[li, bi, ni, ti]
          else:
            hits[li, ni] += np.argmax(row) == first[bi, ti]
          mass[li, ni] += row[first[bi, ti]]
          count[li, ni] += 1
  return hits, mass, count


@pytest.mark.parametrize("use_segments", [False, True])
def test_first_token_sums_from_probs_match_loops(use_segments):
  rng = np.random.default_rng(4)
  l, b, n, t = 2, 2, 3, 12
  seg = _random_segments(rng, b, t) if use_segments else None
  _, _, probs, _ = _causal_probs(rng, l, b, n, t, seg, softmax1=True)
  # Plant a sink: layer 1, head 2 puts almost everything on each document's first token.
  first = _np_layout(seg)[0] if use_segments else np.zeros((b, t), int)
  sink = np.zeros((b, t, t))
  sink[np.arange(b)[:, None], np.arange(t)[None], first] = 0.97
  probs[1, :, 2] = sink
  probs32 = probs.astype(np.float32)
  sums = S.first_token_sums_from_probs(jnp.asarray(probs32),
                                       None if seg is None else jnp.asarray(seg))
  # The judge reads the same float32 probabilities: ties (the planted rows) go to the first index.
  hits, mass, count = _np_first_token(probs32.astype(np.float64), seg)
  np.testing.assert_allclose(sums["ft_hits"], hits)
  np.testing.assert_allclose(sums["ft_mass"], mass, rtol=1e-5)
  np.testing.assert_allclose(sums["ft_count"], count)
  rep = O.finalize(sums)
  assert rep.per_head["first_token_attention"][1, 2] == 1.0  # the planted sink head: 100%
  assert rep.per_head["first_token_prob"][1, 2] == pytest.approx(0.97, rel=1e-6)


def test_first_token_diagonal_heads_score_zero():
  t = 8
  probs = np.eye(t)[None, None, None].repeat(2, 2)  # every query attends only to itself
  rep = O.finalize(S.first_token_sums_from_probs(jnp.asarray(probs, jnp.float32)))
  assert rep.scalars["first_token_attention"] == 0.0  # query 0 (trivially a hit) is excluded
  assert rep.scalars["first_token_prob"] == 0.0


@pytest.mark.parametrize("softmax1", [False, True])
def test_first_token_from_stats_equals_probs_path(softmax1):
  rng = np.random.default_rng(5)
  l, b, n, t = 2, 2, 4, 10
  logits, mask, probs, lse = _causal_probs(rng, l, b, n, t, softmax1=softmax1)
  _assert_clear_argmax(logits, mask)
  row_max = np.max(np.where(mask, logits, -np.inf), -1)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  stats = S.first_token_sums_from_stats(f32(logits[..., 0]), f32(row_max), f32(lse))
  ref = S.first_token_sums_from_probs(jnp.asarray(probs, jnp.float32))
  for key in ("ft_hits", "ft_count"):
    np.testing.assert_array_equal(stats[key], ref[key])
  np.testing.assert_allclose(stats["ft_mass"], ref["ft_mass"], rtol=1e-5)


def test_nll_sums_and_perplexity_match_numpy():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 5, 11)) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  w = (rng.random((2, 5)) > 0.3).astype(np.float32)
  s = S.nll_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(w))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(s["nll"]), (nll * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(O.finalize(s).scalars["perplexity"], np.exp((nll * w).sum() / w.sum()),
                             rtol=1e-5)


def test_combine_sums_adds_and_maxes():
  a = {"n_rest": jnp.array(2.0), "max_rest": jnp.array([1.0, 5.0])}
  b = {"n_rest": jnp.array(3.0), "max_rest": jnp.array([4.0, 2.0])}
  c = S.combine_sums(a, b)
  assert float(c["n_rest"]) == 5.0 and c["max_rest"].tolist() == [4.0, 5.0]
  with pytest.raises(ValueError, match="different entries"):
    S.combine_sums(a, {"n_rest": 1.0})


# ----------------------------------------------------------------------------------------------
# Against a real model: the jitted scan over batches equals numpy on the model's intermediates.


@pytest.fixture(scope="module")
def tiny_model():
  from softmax_one_jax.models import Transformer, preset

  cfg = preset("tiny", vocab_size=97, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
               max_seq_len=32, softmax="softmax1")
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _batches(rng, nb, b, t, v, segments=True):
  out = []
  for _ in range(nb):
    batch = {"inputs": rng.integers(0, v, (b, t)).astype(np.int32),
             "targets": rng.integers(0, v, (b, t)).astype(np.int32),
             "weights": (rng.random((b, t)) > 0.1).astype(np.float32)}
    if segments:
      batch["segment_ids"] = _random_segments(rng, b, t)
    out.append(batch)
  return out


def test_evaluate_over_batches_matches_numpy_on_intermediates(tiny_model):
  rng = np.random.default_rng(7)
  batches = _batches(rng, 3, 2, 16, 97)
  sums = O.evaluate_sums(tiny_model, batches)
  hits = mass = count = 0.0
  nll = wsum = 0.0
  kurt_rest, n_rest, max_first = 0.0, 0, np.zeros(2)
  graphdef, state = nnx.split(tiny_model)

  @jax.jit
  def forward(state, tokens, seg):
    return with_intermediates(nnx.merge(graphdef, state), tokens,
                              ["hidden", "attention_probs", "attention_stats"], segment_ids=seg)

  for batch in batches:
    seg = batch["segment_ids"]
    logits, inter = forward(state, jnp.asarray(batch["inputs"]), jnp.asarray(seg))
    h, p = np.asarray(inter["hidden"], np.float64), np.asarray(inter["attention_probs"], np.float64)
    # The decision itself is judged against float64 in test_model_first_token_metrics_agree_*.
    flags = np.asarray(inter["attention_stats"]["argmax_first"])
    bh, bm, bc = _np_first_token(p, seg, flags)
    hits, mass, count = hits + bh, mass + bm, count + bc
    _, is_first, valid = _np_layout(seg)
    k = _np_kurtosis(h)
    kurt_rest += k[:, valid & ~is_first].sum(-1)
    n_rest += (valid & ~is_first).sum()
    max_first = np.maximum(max_first, np.abs(h[:, is_first]).max((1, 2)))
    lg = np.asarray(logits, np.float64)
    top = lg.max(-1, keepdims=True)
    logp = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    tok_nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    nll += (tok_nll * batch["weights"]).sum()
    wsum += batch["weights"].sum()
  np.testing.assert_allclose(sums["ft_hits"], hits)
  np.testing.assert_allclose(sums["ft_count"], count)
  np.testing.assert_allclose(sums["ft_mass"], mass, rtol=1e-4)
  np.testing.assert_allclose(sums["kurt_rest"], kurt_rest, rtol=1e-4)
  assert float(sums["n_rest"]) == n_rest
  np.testing.assert_allclose(sums["max_first"], max_first, rtol=1e-5)
  np.testing.assert_allclose(float(sums["nll"]), nll, rtol=1e-5)
  assert float(sums["nll_weight"]) == pytest.approx(wsum)


def test_outlier_metrics_contract_keys_and_ranges(tiny_model):
  rng = np.random.default_rng(8)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
  m = O.outlier_metrics(tiny_model, tokens)
  for key in ("first_token_attention", "first_token_prob", "kurtosis_first", "kurtosis_rest",
              "max_abs_first", "max_abs_rest"):
    assert isinstance(m[key], float) and np.isfinite(m[key]), key
  assert 0.0 <= m["first_token_attention"] <= 1.0 and 0.0 <= m["first_token_prob"] <= 1.0
  assert "perplexity" not in m
  m2 = O.outlier_metrics(tiny_model, tokens, targets=tokens)
  assert m2["perplexity"] > 1.0


def test_stack_batches_errors():
  with pytest.raises(ValueError, match="no batches"):
    O.stack_batches([])
  with pytest.raises(ValueError, match="'inputs'"):
    O.stack_batches([{"targets": np.zeros((1, 2))}])


def test_first_token_from_stats_with_segments_counts_every_document():
  """Statistics about each query's first visible key (its document's first token) count every
  document, with the hits and mass of the probabilities path."""
  rng = np.random.default_rng(9)
  l, b, n, t = 1, 2, 2, 12
  seg = _random_segments(rng, b, t)
  logits, mask, probs, lse = _causal_probs(rng, l, b, n, t, seg, softmax1=True)
  _assert_clear_argmax(logits, mask)
  first_key = _np_layout(seg)[0]
  first_logit = np.take_along_axis(logits, first_key[None, :, None, :, None], -1)[..., 0]
  row_max = np.max(np.where(mask, logits, -np.inf), -1)
  stats = S.first_token_sums_from_stats(jnp.asarray(first_logit, jnp.float32),
                                        jnp.asarray(row_max, jnp.float32),
                                        jnp.asarray(lse, jnp.float32), jnp.asarray(seg))
  ref = S.first_token_sums_from_probs(jnp.asarray(probs, jnp.float32), jnp.asarray(seg))
  for key in ("ft_hits", "ft_count"):
    np.testing.assert_array_equal(stats[key], ref[key])
  np.testing.assert_allclose(stats["ft_mass"], ref["ft_mass"], rtol=1e-5)
  _, counted = counted_queries(jnp.asarray(seg), b, t)
  later = np.asarray(counted) & (first_key > 0)
  assert later.any() and float(stats["ft_count"].sum()) == np.asarray(counted).sum() * l * n
  assert np.any(later[None, :, None] & (first_logit >= row_max))  # later documents add hits


def test_probs_source_takes_every_hit_from_the_flags():
  """Two documents ([0, 1, 2], [3, 4, 5]); every row of probabilities is all zeros (softmax-1
  underflow: argmax names key 0, a hit for the first document's queries and a miss for the
  second's). The flags, decided from the logits, say otherwise in both documents."""
  seg = jnp.array([[1, 1, 1, 2, 2, 2]])
  probs = jnp.zeros((1, 1, 1, 6, 6))
  flags = jnp.array([True, False, False, True, True, False]).reshape(1, 1, 1, 6)
  from_argmax = S.first_token_sums_from_probs(probs, seg)
  assert from_argmax["ft_hits"].tolist() == [[2.0]]  # queries 1 and 2: argmax names key 0
  sums = S.first_token_sums_from_probs(probs, seg, flags)
  assert sums["ft_hits"].tolist() == [[1.0]]  # query 4 only (1, 2 and 5 are misses)
  assert sums["ft_count"].tolist() == [[4.0]]
  flags_only = S.first_token_sums_from_flags(flags, jnp.zeros((1, 1, 1, 6)), seg)
  assert flags_only["ft_hits"].tolist() == [[1.0]] and flags_only["ft_count"].tolist() == [[4.0]]


def test_first_token_flags_from_attention_stats_module_agree():
  rng = np.random.default_rng(10)
  b, t, n, h = 2, 10, 4, 8
  q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2, jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, 2, h)) * 2, jnp.float32)
  from softmax_one_jax.attention.reference import reference_attention

  _, probs = reference_attention(q, k, k, softmax="softmax1", is_causal=True, return_probs=True)
  st = first_token_stats(q, k, softmax="softmax1", is_causal=True, implementation="xla")
  flags = S.first_token_sums_from_flags(st["argmax_first"][None], st["prob_first"][None])
  ref = S.first_token_sums_from_probs(probs[None])
  # float64 judge; the fixed draw keeps every row's margin above float32's error bound.
  assert np_decidable(np.asarray(q), np.asarray(k), is_causal=True).all()
  want_hit, _, _ = np_first_token(np.asarray(q), np.asarray(k), is_causal=True)
  np.testing.assert_array_equal(st["argmax_first"], want_hit)
  for key in ("ft_hits", "ft_count"):
    np.testing.assert_array_equal(flags[key], ref[key])
  np.testing.assert_allclose(flags["ft_mass"], ref["ft_mass"], rtol=1e-5)


@pytest.mark.parametrize("segments", [False, True], ids=["rows", "packed"])
def test_evaluate_with_attention_stats_equals_probs_path(tiny_model, segments):
  """The real "attention_stats" intermediate (first_token_stats in every layer) against the
  probabilities: the mass is computed independently (exp(s_f - lse) vs the probability matrix
  at each document's first token); both sources take every hit from the same logit-decided
  flags, packed documents included."""
  rng = np.random.default_rng(11)
  batches = _batches(rng, 2, 2, 16, 97, segments=segments)
  via_probs = O.evaluate_sums(tiny_model, batches, attention="probs")
  via_stats = O.evaluate_sums(tiny_model, batches, attention="stats")
  assert set(via_probs) == set(via_stats)
  for key in via_probs:
    np.testing.assert_allclose(via_stats[key], via_probs[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(via_stats["ft_hits"], via_probs["ft_hits"])
  np.testing.assert_array_equal(via_stats["ft_count"], via_probs["ft_count"])
  assert 0 < via_stats["ft_hits"].sum() < via_stats["ft_count"].sum()


# ----------------------------------------------------------------------------------------------
# One answer on every statistics path, at model level, with float64 as the judge.


def test_first_token_sums_from_attention_stats_on_ties(np_rng):
  """first_token_sums_from_stats on attention_stats' arrays: exact ties and one-ulp near-ties
  (reference_np.tie_case), every path, at a scale that rounds key 0's score (14) and a rival's
  one ulp above it (14 + 2^-20) to the same float32 logit: the rows key 0 loses by one ulp must
  still count as misses."""
  scale = 0.3
  assert np.float32(14) * np.float32(scale) == np.float32(14 + 2.0**-20) * np.float32(scale)
  q, k = tie_case(np_rng, b=1, t=16, s=16)
  opts = dict(softmax="softmax1", is_causal=True, scale=scale)
  assert_ties_present(q, k, is_causal=True, scale=scale)
  want_hit, want_p, _ = np_first_token(q, k, **opts)
  counted = np.arange(16) > 0
  want_hits = (want_hit * counted).sum(axis=(0, 2))[None]
  for impl in ("xla", "chunked", "pallas"):
    lse, row_max, first = attention_stats(q, k, implementation=impl, interpret=True, **opts)
    sums = S.first_token_sums_from_stats(first[None], row_max[None], lse[None])
    np.testing.assert_array_equal(sums["ft_hits"], want_hits, err_msg=impl)
    np.testing.assert_allclose(sums["ft_mass"], (want_p * counted).sum(axis=(0, 2))[None],
                               rtol=1e-5, err_msg=impl)


def _recorded_qk(impl, record):
  """first_token_stats on one implementation path; on "xla" also hands each layer's (q, k) to
  ``record`` (in call order) for the float64 judge."""
  real = first_token_stats

  def stats(q, k, **kwargs):
    if record is not None:
      jax.debug.callback(record, q, k, ordered=True)
    return real(q, k, implementation=impl, interpret=True, **kwargs)

  return stats


def test_model_first_token_metrics_agree_across_stats_paths_and_float64(monkeypatch):
  """A small learned-sink model on a packed batch (several documents per row, padding) whose
  attention statistics come from each implementation path in turn (the model has no option for
  it: the layers' first_token_stats is swapped for the same function with ``implementation``
  set). On every path, the "probs" and "stats" sources and the extreme-token share count the
  same hits, equal to float64's on the layers' own q and k over every document; then
  ``outlier_metrics`` (what training logs) reports that same share. Mass and null mass agree."""
  from softmax_one_jax.analysis.layout import first_token_chance
  from softmax_one_jax.models import Transformer, layers, preset

  cfg = preset("tiny", vocab_size=97, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
               max_seq_len=32, softmax="learned_sink")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  sinks = np.array([-2.0, 0.5, 1.0, 3.0], np.float32)
  for block in model.blocks:
    block.attn.sink_logits.value = jnp.asarray(sinks)
  tokens = jnp.asarray(np.random.default_rng(12).integers(0, 97, (2, 16)), jnp.int32)
  seg = np.array([[1] * 5 + [2] * 6 + [3] * 5, [1] * 4 + [2] * 10 + [0] * 2], np.int32)
  batch = {"inputs": tokens, "segment_ids": jnp.asarray(seg)}
  graphdef, state = nnx.split(model)
  qk = []
  got = {}
  for impl in ("xla", "chunked", "pallas"):
    record = (lambda q, k: qk.append((np.asarray(q), np.asarray(k)))) if impl == "xla" else None
    monkeypatch.setattr(layers, "first_token_stats", _recorded_qk(impl, record))

    @jax.jit
    def metrics(state):
      m = nnx.merge(graphdef, state)
      return (O.model_batch_sums(m, batch, attention="stats"),
              O.model_batch_sums(m, batch, attention="probs"),
              E.extreme_token_arrays(m, tokens, batch["segment_ids"], attention="stats"),
              E.extreme_token_arrays(m, tokens, batch["segment_ids"], attention="probs"))

    got[impl] = jax.device_get(metrics(state))
  monkeypatch.undo()
  # float64 judge on the first forward pass's (q, k) per layer.
  judge = [np_first_token(q, k, softmax="learned_sink", sinks=sinks, is_causal=True,
                          segment_ids=seg) for q, k in qk[:cfg.num_layers]]
  for q, k in qk[:cfg.num_layers]:
    assert np_decidable(q, k, is_causal=True, segment_ids=seg).all()  # no near-tie in the draw
  want_hit = np.stack([j[0] for j in judge])  # [L, B, N, T]
  first_key, counted = (np.asarray(a) for a in counted_queries(jnp.asarray(seg), 2, 16))
  w = counted[None, :, None, :]  # every document's queries
  want_hits = (want_hit * w).sum(axis=(1, 3))
  total = w.sum() * 4 * cfg.num_layers
  assert 0 < want_hits.sum() < total
  later = w & (first_key > 0)[None, :, None, :]  # queries of documents after the first
  assert 0 < (want_hit * later).sum() < later.sum() * 4 * cfg.num_layers
  want_share = want_hits.sum() / total
  want_mass = (np.stack([j[1] for j in judge]) * w).sum(axis=(1, 3))
  for impl, (via_stats, via_probs, extreme_stats, extreme_probs) in got.items():
    for name, sums in (("stats", via_stats), ("probs", via_probs)):
      np.testing.assert_array_equal(sums["ft_hits"], want_hits, err_msg=f"{impl} {name}")
      np.testing.assert_array_equal(sums["ft_count"], w.sum() * np.ones((2, 4)))
      np.testing.assert_allclose(sums["ft_mass"], want_mass, rtol=1e-4, err_msg=f"{impl} {name}")
    for extreme in (extreme_stats, extreme_probs):
      assert extreme["first_token_attention"] == pytest.approx(want_share, rel=1e-6), impl
      for key in ("first_token_mass", "null_mass", "sink_rate"):
        np.testing.assert_allclose(extreme[key], got["xla"][3][key], rtol=1e-5, err_msg=impl)
  want_null = np.stack([j[2] for j in judge])
  np.testing.assert_allclose(got["pallas"][2]["null_mass"], (want_null * w).sum() / total,
                             rtol=1e-4)
  # What training logs: one first_token_attention, the same share, with its chance level.
  for attention in ("probs", "stats"):
    m = O.outlier_metrics(model, tokens, jnp.asarray(seg), attention=attention)
    assert m["first_token_attention"] == want_share, attention  # integer sums, float64 ratio
    assert m["first_token_prob"] == pytest.approx(want_mass.sum() / total, rel=1e-4)
    assert m["first_token_chance"] == pytest.approx(
        float(first_token_chance(jnp.asarray(seg), 2, 16)), rel=1e-6)
