"""Extreme-token metrics on hand-built attention patterns and hidden states with known answers."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.analysis import extreme_tokens as E
from softmax_one_jax.analysis import outliers as O
from softmax_one_jax.analysis import sums as S
from softmax_one_jax.analysis.layout import counted_queries
from softmax_one_jax.models.intermediates import SowConfig, with_intermediates


def _f32(a):
  return jnp.asarray(np.asarray(a, np.float32))


# ----------------------------------------------------------------------------------------------
# First-token mass: per-document first queries excluded, trigger split.


def _two_document_probs():
  """One row, documents [0, 1, 2] and [3, 4]; each query's probability on its first token.

  Counted queries are 1, 2 and 4 with first-token probabilities 0.6, 0.3 and 0.9; the
  documents' first queries (0 and 3) put 1.0 on themselves and must not count.
  """
  p = np.zeros((5, 5))
  p[0, 0] = 1.0
  p[1, :2] = [0.6, 0.4]
  p[2, :3] = [0.3, 0.3, 0.4]
  p[3, 3] = 1.0
  p[4, 3:] = [0.9, 0.1]
  p[4, 0] = 0.0  # another document: key 0 is masked for query 4
  return p[None, None, None], np.array([[1, 1, 1, 2, 2]])


def test_first_token_mass_excludes_each_documents_first_query():
  probs, seg = _two_document_probs()
  prob_first = E.first_token_probs(_f32(probs), jnp.asarray(seg))
  _, counted = counted_queries(jnp.asarray(seg), 1, 5)
  m = E.first_token_mass(prob_first, counted)
  assert float(m["first_token_mass"]) == pytest.approx((0.6 + 0.3 + 0.9) / 3)
  assert set(m) == {"first_token_mass"}


def test_first_token_mass_trigger_split():
  probs, seg = _two_document_probs()
  prob_first = E.first_token_probs(_f32(probs), jnp.asarray(seg))
  _, counted = counted_queries(jnp.asarray(seg), 1, 5)
  # Query 0 is a trigger but a document's first query: it must not enter either group.
  trigger = jnp.array([[True, False, True, False, False]])
  m = E.first_token_mass(prob_first, counted, trigger)
  assert float(m["first_token_mass_trigger"]) == pytest.approx(0.3)
  assert float(m["first_token_mass_non_trigger"]) == pytest.approx((0.6 + 0.9) / 2)
  assert float(m["first_token_mass"]) == pytest.approx(0.6)
  with pytest.raises(ValueError, match="one flag per token"):
    E.first_token_mass(prob_first, counted, jnp.ones((1, 4), bool))


# ----------------------------------------------------------------------------------------------
# Sink rate: the epsilon = 0.3 edge.


def test_sink_rate_threshold_edge_and_first_query_excluded():
  # [L=2, B=1, N=2, T=4]: every counted query of a head has the same first-token probability;
  # query 0 has 1.0, which would lift the 0.29 head to (1 + 3 * 0.29) / 4 > 0.3 if it counted.
  head = np.array([[0.29, 0.31], [0.31, 0.31]])
  p = np.repeat(head[:, None, :, None], 4, axis=3)
  p[..., 0] = 1.0
  _, counted = counted_queries(None, 1, 4)
  mass_ln = E.head_first_token_mass(_f32(p), counted)
  np.testing.assert_allclose(mass_ln, head, rtol=1e-6)
  rate_l = E.sink_rate(mass_ln)
  assert rate_l.tolist() == [0.5, 1.0]
  assert float(jnp.mean(rate_l)) == 0.75  # 3 of the 4 (layer, head) pairs exceed 0.3
  assert E.sink_rate(mass_ln, epsilon=0.31).tolist() == [0.0, 0.0]  # strictly exceeds


# ----------------------------------------------------------------------------------------------
# Null mass.


def test_null_mass_mean_over_counted_queries():
  # [L=1, B=1, N=2, T=3]; query 0 (0.9 and 0.8) is excluded.
  null = np.array([[0.9, 0.2, 0.4], [0.8, 0.6, 0.0]])[None, None]
  _, counted = counted_queries(None, 1, 3)
  assert float(E.null_mass(_f32(null), counted)) == pytest.approx((0.2 + 0.4 + 0.6 + 0.0) / 4)


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_null_mass_of_first_token_stats_is_the_missing_probability(softmax):
  from softmax_one_jax.attention.stats import first_token_stats

  rng = np.random.default_rng(0)
  q = rng.normal(size=(1, 6, 2, 4)) * 2
  k = rng.normal(size=(1, 6, 2, 4)) * 2
  sinks = np.array([1.5, -0.5]) if softmax == "learned_sink" else None
  st = first_token_stats(_f32(q), _f32(k), softmax=softmax, is_causal=True,
                         implementation="xla", sinks=None if sinks is None else _f32(sinks))
  # float64 by hand: p_j = exp(s_j) / (exp(c_n) + sum exp(s_j)) over visible keys, c_n = 0 for
  # softmax-1 and the head's sink logit for learned sinks.
  s = np.einsum("btnh,bsnh->bnts", q, k) / 2.0
  s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
  null_exp = np.exp(np.zeros(2) if sinks is None else sinks)[None, :, None]
  null_ref = null_exp / (null_exp + np.exp(s).sum(-1))  # [B, N, T]
  _, counted = counted_queries(None, 1, 6)
  got = float(E.null_mass(st["null_mass"][None], counted))
  assert got == pytest.approx(null_ref[..., 1:].mean(), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# First-token argmax share: from logits, not probabilities.


@pytest.mark.parametrize("implementation", ["xla", "chunked", "pallas"])
def test_first_token_stats_flags_an_underflowing_row_as_a_miss(implementation):
  from softmax_one_jax.attention.stats import first_token_stats

  # Head dim 1, q = 1, scale 1: the logits of query t are the keys [-99, -100, -90][:t + 1].
  # Query 1: [-99, -100], key 0 is the largest (a hit); query 2: [-99, -100, -90] (a miss).
  q = jnp.ones((1, 3, 1, 1))
  k = jnp.array([-99.0, -100.0, -90.0]).reshape(1, 3, 1, 1)
  st = first_token_stats(q, k, softmax="softmax1", is_causal=True, scale=1.0,
                         implementation=implementation, interpret=True)
  assert st["argmax_first"][0, 0].tolist() == [True, True, False]
  assert float(E.first_token_argmax_share(st["argmax_first"][None])) == 0.5


def test_first_token_argmax_share_counts_every_document():
  # Documents [0, 1, 2] and [3, 4]: counted queries 1, 2 and 4 (each document's first query and
  # the padding at 5 excluded); the flags are about each query's own document's first token.
  flags = jnp.array([True, True, False, True, True, True]).reshape(1, 1, 1, 6)
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  assert float(E.first_token_argmax_share(flags, seg)) == pytest.approx(2 / 3)
  sums = S.first_token_sums_from_flags(flags, jnp.zeros((1, 1, 1, 6)), seg)
  assert O.finalize(sums).scalars["first_token_attention"] == pytest.approx(2 / 3)


class _UnderflowLayer(nnx.Module):
  """Sows hand-made intermediates: softmax-1 rows whose probabilities all underflowed to 0.

  Real logits of the rows (one head, batch row): query 1 [-99, -100] (first token is the
  argmax), query 2 [-100, -99, -90] (it is not). The probabilities are all 0 in float32.
  """

  def __init__(self):
    self.sow_config = SowConfig()

  def __call__(self, b: int, t: int) -> None:
    probs = jnp.zeros((b, 1, t, t)).at[:, :, 0, 0].set(1.0)
    made = {"hidden": jnp.ones((b, t, 4)), "values": jnp.ones((b, t, 4)),
            "attention_probs": probs,
            "attention_stats": {"argmax_first": jnp.array([True, True, False])[None, None],
                                "prob_first": probs[..., 0],
                                "null_mass": jnp.array([0.0, 1.0, 1.0])[None, None]}}
    for name, value in made.items():
      if getattr(self.sow_config, name):
        self.sow(nnx.Intermediate, name, value)


class _UnderflowModel(nnx.Module):
  """One layer of ``_UnderflowLayer`` and constant logits."""

  def __init__(self):
    self.layer = _UnderflowLayer()

  def __call__(self, tokens, segment_ids=None, positions=None):
    b, t = tokens.shape
    self.layer(b, t)
    return jnp.zeros((b, t, 7))


def test_outlier_metrics_takes_the_first_token_share_from_logits():
  tokens = jnp.zeros((1, 3), jnp.int32)
  # The probabilities alone would say 1.0 (all-zero rows: argmax names key 0); the "probs"
  # source takes the hits from the logit-decided flags as well.
  probs = with_intermediates(_UnderflowModel(), tokens, ["attention_probs"])[1]["attention_probs"]
  assert O.finalize(S.first_token_sums_from_probs(probs)).scalars["first_token_attention"] == 1.0
  via_probs = O.finalize(O.evaluate_sums(_UnderflowModel(), {"inputs": tokens[None]}))
  assert via_probs.scalars["first_token_attention"] == 0.5
  m = O.outlier_metrics(_UnderflowModel(), tokens)
  assert m["first_token_attention"] == 0.5  # query 1 hits, query 2 does not
  assert m["first_token_mass"] == 0.0 and m["null_mass"] == 1.0


# ----------------------------------------------------------------------------------------------
# Value drain and residual peak.


def test_value_drain_ratio_by_hand_with_documents_and_padding():
  # Two rows; documents start at 0 (row 0) and at 0 and 2 (row 1); row 1's last token is padding
  # with a huge norm that must not count.
  v = np.zeros((1, 2, 4, 2))
  v[0, 0] = [[1, 0], [3, 4], [0, 5], [6, 8]]          # first norm 1; rest 5, 5, 10
  v[0, 1] = [[0, 2], [0, 4], [3, 0], [1000, 0]]       # first norms 2, 3; rest 4; padding
  seg = np.array([[1, 1, 1, 1], [1, 1, 2, 0]])
  ratio = E.value_drain_ratio(_f32(v), jnp.asarray(seg))
  first_mean, rest_mean = (1 + 2 + 3) / 3, (5 + 5 + 10 + 4) / 4
  np.testing.assert_allclose(ratio, [first_mean / rest_mean], rtol=1e-6)


def test_residual_peak_ratio_uses_the_median_of_the_other_tokens():
  # Layer 0: first-token norm 50, others 1, 2, 100 (median 2): 25. Layer 1: all norms 3: 1.
  h = np.zeros((2, 1, 4, 2))
  h[0, 0] = [[30, 40], [1, 0], [0, 2], [100, 0]]
  h[1, 0] = [[3, 0], [0, 3], [-3, 0], [0, -3]]
  np.testing.assert_allclose(E.residual_peak_ratio(_f32(h)), [25.0, 1.0], rtol=1e-6)


def test_value_states_reproduce_the_attention_output_of_layer_zero(tiny_model):
  """Independent check of the sown values: probs @ V through o_proj is the attention
  sublayer's output, which is block 0's output minus its input and its MLP term."""
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 8)), jnp.int32)
  _, inter = with_intermediates(tiny_model, tokens, ["hidden", "values", "attention_probs"])
  v = inter["values"]
  c = tiny_model.config
  assert v.shape == (c.num_layers, 2, 8, c.num_kv_heads * c.head_dim)
  block = tiny_model.blocks[0]
  x0 = tiny_model._embed(tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)))
  v_btnh = np.asarray(v[0], np.float64).reshape(2, 8, c.num_kv_heads, c.head_dim)
  p = np.asarray(inter["attention_probs"][0], np.float64)  # [B, N, T, T]
  out = np.einsum("bnts,bsnh->btnh", p, v_btnh).reshape(2, 8, -1)
  x1 = x0 + block.attn.o_proj(jnp.asarray(out, jnp.float32))
  h0 = x1 + block.mlp(block.mlp_norm(x1))
  np.testing.assert_allclose(h0, inter["hidden"][0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny random model.


@pytest.fixture(scope="module", params=["softmax1", "learned_sink"])
def tiny_model(request):
  from softmax_one_jax.models import Transformer, preset

  cfg = preset("tiny", vocab_size=97, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
               max_seq_len=32, softmax=request.param)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  for block in model.blocks:  # learned sinks start at 0 (softmax-1): give them other values
    if block.attn.sink_logits is not None:
      block.attn.sink_logits.value = jnp.array([-2.0, 0.5, 1.0, 3.0])
  return model


@pytest.mark.parametrize("attention", ["probs", "stats"])
def test_outlier_metrics_new_keys_exist_and_are_in_range(tiny_model, attention):
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
  seg = jnp.asarray(np.array([[1] * 9 + [2] * 7, [1] * 14 + [0] * 2]))
  trigger = jnp.asarray(rng.random((2, 16)) > 0.5)
  m = O.outlier_metrics(tiny_model, tokens, seg, trigger_positions=trigger, attention=attention,
                        per_layer=True)
  for key in ("first_token_mass", "first_token_mass_trigger", "first_token_mass_non_trigger",
              "sink_rate", "null_mass", "first_token_attention"):
    assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, key
  assert m["first_token_mass"] + m["null_mass"] <= 1.0 + 1e-6
  assert m["first_token_mass"] == pytest.approx(m["first_token_prob"], rel=1e-5)
  for key in ("value_drain_ratio", "residual_peak_ratio", "sink_rate"):
    per_layer = m[f"{key}_per_layer"]
    assert len(per_layer) == 2 and all(np.isfinite(per_layer)), key
    assert m[key] == pytest.approx(np.mean(per_layer), rel=1e-6), key
  assert m["value_drain_ratio"] > 0.0 and m["residual_peak_ratio"] > 0.0
  plain = O.outlier_metrics(tiny_model, tokens, seg, attention=attention)
  assert all(isinstance(v, float) for v in plain.values())  # training logs float(v) of each
  assert "first_token_mass_trigger" not in plain
  # (8 + 6 + 13) counted queries: 1/2 + ... + 1/9, 1/2 + ... + 1/7 and 1/2 + ... + 1/14.
  harmonic = lambda n: sum(1 / i for i in range(2, n + 1))  # noqa: E731
  want_chance = (harmonic(9) + harmonic(7) + harmonic(14)) / (8 + 6 + 13)
  assert plain["first_token_chance"] == pytest.approx(want_chance, rel=1e-6)


def test_outlier_metrics_sources_report_one_first_token_share(tiny_model):
  """On a packed batch the "probs" and "stats" sources give the same first_token_attention
  (every document counted, from the same flags) and the same mass on the first tokens."""
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
  seg = jnp.asarray(np.array([[1] * 4 + [2] * 5 + [3] * 7, [1] * 6 + [2] * 8 + [0] * 2]))
  via_probs = O.outlier_metrics(tiny_model, tokens, seg, attention="probs")
  via_stats = O.outlier_metrics(tiny_model, tokens, seg, attention="stats")
  assert via_probs["first_token_attention"] == via_stats["first_token_attention"]
  assert 0.0 < via_probs["first_token_attention"] < 1.0
  for key in ("first_token_prob", "first_token_mass", "null_mass", "sink_rate"):
    assert via_probs[key] == pytest.approx(via_stats[key], rel=1e-5, abs=1e-7), key
