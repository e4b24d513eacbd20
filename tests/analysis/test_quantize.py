"""Round-to-nearest quantisers: error bounds, exact grids, and their application to a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.analysis import quantize as Q
from softmax_one_jax.models.layers import split_qkv


def _heavy_tailed(rng, shape):
  w = rng.standard_t(df=3, size=shape).astype(np.float32) * 0.05
  return w


@pytest.mark.parametrize("axis", [None, 0])
def test_int8_absmax_bound_and_grid(axis):
  rng = np.random.default_rng(0)
  w = _heavy_tailed(rng, (96, 40))
  w_hat = np.asarray(Q.fake_quant_absmax(jnp.asarray(w), 8, axis=axis))
  absmax = np.abs(w.astype(np.float64)).max(axis=axis, keepdims=True)
  step = absmax / 127
  # |error| <= absmax / 127 / 2 per element (float32 rounding slack of a few ulps).
  assert np.all(np.abs(w_hat - w) <= step / 2 * (1 + 1e-5) + 1e-12)
  # Dequantised values are integer multiples of the step, within [-127, 127].
  q = w_hat / step
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  assert np.all(np.abs(np.round(q)) <= 127)
  # The extreme value of each group is represented exactly (level +-127).
  np.testing.assert_allclose(np.abs(w_hat).max(axis=axis, keepdims=True), absmax, rtol=1e-6)


def test_int8_absmax_matches_numpy_reference():
  rng = np.random.default_rng(1)
  w = _heavy_tailed(rng, (64, 24))
  q, s = Q.absmax_quantize(jnp.asarray(w), 8, axis=0)
  s_ref = (np.abs(w).max(0, keepdims=True) / np.float32(127)).astype(np.float32)
  q_ref = np.clip(np.round(w / s_ref), -127, 127)
  # XLA divides by the constant 127 as a multiply by its reciprocal: allow 2 ulp.
  np.testing.assert_allclose(np.asarray(s), s_ref, rtol=2.4e-7)
  assert np.mean(np.asarray(q) == q_ref) > 0.999  # ties at .5 may round differently in rare cases
  assert np.max(np.abs(np.asarray(q) - q_ref)) <= 1


def _np_int4_levels(w_kgo):
  """Reference scale / zero point / levels per group in float64 ([in-group axis] = 0)."""
  lo, hi = w_kgo.min(0, keepdims=True), w_kgo.max(0, keepdims=True)
  s = (hi - lo) / 15.0
  z = np.round(-lo / s)
  return s, z


@pytest.mark.parametrize("group_size", [None, 32])
def test_int4_asymmetric_levels_and_bound(group_size):
  rng = np.random.default_rng(2)
  w = _heavy_tailed(rng, (128, 12)) + 0.03  # not centred: the zero point matters
  w_hat = np.asarray(Q.fake_quant_asymmetric(jnp.asarray(w), 4, group_size))
  g = 128 if group_size is None else group_size
  w_g = w.astype(np.float64).reshape(128 // g, g, 12)
  wh_g = w_hat.astype(np.float64).reshape(128 // g, g, 12)
  for k in range(128 // g):
    s, z = _np_int4_levels(w_g[k])
    # At most 16 distinct values per (group, output channel), each on a level (k - z) * s.
    for o in range(12):
      assert len(np.unique(wh_g[k][:, o])) <= 16
    levels = wh_g[k] / s + z
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.all((np.round(levels) >= 0) & (np.round(levels) <= 15))
    assert np.all(np.abs(wh_g[k] - w_g[k]) <= s / 2 * (1 + 1e-4) + 1e-9)


def test_int4_exact_levels_from_returned_scale():
  rng = np.random.default_rng(3)
  w = jnp.asarray(_heavy_tailed(rng, (64, 8)))
  q, s, z = Q.asymmetric_quantize(w, 4, axis=0)
  q, s, z = map(np.asarray, (q, s, z))
  assert np.array_equal(q, np.round(q)) and q.min() >= 0 and q.max() <= 15
  w_hat = np.asarray(Q.fake_quant_asymmetric(w, 4))
  np.testing.assert_array_equal(w_hat, ((q - z) * s).astype(np.float32))  # exactly on the grid
  # Quantising the grid again gives the same integer codes (idempotent up to float rounding of s).
  q2, s2, z2 = map(np.asarray, Q.asymmetric_quantize(jnp.asarray(w_hat), 4, axis=0))
  np.testing.assert_array_equal(q2 - z2, q - z)
  np.testing.assert_allclose(s2, s, rtol=1e-5)


def test_int4_ragged_last_group():
  rng = np.random.default_rng(4)
  w = _heavy_tailed(rng, (200, 6))
  w_hat = np.asarray(Q.fake_quant_asymmetric(jnp.asarray(w), 4, 128))
  head = np.asarray(Q.fake_quant_asymmetric(jnp.asarray(w[:128]), 4))
  tail = np.asarray(Q.fake_quant_asymmetric(jnp.asarray(w[128:]), 4))
  np.testing.assert_array_equal(w_hat, np.concatenate([head, tail]))


def _np_act(x, granularity):
  """Reference dynamic absmax int8 fake-quant in float64: per sequence ([T, D]) or per token."""
  x = np.asarray(x, np.float64)
  axis = (-2, -1) if granularity == "per_sequence" else -1
  s = np.abs(x).max(axis=axis, keepdims=True) / 127
  return np.clip(np.round(x / s), -127, 127) * s


def test_activation_quant_per_sequence_and_per_token():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 6, 32)).astype(np.float32)
  x[0, 0, 3] = 1000.0  # a massive activation on one token of the first sequence
  per_seq = np.asarray(Q.fake_quant_activation(jnp.asarray(x), "per_sequence"))
  per_token = np.asarray(Q.fake_quant_activation(jnp.asarray(x), "per_token"))
  np.testing.assert_allclose(per_seq, _np_act(x, "per_sequence"), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(per_token, _np_act(x, "per_token"), rtol=1e-6, atol=1e-6)
  step_seq = np.abs(x).max((1, 2), keepdims=True) / 127
  assert np.all(np.abs(per_seq - x) <= step_seq / 2 * (1 + 1e-5))
  # The outlier wipes out the rest of its own sequence, but no other sequence.
  assert np.abs(per_seq[0, 1:] - x[0, 1:]).mean() > 10 * np.abs(per_token[0, 1:] - x[0, 1:]).mean()
  alone = np.asarray(Q.fake_quant_activation(jnp.asarray(x[1:]), "per_sequence"))
  np.testing.assert_array_equal(per_seq[1:], alone)
  with pytest.raises(ValueError, match="per_sequence"):
    Q.fake_quant_activation(jnp.asarray(x), "per_tensor")  # no batch-wide scale
  with pytest.raises(ValueError, match="granularity"):
    Q.fake_quant_activation(jnp.asarray(x), "per_channel")


def test_scheme_validation():
  with pytest.raises(ValueError, match="granularity"):
    Q.QuantScheme("bad", 4, "per_tensor")
  with pytest.raises(ValueError, match="weight_bits"):
    Q.QuantScheme("bad", 3, "per_channel")
  with pytest.raises(ValueError, match="per_sequence"):
    Q.QuantScheme("bad", 8, "per_tensor", act="per_tensor")
  assert {s.act for s in Q.SCHEMES.values()} == {None, "per_sequence", "per_token"}
  with pytest.raises(ValueError, match="unknown quantisation scheme"):
    Q.resolve_schemes("w8_tensor,nope")
  (emb,) = Q.resolve_schemes("w4_g128+emb")
  assert emb.include_embeddings and emb.name == "w4_g128+emb" and emb.group_size == 128
  assert not Q.SCHEMES["w4_g128"].include_embeddings


# ----------------------------------------------------------------------------------------------
# On a model.


def _tiny(**kw):
  from softmax_one_jax.models import Transformer, preset

  cfg = preset("tiny", vocab_size=61, num_layers=2, d_model=32, num_heads=4, mlp_dim=160,
               max_seq_len=16, **kw)
  return Transformer(cfg, rngs=nnx.Rngs(1))


def _family(family):
  """A tiny model of the GPT-2 family (tied head, LayerNorm, GELU) or Llama-2 (untied, SwiGLU)."""
  from softmax_one_jax.models import Transformer, preset

  name = {"gpt2": "gpt2-60m", "llama": "llama2-60m"}[family]
  cfg = preset(name, vocab_size=61, num_layers=2, d_model=32, num_heads=4, mlp_dim=96,
               max_seq_len=16)
  return Transformer(cfg, rngs=nnx.Rngs(2))


def _tokens(seed, shape=(2, 12), high=61):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


def _float_head(model):
  """The float model's head weights ``[V, D]`` (logits = hidden @ this.T), float64."""
  if model.lm_head is None:
    return np.asarray(model.embed.embedding[...], np.float64)
  return np.asarray(model.lm_head.kernel[...], np.float64).T


