"""Round-to-nearest quantisers: error bounds, exact grids, and their application to a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from softmax_one_jax.analysis import quantize as Q


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


def test_activation_quant_per_token_vs_per_tensor():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  x[0, 0, 3] = 1000.0  # a massive activation on one token
  per_tensor = np.asarray(Q.fake_quant_activation(jnp.asarray(x), "per_tensor"))
  per_token = np.asarray(Q.fake_quant_activation(jnp.asarray(x), "per_token"))
  step_tensor = 1000.0 / 127
  assert np.all(np.abs(per_tensor - x) <= step_tensor / 2 * (1 + 1e-5))
  step_tok = np.abs(x).max(-1, keepdims=True) / 127
  assert np.all(np.abs(per_token - x) <= step_tok / 2 * (1 + 1e-5))
  # The outlier wipes out every other token under per-tensor scaling, not under per-token.
  assert np.abs(per_tensor[1] - x[1]).mean() > 10 * np.abs(per_token[1] - x[1]).mean()
  with pytest.raises(ValueError, match="granularity"):
    Q.fake_quant_activation(jnp.asarray(x), "per_channel")


def test_scheme_validation():
  with pytest.raises(ValueError, match="granularity"):
    Q.QuantScheme("bad", 4, "per_tensor")
  with pytest.raises(ValueError, match="weight_bits"):
    Q.QuantScheme("bad", 3, "per_channel")
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
  assert len(linear) == 2 * 7 + 1  # q,k,v,o,gate,up,down per block + lm_head
  names = Q.quantized_param_names(nnx.state(model, nnx.Param), scheme)
  assert {n + ".value" for n in names} == expected


def test_quantize_model_leaves_original_and_wraps_linears():
  model = _tiny()
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 61, (2, 12)), jnp.int32)
  ref = np.asarray(model(tokens))
  qmodel = Q.quantize_model(model, Q.SCHEMES["w8a8_tensor"])
  np.testing.assert_array_equal(np.asarray(model(tokens)), ref)  # original untouched
  wrapped = [m for _, m in nnx.iter_modules(qmodel) if isinstance(m, Q.ActQuantLinear)]
  assert len(wrapped) == 2 * 6  # q,k,v,o,up,down per block (tied embeddings: no lm_head)
  out = np.asarray(qmodel(tokens))
  assert not np.array_equal(out, ref)
  assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


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
