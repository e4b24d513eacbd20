"""The "cudnn" path's construction: softmax-1 and learned sinks as softmax over one zero key.

cuDNN itself needs a GPU; what it is handed does not. ``null_key_attention`` builds the extra
key, query rows, head columns and sequence lengths, then calls a softmax attention with
``jax.nn.dot_product_attention``'s keywords. Here that attention is a float64 stand-in (plain
softmax over an explicit mask: what cuDNN computes) and jax.nn's own XLA implementation; the
result is compared with the independent float64 numpy attention of ``reference_np.py``, values
and gradients, on fresh inputs. The GPU program itself is compiled in
``tests/training/test_gpu_compile.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import cudnn, dot_product_attention, resolve_implementation
from tests.attention.reference_np import np_attention_grads, random_sinks


def plain_softmax_attention(q, k, v, *, mask=None, scale, is_causal=False,
                            query_seq_lengths=None, key_value_seq_lengths=None):
  """Softmax attention as cuDNN defines it (top-left causal mask, padding by lengths: rows past
  a query length are 0), in the inputs' dtype, written out independently of the package."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  k = jnp.repeat(k, n // kh, axis=2)
  v = jnp.repeat(v, n // kh, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  allowed = jnp.ones((b, n, t, s), bool)
  if is_causal:
    allowed &= jnp.tril(jnp.ones((t, s), bool))
  if mask is not None:
    allowed &= mask
  if key_value_seq_lengths is not None:
    allowed &= (jnp.arange(s)[None, :] < key_value_seq_lengths[:, None])[:, None, None, :]
  # A large finite negative, as jax.nn and cuDNN use: a row that sees nothing (a padded query
  # row) stays finite, and is zeroed below.
  logits = jnp.where(allowed, logits, -1e30)
  probs = jnp.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  out = jnp.einsum("bnts,bsnh->btnh", probs, v)
  if query_seq_lengths is not None:
    out = jnp.where((jnp.arange(t)[None, :] < query_seq_lengths[:, None])[..., None, None],
                    out, 0)
  return out


def _case(rng, b, t, s, n, kh, h, segments):
  q, k, v = (rng.standard_normal(shape) for shape in
             ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))
  w = rng.standard_normal((b, t, n, h))
  ids = None
  if segments == "self":
    ids = np.sort(rng.integers(0, 3, (b, t)), axis=1)
  elif segments == "padding":  # a trailing run of padding (id 0) in each row
    ids = np.ones((b, t), int)
    ids[:, t - 3:] = 0
  return q, k, v, w, ids


# (T, S, causal): even and odd lengths (the construction pads an odd one), causal self-attention
# and non-causal cross-attention.
SHAPES = [(8, 8, True), (9, 9, True), (8, 8, False), (7, 12, False)]


# Segment ids are self-attention ids here: square shapes only.
CASES = [(softmax, *shape, segments)
         for softmax in ("softmax1", "learned_sink", "softmax") for shape in SHAPES
         for segments in (None, "self", "padding") if segments is None or shape[0] == shape[1]]