def _np_head_quant(w_vd, scheme):
  """Reference fake-quant of head weights ``[V, D]`` in float64: output channel = vocabulary row,
  groups along D."""
  w = np.asarray(w_vd, np.float64)
  if scheme.weight_bits == 8:
    axis = None if scheme.weight_granularity == "per_tensor" else 1
    s = np.abs(w).max(axis=axis, keepdims=True) / 127
    return np.clip(np.round(w / s), -127, 127) * s
  g = w.shape[1] if scheme.weight_granularity != "group" else min(scheme.group_size, w.shape[1])
  w_vgk = w.reshape(w.shape[0], w.shape[1] // g, g)
  lo, hi = w_vgk.min(-1, keepdims=True), w_vgk.max(-1, keepdims=True)
  s = (hi - lo) / 15
  z = np.round(-lo / s)
  q = np.clip(np.round(w_vgk / s) + z, 0, 15)
  return ((q - z) * s).reshape(w.shape)


HEAD_SCHEMES = [Q.SCHEMES["w8_tensor"], Q.SCHEMES["w8_channel"], Q.SCHEMES["w4_channel"],
                Q.QuantScheme("w4_g16", 4, "group", group_size=16)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", HEAD_SCHEMES, ids=lambda s: s.name)
def test_head_weights_are_quantised_tied_or_not(family, scheme):
  model = _family(family)
  tokens = _tokens(8)
  qmodel = Q.quantize_model(model, scheme)
  h_btd = np.asarray(qmodel.features(tokens), np.float64)  # the head's input in the quantised model
  w_vd = _float_head(model)
  ref = h_btd @ _np_head_quant(w_vd, scheme).T
  out = np.asarray(qmodel(tokens))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # A float head would be far off the reference: the check sees the head's quantisation.
  assert np.abs(h_btd @ w_vd.T - ref).max() > 100 * np.abs(out - ref).max()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("include_embeddings", [False, True])
def test_embedding_lookup_is_quantised_only_with_emb(family, include_embeddings):
  model = _family(family)
  tokens = _tokens(9)
  scheme = Q.resolve_schemes("w4_g128+emb" if include_embeddings else "w4_g128")[0]
  qmodel = Q.quantize_model(model, scheme)
  table_vd = np.asarray(model.embed.embedding[...], np.float64)
  lookup = np.asarray(qmodel.embed(tokens), np.float64)
  if include_embeddings:  # quantised as a head is: per row, groups of 128 along D (one here)
    np.testing.assert_allclose(lookup, _np_head_quant(table_vd, scheme)[np.asarray(tokens)],
                               rtol=1e-5, atol=1e-7)
  else:
    np.testing.assert_array_equal(lookup, table_vd[np.asarray(tokens)])
  # The head is quantised once, with or without +emb.
  np.testing.assert_allclose(np.asarray(qmodel.unembedding(), np.float64),
                             _np_head_quant(_float_head(model), scheme), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["w8a8_tensor", "w8a8_token"])
def test_head_input_is_quantised_under_activation_schemes(family, name):
  model = _family(family)
  tokens = _tokens(10)
  scheme = Q.SCHEMES[name]
  qmodel = Q.quantize_model(model, scheme)
  h_btd = np.asarray(qmodel.features(tokens), np.float64)
  w_hat_vd = _np_head_quant(_float_head(model), scheme)
  ref = _np_act(h_btd, scheme.act) @ w_hat_vd.T
  out = np.asarray(qmodel(tokens))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  weights_only = h_btd @ w_hat_vd.T  # the head with a float input
  assert np.abs(weights_only - ref).max() > 100 * np.abs(out - ref).max()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["w8a8_tensor", "w8a8_channel_tensor"])
def test_per_sequence_scales_ignore_the_rest_of_the_batch(family, name):
  model = _family(family)
  # Token 60 is an outlier: one huge channel, which raises the absmax of any row holding it.
  spike = np.zeros(32, np.float32)
  spike[3] = 50.0
  model.embed.embedding[...] = model.embed.embedding[...].at[60].set(spike)
  a, b = np.asarray(_tokens(11, high=60))
  b_spiked = b.copy()
  b_spiked[2::3] = 60
  qmodel = Q.quantize_model(model, Q.SCHEMES[name])
  out = np.asarray(qmodel(jnp.asarray(np.stack([a, b]))))
  out_spiked = np.asarray(qmodel(jnp.asarray(np.stack([a, b_spiked]))))
  np.testing.assert_allclose(out_spiked[0], out[0], rtol=1e-6, atol=1e-7)
  assert np.abs(out_spiked[1] - out[1]).max() > 1e-3  # the other row did change
  float_out = np.asarray(model(jnp.asarray(np.stack([a, b]))))
  assert np.abs(out[0] - float_out[0]).max() > 1e-4  # and the row is quantised


def _at(model, path):
  node = model
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def _weight(node, role):
  """The weight a quantised-model node multiplies (or looks up) for a role, as numpy."""
  node = node.inner if isinstance(node, Q.ActQuantLinear) else node
  if isinstance(node, Q.TiedHead):
    node = node.head if role == "head" else node.lookup
  table = np.asarray((node.embedding if isinstance(node, nnx.Embed) else node.kernel)[...])
  if role in Q.QKV_WEIGHT_ROLES:  # one of the three matrices in the fused [D, K, G + 2, H] kernel
    return split_qkv(table)[Q.QKV_WEIGHT_ROLES.index(role)]
  return table


@pytest.mark.parametrize("name", ["w8_tensor", "w8a8_token", "w4_g128+emb", "w8a8_tensor+emb"])
def test_every_family_gets_the_same_coverage(name):
  (scheme,) = Q.resolve_schemes(name)
  weights = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out", "head"}
  inputs = {"attn.qkv", "attn.o", "mlp.in", "mlp.out", "head"}
  expected = ({(r, "weight") for r in weights}
              | ({(r, "input") for r in inputs} if scheme.act else set())
              | ({("embedding", "weight")} if scheme.include_embeddings else set()))
  for family in ("gpt2", "llama"):
    model = _family(family)
    targets = Q.quantized_tensors(model, scheme)
    assert {(t.role, t.kind) for t in targets} == expected, family
    assert len(set(targets)) == len(targets)
    # The list is what quantize_model does: each listed weight changed, each listed input wrapped.
    qmodel = Q.quantize_model(model, scheme)
    for t in targets:
      node = _at(qmodel, t.path)
      if t.kind == "input":
        assert (isinstance(node, Q.ActQuantLinear) and node.granularity == scheme.act
                or isinstance(node, Q.TiedHead) and node.act == scheme.act), t
      else:
        float_w = _weight(_at(model, t.path), t.role)
        assert not np.array_equal(_weight(node, t.role), float_w), t
    # ... and nothing else: no other wrapper, no other changed weight.
    wrappers = [m for _, m in nnx.iter_modules(qmodel)
                if isinstance(m, Q.ActQuantLinear) or isinstance(m, Q.TiedHead) and m.act]
    assert len(wrappers) == sum(t.kind == "input" for t in targets)
    lookup_changed = not np.array_equal(_weight(_at(qmodel, "embed"), "embedding"),
                                        np.asarray(model.embed.embedding[...]))
    assert lookup_changed == scheme.include_embeddings
    if model.pos_embed is not None:
      np.testing.assert_array_equal(np.asarray(qmodel.pos_embed.embedding[...]),
                                    np.asarray(model.pos_embed.embedding[...]))


def test_quant_table_notes_say_what_each_scheme_covers():
  from softmax_one_jax.analysis import report

  runs = {"a": {"perplexity": 3.0, "ppl_w8a8_tensor": 3.1, "penalty_w8a8_tensor": 0.1,
                "ppl_w4_g128+emb": 3.5, "penalty_w4_g128+emb": 0.5}}
  md = report.format_quant_table(runs)
  assert Q.COVERAGE_RULE in md and Q.ACT_SCALE_RULE in md
  assert ("- W8A8 tensor/seq (`w8a8_tensor`): weights int8 absmax, one scale per matrix; inputs "
          "int8, one scale per sequence; embedding lookup float.") in md.splitlines()
  assert ("- W4 g128 +emb (`w4_g128+emb`): weights int4 zero-point, one scale per 128 inputs of "
          "an output channel; inputs float; embedding lookup quantised as the head."
          ) in md.splitlines()
  assert report.format_quant_table(runs, notes=False).count("\n") == 2


def _flat(state):
  return {".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_quantize_params_touches_exactly_the_linear_kernels(include_embeddings):
  model = _tiny(mlp="swiglu", tie_embeddings=False, use_bias=True)
  scheme = Q.QuantScheme("w4", 4, "group", group_size=32, include_embeddings=include_embeddings)
  before = _flat(nnx.state(model, nnx.Param))
  after = _flat(Q.quantize_params(nnx.state(model, nnx.Param), scheme))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  linear = {k for k in before if k.endswith("kernel.value")
            and k.split(".")[-3] in Q.LINEAR_NAMES}
  expected = linear | ({"embed.embedding.value"} if include_embeddings else set())
  assert changed == expected
  assert len(linear) == 2 * 5 + 1  # qkv,o,gate,up,down per block + lm_head
  names = Q.quantized_param_names(nnx.state(model, nnx.Param), scheme)
  assert {n + ".value" for n in names} == expected


def test_quantize_model_leaves_original_and_wraps_linears():
  model = _tiny()
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 61, (2, 12)), jnp.int32)
  ref = np.asarray(model(tokens))
  qmodel = Q.quantize_model(model, Q.SCHEMES["w8a8_tensor"])
  np.testing.assert_array_equal(np.asarray(model(tokens)), ref)  # original untouched
  wrapped = [m for _, m in nnx.iter_modules(qmodel) if isinstance(m, Q.ActQuantLinear)]
  assert len(wrapped) == 2 * 4  # qkv,o,up,down per block
  assert isinstance(qmodel.embed, Q.TiedHead) and qmodel.embed.act == "per_sequence"  # the head
  out = np.asarray(qmodel(tokens))
  assert not np.array_equal(out, ref)
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scheme", HEAD_SCHEMES, ids=lambda s: s.name)
def test_fused_qkv_is_quantised_as_three_separate_matrices(family, scheme):
  # Each of q, k and v gets its own scales, as separate projections would: the [in, out] matrix
  # quantised like the head's [out, in] rows (output channels, groups along the input).
  model = _family(family)
  kernel = np.asarray(model.blocks[1].attn.qkv_proj.kernel[...], np.float64)
  kernel[0, 0, -1, 0] *= 30.0  # an outlier in v: under one shared scale it would coarsen q and k
  model.blocks[1].attn.qkv_proj.kernel.set_value(jnp.asarray(kernel, jnp.float32))
  got = np.asarray(Q.quantize_params(nnx.state(model, nnx.Param), scheme)
                   ["blocks"][1]["attn"]["qkv_proj"]["kernel"][...], np.float64)
  for want_part, got_part in zip(split_qkv(kernel), split_qkv(got)):
    np.testing.assert_allclose(got_part, _np_head_quant(want_part.T, scheme).T, rtol=1e-5,
                               atol=1e-6)


def test_act_quant_linear_equals_numpy_reference():
  rng = np.random.default_rng(7)
  lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  x = rng.normal(size=(3, 5, 16)).astype(np.float32)
  x[1, 2, 0] = 50.0
  y = np.asarray(Q.ActQuantLinear(lin, "per_token")(jnp.asarray(x)))
  s = np.abs(x).max(-1, keepdims=True) / 127
  xq = np.clip(np.round(x / s), -127, 127) * s
  ref = xq @ np.asarray(lin.kernel.value) + np.asarray(lin.bias.value)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_with_activation_quant_needs_linears():
  class NoLinear(nnx.Module):
    def __call__(self, x):
      return x

  with pytest.raises(ValueError, match="no linear sub-modules"):
    Q.with_activation_quant(NoLinear(), "per_token")
