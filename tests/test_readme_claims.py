"""Every quantitative statement README.md makes about the library, checked at its stated precision.

Each test quotes the README sentence it backs. Where the sentence is not (or no longer) true, the
test checks the true value and says so beside the quote, so the README can be corrected to it.

Not here: experiment results (the lab table, the tiny runs, the compile table printed by one
`softmax-one compile` run) and timings ("tiny step ~25% faster", "1.02x an AdamW one"), which
`bench/` measures and `bench/RESULTS.md` records (speed lives in bench/, not in tests).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from softmax_one_jax import first_token_stats, softmax1
from softmax_one_jax.analysis.outliers import token_kurtosis
from softmax_one_jax.attention import dot_product_attention
from softmax_one_jax.models import Transformer, count_params, preset
from softmax_one_jax.optim import (
    ScaleByOrthoAdamState,
    orthoadam,
    rotation_state_bytes,
)

# ----------------------------------------------------------------------------- softmax-1


def test_softmax1_is_the_formula_for_any_logits():
  # "**softmax-1** (`exp(x_i) / (1 + sum_j exp(x_j))`, a virtual key with logit 0 and value 0)"
  # and "`jax.nn`-style softmax-1: stable for any logits".
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal((4, 16)) * s for s in (1.0, 30.0, 1e3, 1e4)])
  got = np.asarray(softmax1(jnp.asarray(x, jnp.float32)), np.float64)
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  m = np.maximum(x64.max(axis=-1, keepdims=True), 0.0)  # exp(x_i) / (1 + sum exp(x_j)), stably.
  want = np.exp(x64 - m) / (np.exp(-m) + np.exp(x64 - m).sum(axis=-1, keepdims=True))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


def test_softmax1_readme_examples():
  # "softmax1(jnp.array([0.0, 0.0]))  # [0.333, 0.333]: the null key takes the rest"
  got = np.asarray(softmax1(jnp.array([0.0, 0.0])), np.float64)
  assert np.round(got, 3).tolist() == [0.333, 0.333]
  # "softmax1(jnp.array([-1e4, -1e4]))  # [0, 0]: a head may attend to nothing"
  np.testing.assert_array_equal(np.asarray(softmax1(jnp.array([-1e4, -1e4]))), [0.0, 0.0])


def test_softmax1_bf16_in_fp32_inside_bf16_out_and_masked_rows():
  # "bf16 in / fp32 inside / bf16 out, all-masked rows give zeros"
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)) * 4, jnp.bfloat16)
  y = softmax1(x)
  assert y.dtype == jnp.bfloat16
  # fp32 inside: the bf16 rounding of the float32 result, to one bf16 rounding (2^-8 relative).
  want = np.asarray(softmax1(x.astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2**-8, atol=0)
  where = jnp.zeros((3, 8), bool).at[1].set(True)
  masked = np.asarray(softmax1(x, where=where), np.float32)
  assert np.all(masked[[0, 2]] == 0) and not np.any(np.isnan(masked))


# ----------------------------------------------------------------------------- attention


def test_dot_product_attention_readme_shapes():
  # "q = k = v = jnp.ones((2, 128, 8, 64))  # [batch, seq, heads, head_dim]" and the GQA call
  # with k[:, :, :2]: the output is [batch, seq, heads, head_dim] both times.
  q = k = v = jnp.ones((2, 128, 8, 64))
  out = dot_product_attention(q, k, v, is_causal=True)
  assert out.shape == (2, 128, 8, 64)
  out = dot_product_attention(q, k[:, :, :2], v[:, :, :2], is_causal=True,
                              segment_ids=jnp.zeros((2, 128), jnp.int32))
  assert out.shape == (2, 128, 8, 64)


def _temp_bytes(seq: int) -> int:
  spec = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)
  fn = jax.jit(lambda q, k: first_token_stats(q, k, is_causal=True, implementation="chunked"))
  return fn.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_first_token_stats_memory_is_linear_in_seq_on_the_kernel_paths():
  # "`softmax_one_jax.attention.first_token_stats` | ... in O(seq) memory on the kernel paths
  # (GPU, TPU, `implementation="chunked"`; the CPU default, XLA, builds the `[T, S]` logits)".
  # Checked on "chunked"; "pallas" runs only on a GPU.
  small, large = _temp_bytes(2048), _temp_bytes(8192)
  assert large <= 5 * small, (small, large)  # 4x the sequence: 4x the memory, not 16x.


# ----------------------------------------------------------------------------- OrthoAdam


def _default_q(dim: int) -> np.ndarray:
  """float64 [dim, dim] Q of the default rotation of a [dim] parameter, rotating the basis."""
  state = jax.jit(orthoadam(1e-3).init)({"w": jnp.zeros((dim,))})
  rot = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByOrthoAdamState))
         if isinstance(x, ScaleByOrthoAdamState)][0].rotations["w"]
  q = jax.jit(jax.vmap(rot.rotate))(jnp.eye(dim, dtype=jnp.float32))  # Row j: Q e_j.
  return np.asarray(q, np.float64).T


def _zero_fraction_block_diagonal(dim: int) -> float:
  """Zeros of a block-diagonal matrix whose blocks are the binary digits of dim."""
  blocks = [1 << b for b in range(dim.bit_length()) if dim >> b & 1]
  return 1 - sum(b * b for b in blocks) / dim**2


@pytest.mark.parametrize("dim", [768, 3072])
def test_every_entry_of_the_default_q_is_nonzero(dim):
  # "The default, `"hadamard"`, is a Kronecker product of per-axis randomized Hadamard matrices
  # (...): every entry of Q is nonzero". Checked on the matrix the optimizer applies, at the
  # paper's hidden and MLP widths (neither a power of two).
  q = _default_q(dim)
  assert np.count_nonzero(q == 0) == 0
  np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-5)


def test_every_entry_of_the_default_q_is_nonzero_at_7b_and_vocabulary_lengths():
  # Same sentence, at 11008 (Llama-2-7B MLP) and 50304 (GPT-2's padded vocabulary): too large
  # to build Q, so its structure is checked instead. Q = (R (x) H_{2^k}) D on such an axis
  # (tests/optim/test_rotations.py checks that against numpy), entry ((a, i), (b, j)) =
  # +-R[a, b] / sqrt(2^k): every entry is nonzero iff every entry of R is.
  for dim, m in ((11008, 43), (50304, 393)):
    state = jax.eval_shape(orthoadam(1e-3).init, {"w": jax.ShapeDtypeStruct((dim,), jnp.float32)})
    assert [x.shape for x in jax.tree.leaves(state[0].rotations)] == [(dim,), (m, m)]
    rot = jax.jit(orthoadam(1e-3).init)({"w": jnp.zeros((dim,))})[0].rotations["w"]
    assert np.count_nonzero(np.asarray(rot.mixes[0]) == 0) == 0


def test_the_default_q_is_block_diagonal_where_the_odd_part_is_large():
  # The exception to "every entry of Q is nonzero": an axis whose odd part exceeds 1024, such as
  # the unpadded GPT-2 vocabulary of the gpt2-* presets (50257), keeps the block-diagonal
  # Hadamard (blocks: binary digits). Shown at 1031 (prime): 1024 + 4 + 2 + 1.
  q = _default_q(1031)
  zero = np.count_nonzero(q == 0) / q.size
  np.testing.assert_allclose(zero, _zero_fraction_block_diagonal(1031), atol=1e-9)
  assert 0.01 < zero  # 1.3% here; 46.8% at 50257.


def test_state_is_the_signs_plus_a_small_mix_per_non_power_of_two_axis():
  # "it stores only `sum(d_i)` int8 signs plus one `m x m` float32 matrix per axis that is not a
  # power of two" (4 m^2 bytes; 36 bytes at 768 or 3072, 7,396 at 11008, 617,796 at 50304).
  assert rotation_state_bytes((4096, 4096), "hadamard") == 4096 + 4096
  assert rotation_state_bytes((768, 3072), "hadamard") == 768 + 3072 + 2 * 4 * 3**2
  assert rotation_state_bytes((4096, 11008), "hadamard") == 4096 + 11008 + 4 * 43**2
  assert rotation_state_bytes((50304, 768), "hadamard") == 50304 + 768 + 4 * (393**2 + 3**2)


def _state_bytes(tx, params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


def test_state_ratio_to_adamw_at_llama2_7b():
  # "(state 1.0001x AdamW's at Llama-2-7B)" (1.000068: int8 signs plus the float32 R of 43 x 43
  # for 11008 and 125 x 125 for 32000).
  abstract = nnx.state(nnx.eval_shape(lambda: Transformer(preset("llama2-7b"), rngs=nnx.Rngs(0))),
                       nnx.Param)
  ratio = _state_bytes(orthoadam(1e-3), abstract) / _state_bytes(optax.adamw(1e-3), abstract)
  assert f"{ratio:.4f}" == "1.0001", ratio


def _rotate_flops(n: int) -> float:
  rot = jax.eval_shape(lambda: orthoadam(1e-3).init({"w": jnp.zeros((n,))}))[0].rotations["w"]
  compiled = jax.jit(lambda r, x: r.rotate(x)).lower(
      rot, jax.ShapeDtypeStruct((n,), jnp.float32)).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize("n,m", [(2**10, 1), (2**14, 1), (2**18, 1), (768, 3), (3 * 2**14, 3),
                                 (50304, 393)])
def test_rotation_cost_is_n_log_n_plus_n_m(n, m):
  # "costs O(n log n) additions plus `2m` multiply-adds per element" (R's matmul on an axis of
  # length m 2^k). XLA counts the Hadamard's small +-1 matmuls
  # (factors of <= 32 on CPU: <= 2 * 32 / 5 = 12.8 flops per element per bit), plus the signs
  # and the 1/sqrt(2^k) scale: one multiply each per element.
  assert _rotate_flops(n) <= 12.8 * n * math.log2(n) + 2 * n * m + 3 * n, (n, m)


def test_shardings_change_where_the_rotation_runs_not_q():
  # "`orthoadam(..., shardings=param_shardings)` keeps `Q` as on one device"
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.zeros((768, 64)), "b": jnp.zeros((3072,))}
  shardings = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P(("data", "fsdp")))}
  a = jax.jit(orthoadam(1e-3, shardings=shardings).init)(jax.device_put(params, shardings))
  b = jax.jit(orthoadam(1e-3).init)(params)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_identity_rotation_is_adamw():
  # "With `"identity"` it is `optax.adamw`."
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
  kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
  txs = (orthoadam(1e-2, rotation="identity", **kw), optax.adamw(1e-2, **kw))
  out = []
  for tx in txs:
    p, s = params, tx.init(params)
    for t in range(5):
      g = {"w": jnp.asarray(np.random.default_rng(t).standard_normal((8, 12)), jnp.float32)}
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    out.append(np.asarray(p["w"]))
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- models, analysis


def test_llama2_7b_parameter_count():
  # "count_params(preset("llama2-7b"))  # 6_738_415_616, no weights made" and "`llama2-7b` (the
  # real Llama-2-7B shape)": Hugging Face's Llama-2-7b has 6,738,415,616 parameters.
  assert count_params(preset("llama2-7b")) == 6_738_415_616


def test_logits_shape():
  # "logits = model(tokens)  # [batch, seq, vocab]"
  config = preset("tiny")
  model = Transformer(config, rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((2, 16), jnp.int32))
  assert logits.shape == (2, 16, config.vocab_size)


@pytest.mark.parametrize("name", ["tiny", "llama2-60m"])
def test_scalar_rmsnorm_has_one_scalar_gain_per_norm(name):
  # "`norm="scalar_rmsnorm"` has one learned scalar gain per norm."
  abstract = nnx.state(nnx.eval_shape(
      lambda: Transformer(preset(name, norm="scalar_rmsnorm"), rngs=nnx.Rngs(0))), nnx.Param)
  norms = {jax.tree_util.keystr(p): x.shape
           for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0] if "norm" in str(p)}
  config = preset(name)
  assert len(norms) == 2 * config.num_layers + 1  # attention and MLP norms, and the final one.
  assert all(shape == () for shape in norms.values()), norms


def test_kurtosis_is_the_raw_fourth_standardised_moment():
  # "kurtosis is the raw fourth standardised moment over the hidden dimension of each token"
  x = np.random.default_rng(3).standard_t(5, size=(6, 256))
  want = scipy.stats.kurtosis(x, axis=-1, fisher=False, bias=True)  # E[(x-mu)^4] / sigma^4.
  np.testing.assert_allclose(np.asarray(token_kurtosis(jnp.asarray(x, jnp.float32))), want,
                             rtol=1e-4)