@pytest.mark.parametrize("softmax,t,s,is_causal,segments", CASES)
def test_the_null_key_construction_is_exact_in_float64(np_rng, softmax, t, s, is_causal,
                                                        segments):
  b, n, kh, h = 2, 4, 2, 16   # grouped-query: two query heads per key/value head
  q, k, v, w, ids = _case(np_rng, b, t, s, n, kh, h, segments)
  sinks = random_sinks(np_rng, n) if softmax == "learned_sink" else None
  kwargs = dict(softmax=softmax, is_causal=is_causal)
  with jax.enable_x64(True):
    def attn(q, k, v, sinks):
      return cudnn.null_key_attention(
          q, k, v, segment_ids=None if ids is None else jnp.asarray(ids), sinks=sinks,
          implementation=plain_softmax_attention, **kwargs)
    args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
    sinks_arg = None if sinks is None else jnp.asarray(sinks, jnp.float64)
    out = attn(*args, sinks_arg)
    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    grads = jax.grad(lambda *a: jnp.sum(attn(*a) * w), argnums=argnums)(*args, sinks_arg)
  want = np_attention_grads(q, k, v, w, segment_ids=ids, sinks=sinks, **kwargs)
  np.testing.assert_allclose(out, want[0], rtol=1e-12, atol=1e-12)
  for got, ref in zip(grads, want[1:]):
    np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_jax_nn_attention_takes_the_construction(np_rng, softmax):
  """Through ``jax.nn.dot_product_attention(implementation="xla")``, which runs its softmax in
  float32 (hence float32 tolerances), with its own padding masks for the odd length."""
  q, k, v, w, _ = _case(np_rng, 2, 9, 9, 4, 2, 16, None)
  sinks = random_sinks(np_rng, 4) if softmax == "learned_sink" else None
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
  attn = lambda q, k, v: cudnn.null_key_attention(  # noqa: E731
      q, k, v, softmax=softmax, is_causal=True, sinks=sinks, implementation="xla")
  out = attn(*args)
  dq, dk, dv = jax.grad(lambda *a: jnp.sum(attn(*a) * w), argnums=(0, 1, 2))(*args)
  want = np_attention_grads(q, k, v, w, softmax=softmax, is_causal=True, sinks=sinks)
  np.testing.assert_allclose(out, want[0], rtol=2e-5, atol=2e-5)
  for got, ref in zip((dq, dk, dv), want[1:4]):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_sinks_survive_bfloat16_queries_to_float32_rounding(np_rng):
  """The sink logit rides on the query in three bfloat16 terms: their float32 sum is the logit
  to float32 rounding, where one bfloat16 would be off by up to 2^-9 of it."""
  sinks = jnp.asarray(random_sinks(np_rng, 64), jnp.float32)
  terms = cudnn.split_in_terms(sinks, jnp.bfloat16)
  assert terms.dtype == jnp.bfloat16 and terms.shape == (64, 3)
  total = terms.astype(jnp.float32).sum(-1)
  np.testing.assert_allclose(total, sinks, rtol=2e-7, atol=1e-30)
  one_term = sinks.astype(jnp.bfloat16).astype(jnp.float32)
  assert float(jnp.abs(one_term - sinks).max()) > 100 * float(jnp.abs(total - sinks).max())
  # Its gradient is the identity, carried by the first term alone.
  grad = jax.grad(lambda x: cudnn.split_in_terms(x, jnp.bfloat16).astype(jnp.float32).sum())
  np.testing.assert_array_equal(grad(sinks[:3]), jnp.ones(3))


def test_the_rule_for_what_cudnn_takes():
  rule = lambda **kw: cudnn.unsupported_reason(  # noqa: E731
      **{**dict(softmax="softmax1", dtype=jnp.bfloat16, head_dim=128, q_len=1024, kv_len=1024),
         **kw})
  assert rule() is None
  assert rule(softmax="softmax") is None and rule(dtype=jnp.float16) is None
  assert "float32" in rule(dtype=jnp.float32)
  assert "dense mask" in rule(mask=True)
  assert "head dim 80" not in (rule(head_dim=80) or "")     # 80 = 10 x 8: taken
  assert "head dim 100" in rule(head_dim=100)               # not a multiple of 8
  assert "head dim 256" in rule(head_dim=256)               # above 128 where no Hopper is seen
  assert rule(softmax="learned_sink", head_dim=64) is None   # 64 + 8 columns for the sinks
  assert "+ 8 for the sinks" in rule(softmax="learned_sink", head_dim=128)
  assert "top-left" in rule(q_len=1, kv_len=1024)
  assert rule(q_len=1, kv_len=1024, is_causal=False) is None


def test_gpus_default_to_cudnn_where_it_takes_the_call(monkeypatch):
  common = dict(backend="gpu", dtype=jnp.bfloat16, head_dim=64, q_len=256, kv_len=256)
  monkeypatch.setattr(cudnn, "cudnn_available", lambda: True)
  assert resolve_implementation(None, **common) == "cudnn"
  assert resolve_implementation(None, **{**common, "dtype": jnp.float32}) == "xla"
  assert resolve_implementation(None, **common, mask=jnp.ones((1, 1), bool)) == "xla"
  assert resolve_implementation("pallas", backend="gpu") == "pallas_gpu"   # by name only
  monkeypatch.setattr(cudnn, "cudnn_available", lambda: False)
  assert resolve_implementation(None, **common) == "xla"   # a CUDA jax without cuDNN


def test_cudnn_by_name_refuses_what_it_cannot_take_and_names_the_fix():
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"'cudnn' does not take float32.*implementation=None"):
    dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
