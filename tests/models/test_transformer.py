"""Properties of the Transformer: causality, packing, KV cache, norms, sharding names, switches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from softmax_one_jax.models import (Transformer, generate, positions_from_segments, preset,
                                    with_intermediates)
from softmax_one_jax.models.intermediates import SowConfig
from softmax_one_jax.models.layers import ScalarLayerNorm, fuse_qkv, split_qkv

FLAVOURS = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                  tie_embeddings=False, num_kv_heads=2),
    "llama-scalar-softmax": dict(position="rope", norm="scalar_rmsnorm", mlp="swiglu",
                                 use_bias=False, softmax="softmax"),
    "llama-learned-sink": dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                               tie_embeddings=False, num_kv_heads=2, softmax="learned_sink"),
    "gpt2-scalar-layernorm": dict(norm="scalar_layernorm"),
}


def small(flavour: str, **overrides):
  base = dict(vocab_size=97, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_seq_len=64)
  return preset("tiny", **{**base, **FLAVOURS[flavour], **overrides})


def sink_params(model) -> list:
  """The ``sink_logits`` parameters of a model (empty unless ``softmax="learned_sink"``)."""
  return [v for path, v in nnx.state(model, nnx.Param).flat_state() if path[-1] == "sink_logits"]


def randomize_sinks(model, rng):
  """Gives learned sinks random non-zero values (they start at 0, i.e. at softmax-1)."""
  for var in sink_params(model):
    var.value = jnp.asarray(rng.standard_normal(var.value.shape) * 2.0, jnp.float32)
  return model


@nnx.jit(static_argnames="intermediates")
def forward(model, x, segment_ids=None, intermediates=()):
  if intermediates:
    return with_intermediates(model, x, intermediates, segment_ids=segment_ids)
  return model(x, segment_ids=segment_ids)


def tokens(rng, b, t, vocab=97):
  return jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_changing_a_future_token_never_changes_past_logits(np_rng, flavour):
  model = Transformer(small(flavour), rngs=nnx.Rngs(int(np_rng.integers(1 << 30))))
  randomize_sinks(model, np_rng)
  x = tokens(np_rng, 2, 16)
  j = int(np_rng.integers(1, 16))
  y = x.at[:, j:].set((x[:, j:] + 1 + tokens(np_rng, 2, 16 - j, 90)) % 97)
  a, b = forward(model, x), forward(model, y)
  np.testing.assert_array_equal(a[:, :j], b[:, :j])
  assert not np.allclose(a[:, j:], b[:, j:])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_packed_sequences_equal_separate_sequences(np_rng, flavour):
  model = randomize_sinks(Transformer(small(flavour), rngs=nnx.Rngs(1)), np_rng)
  lengths = [5, 8, 3]
  docs = [tokens(np_rng, 1, n) for n in lengths]
  packed = jnp.concatenate(docs, axis=1)
  segment_ids = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None], jnp.int32)
  got = forward(model, packed, segment_ids)
  want = jnp.concatenate([forward(model, d) for d in docs], axis=1)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 0, 1, 2, 0, 0, 1]])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_decoding_equals_full_forward(np_rng, flavour):
  model = randomize_sinks(Transformer(small(flavour), rngs=nnx.Rngs(2)), np_rng)
  x = tokens(np_rng, 3, 12)
  full = forward(model, x)
  extend = nnx.jit(lambda m, x, cache: m(x, cache=cache))
  cache = model.init_cache(3, 16)
  logits, cache = extend(model, x[:, :5], cache)
  pieces = [logits]
  for start, stop in [(5, 6), (6, 9), (9, 10), (10, 12)]:
    logits, cache = extend(model, x[:, start:stop], cache)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=2e-5, atol=2e-5)
  assert int(cache.end) == 12


@pytest.mark.parametrize("flavour", ["llama", "llama-learned-sink"])
def test_greedy_generate_equals_repeated_full_forward(np_rng, flavour):
  model = randomize_sinks(Transformer(small(flavour), rngs=nnx.Rngs(3)), np_rng)
  prompt = tokens(np_rng, 2, 4)
  got = generate(model, prompt, 6)
  # Reference: the full forward pass on a fixed-size buffer; by causality the logits at position
  # p only see tokens <= p, so the not-yet-written tail does not matter.
  seq = jnp.zeros((2, 10), jnp.int32).at[:, :4].set(prompt)
  for p in range(4, 10):
    seq = seq.at[:, p].set(jnp.argmax(forward(model, seq)[:, p - 1], axis=-1).astype(jnp.int32))
  np.testing.assert_array_equal(got, seq)


def test_sampling_respects_top_k_and_is_deterministic(np_rng):
  model = Transformer(small("gpt2"), rngs=nnx.Rngs(4))
  prompt = tokens(np_rng, 4, 3)
  a = generate(model, prompt, 5, rng=jax.random.key(7), temperature=1.0, top_k=1)
  np.testing.assert_array_equal(a, generate(model, prompt, 5))  # top-1 sampling is greedy
  b = generate(model, prompt, 5, rng=jax.random.key(7), temperature=2.0, top_k=20)
  c = generate(model, prompt, 5, rng=jax.random.key(7), temperature=2.0, top_k=20)
  np.testing.assert_array_equal(b, c)
  with pytest.raises(ValueError, match="needs rng"):
    generate(model, prompt, 5, temperature=1.0)


def test_scalar_rmsnorm_has_exactly_one_gain_per_norm():
  model = Transformer(small("llama-scalar-softmax"), rngs=nnx.Rngs(0))
  norms = [m for _, m in model.iter_modules() if type(m).__name__ == "RMSNorm"]
  assert len(norms) == 2 * 2 + 1  # two per block and the final norm
  for norm in norms:
    assert norm.scale.value.shape == ()
  scales = [v for path, v in nnx.state(model, nnx.Param).flat_state() if "scale" in path]
  assert sum(v.value.size for v in scales) == 5


def test_every_parameter_has_logical_sharding_names():
  for flavour in FLAVOURS:
    abstract = nnx.eval_shape(lambda: Transformer(small(flavour), rngs=nnx.Rngs(0)))
    for path, var in nnx.state(abstract, nnx.Param).flat_state():
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var.value.ndim, (path, names)
      assert set(names) <= {None, "vocab", "embed", "heads", "kv_heads", "mlp"}


def test_softmax_switch_changes_attention_row_sums(np_rng):
  x = tokens(np_rng, 2, 10)
  sums = {}
  for kind in ["softmax", "softmax1", "learned_sink"]:
    model = randomize_sinks(Transformer(small("gpt2", softmax=kind), rngs=nnx.Rngs(5)), np_rng)
    _, inter = forward(model, x, intermediates=("attention_probs", "hidden"))
    assert inter["attention_probs"].shape == (2, 2, 4, 10, 10)
    assert inter["hidden"].shape == (2, 2, 10, 32)
    sums[kind] = np.asarray(inter["attention_probs"].sum(-1))
    np.testing.assert_allclose(
        forward(model, x, intermediates=("hidden",))[0], forward(model, x), rtol=1e-6)
  np.testing.assert_allclose(sums["softmax"], 1.0, rtol=1e-5)
  assert (sums["softmax1"] < 1.0).all() and (sums["learned_sink"] < 1.0).all()
  # Query 0 sees key 0 only: its row sums to sigmoid(s_0 - c_n), c_n the head's sink logit.
  sinks_ln = np.stack([np.asarray(v.value) for v in sink_params(model)])
  np.testing.assert_array_less(0.0, np.abs(sinks_ln))
  _, inter = forward(model, x, intermediates=("attention_stats",))
  null_lbn = np.asarray(inter["attention_stats"]["null_mass"])[..., 0]
  np.testing.assert_allclose(sums["learned_sink"][..., 0], 1.0 - null_lbn, rtol=1e-5, atol=1e-6)


def test_remat_gives_the_same_loss_and_gradients(np_rng):
  x = tokens(np_rng, 2, 8)

  def loss_and_grads(remat):
    model = Transformer(small("llama", remat=remat), rngs=nnx.Rngs(6))
    loss = lambda m: jnp.mean(jax.nn.logsumexp(m(x), axis=-1))
    return nnx.jit(nnx.value_and_grad(loss))(model)

  (l0, g0), (l1, g1) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bfloat16_compute_keeps_float32_params_and_logits(np_rng):
  model = Transformer(small("llama", dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits = forward(model, tokens(np_rng, 2, 8))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert {v.value.dtype for _, v in nnx.state(model, nnx.Param).flat_state()} == {jnp.dtype("float32")}


def test_clear_errors_for_bad_inputs():
  model = Transformer(small("gpt2"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_seq_len=64"):
    model(jnp.zeros((1, 65), jnp.int32))
  with pytest.raises(ValueError, match="integer ids of shape"):
    model(jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="unknown intermediates"):
    with_intermediates(model, jnp.zeros((1, 4), jnp.int32), ["logits"])
  with pytest.raises(ValueError, match="pass neither positions nor segment_ids"):
    model(jnp.zeros((1, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32),
          cache=model.init_cache(1, 8))


@pytest.mark.parametrize("flavour", ["llama", "llama-learned-sink"])
def test_attention_stats_agree_with_attention_probs(np_rng, flavour):
  model = randomize_sinks(Transformer(small(flavour), rngs=nnx.Rngs(8)), np_rng)
  x = tokens(np_rng, 2, 12)
  seg = jnp.asarray(np.repeat([[1, 2]], [7, 5], axis=1).repeat(2, 0), jnp.int32)
  _, inter = forward(model, x, seg, intermediates=("attention_probs", "attention_stats"))
  probs, stats = np.asarray(inter["attention_probs"]), inter["attention_stats"]
  assert stats["prob_first"].shape == (2, 2, 4, 12)  # [L, B, N, T]
  first_key = np.repeat([0, 7], [7, 5])  # each query's document starts at key 0 or key 7
  probs_first = probs[..., np.arange(12), first_key]  # [L, B, N, T]
  np.testing.assert_allclose(stats["prob_first"], probs_first, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(stats["null_mass"], 1.0 - probs.sum(-1), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(stats["argmax_first"], probs.argmax(-1) == first_key)


def test_learned_sinks_start_at_softmax1_and_train(np_rng):
  """``sink_logits`` start at 0 (the model is exactly its softmax-1 twin), get a non-zero
  gradient in every layer, and move with an optimizer step that lowers the loss."""
  cfg = small("gpt2", softmax="learned_sink")
  model = Transformer(cfg, rngs=nnx.Rngs(9))
  twin = Transformer(cfg.replace(softmax="softmax1"), rngs=nnx.Rngs(9))
  x = tokens(np_rng, 4, 16)
  np.testing.assert_array_equal(forward(model, x), forward(twin, x))
  sinks = sink_params(model)
  assert len(sinks) == cfg.num_layers
  for var in sinks:
    assert var.value.shape == (cfg.num_heads,) and var.value.dtype == jnp.float32
    assert var.get_metadata().get("out_sharding") == ("heads",)
    np.testing.assert_array_equal(var.value, 0.0)

  def loss_fn(m):
    logits = m(x[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]))

  params = nnx.state(model, nnx.Param)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  loss0, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  sink_grads = [v.value for path, v in grads.flat_state() if path[-1] == "sink_logits"]
  assert len(sink_grads) == cfg.num_layers
  for g in sink_grads:
    assert np.isfinite(g).all() and np.abs(g).max() > 0.0, g
  updates, opt_state = tx.update(grads, opt_state, params)
  nnx.update(model, optax.apply_updates(params, updates))
  for var in sink_params(model):
    assert np.abs(np.asarray(var.value)).max() > 0.0
  assert float(nnx.jit(loss_fn)(model)) < float(loss0)


def _np_scalar_layernorm(x, gain, bias, eps):
  """float64 reference: centre, divide by the standard deviation, one gain, per-channel bias."""
  x = np.asarray(x, np.float64)
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + eps) * gain + bias


def test_scalar_layernorm_matches_a_float64_reference(np_rng):
  d = 48
  norm = ScalarLayerNorm(d, eps=1e-5)
  gain = float(np_rng.uniform(0.3, 3.0) * np_rng.choice([-1.0, 1.0]))
  bias = np_rng.normal(size=d)
  norm.scale.value = jnp.asarray(gain, jnp.float32)
  norm.bias.value = jnp.asarray(bias, jnp.float32)
  # Rows with their own offset and spread, so centring and variance normalisation both matter.
  x = (np_rng.normal(size=(3, 7, d)) * np_rng.uniform(0.1, 10.0, (3, 7, 1))
       + np_rng.normal(size=(3, 7, 1)) * 5.0)
  got = norm(jnp.asarray(x, jnp.float32))
  assert got.dtype == jnp.float32 and got.shape == x.shape
  np.testing.assert_allclose(got, _np_scalar_layernorm(x, gain, bias, 1e-5), rtol=1e-5, atol=1e-5)
  # bfloat16 compute: statistics in float32, the output rounded to bfloat16 once.
  half = ScalarLayerNorm(d, eps=1e-5, dtype=jnp.bfloat16)
  half.scale.value, half.bias.value = norm.scale.value, norm.bias.value
  got16 = half(jnp.asarray(x, jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  ref16 = _np_scalar_layernorm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), gain, bias,
                               1e-5)
  np.testing.assert_allclose(np.asarray(got16, np.float64), ref16, rtol=1e-2, atol=1e-2)


def test_scalar_layernorm_has_one_scalar_gain_and_a_per_channel_bias():
  model = Transformer(small("gpt2-scalar-layernorm"), rngs=nnx.Rngs(0))
  norms = [m for _, m in model.iter_modules() if isinstance(m, ScalarLayerNorm)]
  assert len(norms) == 2 * 2 + 1  # two per block and the final norm
  for norm in norms:
    assert norm.scale.value.shape == () and float(norm.scale.value) == 1.0
    assert norm.bias.value.shape == (32,)
    np.testing.assert_array_equal(norm.bias.value, 0.0)
    assert norm.scale.get_metadata()["out_sharding"] == ()
    assert norm.bias.get_metadata()["out_sharding"] == ("embed",)
  # Only the gain differs from LayerNorm: D - 1 fewer parameters per norm.
  layernorm = Transformer(small("gpt2"), rngs=nnx.Rngs(0))
  n_params = lambda m: sum(v.value.size for _, v in nnx.state(m, nnx.Param).flat_state())
  assert n_params(layernorm) - n_params(model) == 5 * (32 - 1)


@pytest.mark.parametrize("optimizer", ["adamw", "orthoadam"])
def test_a_scalar_layernorm_model_trains_one_step(np_rng, optimizer):
  """One sharded train step: the gains and biases move, are never decayed, and the loss drops."""
  from softmax_one_jax.training import mesh as mesh_lib
  from softmax_one_jax.rundir import model_config_from
  from softmax_one_jax.training.state import (build_optimizer, init_train_state, make_setup,
                                              weight_decay_mask)
  from softmax_one_jax.training.step import jit_train_step
  from tests.training._micro import micro_config, random_batch

  c = micro_config(optimizer=optimizer)
  c.model.norm = "scalar_layernorm"
  c.optimizer.warmup_steps = 0
  model_cfg = model_config_from(c, 512)
  mesh = mesh_lib.make_mesh(1, 2, 2, devices=jax.devices()[:4])
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, mesh, seed=0)
  state = init_train_state(setup, model_cfg, seed=0)
  step = jit_train_step(setup, 1, 8)
  batch = mesh_lib.global_batch(random_batch(np_rng, 8, 32, 512),
                                mesh_lib.batch_sharding(mesh, 8))
  before = jax.tree.map(np.array, state.params)  # copies: the step donates the state
  state, m1 = step(state, batch)
  after = jax.tree.map(np.array, state.params)
  _, m2 = step(state, batch)
  assert np.isfinite(float(m1["loss"])) and float(m2["loss"]) < float(m1["loss"])
  decayed = dict(weight_decay_mask(before).flat_state())
  after_by_path = dict(after.flat_state())
  moved = 0
  for path, var in before.flat_state():
    if not any(str(k).endswith("norm") for k in path):
      continue
    new = after_by_path[path].value
    assert new.shape == ((32,) if path[-1] == "bias" else ()), path
    assert np.isfinite(new).all() and not np.array_equal(new, var.value), path
    assert decayed[path].value is False, path  # gains and biases: never weight-decayed
    moved += 1
  assert moved == 3 * 2  # attn_norm, mlp_norm and final_norm, each a scale and a bias
  assert decayed[("blocks", 0, "attn", "qkv_proj", "kernel")].value is True


# ------------------------------------------------------------------------------------------------
# The fused q/k/v parameter and the intermediates the layers sow.


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])   # multi-head; grouped-query (2 kv heads)
def test_fused_qkv_kernel_is_each_kv_head_with_the_query_heads_that_read_it(np_rng, flavour):
  model = Transformer(small(flavour), rngs=nnx.Rngs(int(np_rng.integers(1 << 30))))
  c, attn = model.config, model.blocks[0].attn
  w = np.asarray(attn.qkv_proj.kernel[...], np.float64)          # [D, K, G + 2, H]
  g = c.num_heads // c.num_kv_heads
  assert w.shape == (c.d_model, c.num_kv_heads, g + 2, c.head_dim)
  x = np_rng.standard_normal((2, 5, c.d_model))
  q, k, v = (np.asarray(a, np.float64) for a in attn.qkv_proj(jnp.asarray(x, jnp.float32)))
  bias = (np.zeros(w.shape[1:]) if attn.qkv_proj.bias is None
          else np.asarray(attn.qkv_proj.bias[...], np.float64))
  # Query head n reads kv head n // G (Hugging Face's repeat_kv): its weights sit at [:, n // G,
  # n % G]; kv head j's key and value at [:, j, G] and [:, j, G + 1].
  for n in range(c.num_heads):
    want = x @ w[:, n // g, n % g] + bias[n // g, n % g]
    np.testing.assert_allclose(q[:, :, n], want, rtol=1e-5, atol=1e-5)
  for j in range(c.num_kv_heads):
    np.testing.assert_allclose(k[:, :, j], x @ w[:, j, g] + bias[j, g], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v[:, :, j], x @ w[:, j, g + 1] + bias[j, g + 1], rtol=1e-5,
                               atol=1e-5)
  wq, wk, wv = split_qkv(w)
  np.testing.assert_array_equal(wq[:, 3 * c.head_dim:4 * c.head_dim], w[:, 3 // g, 3 % g])
  np.testing.assert_array_equal(fuse_qkv(wq, wk, wv, c.num_kv_heads), w)


def test_with_intermediates_records_once_and_leaves_the_model_as_it_was(np_rng):
  model = Transformer(small("llama-learned-sink", remat=True), rngs=nnx.Rngs(9))
  x = tokens(np_rng, 2, 8)
  before = nnx.graphdef(model)
  logits, inter = forward(model, x, intermediates=("hidden", "values", "attention_stats"))
  np.testing.assert_array_equal(logits, forward(model, x))
  assert inter["hidden"].shape == (2, 2, 8, 32) and inter["values"].shape == (2, 2, 8, 16)
  assert inter["attention_stats"]["prob_first"].shape == (2, 2, 4, 8)
  assert nnx.graphdef(model) == before and not nnx.state(model, nnx.Intermediate)
  assert {m.sow_config for _, m in model.iter_modules() if hasattr(m, "sow_config")} == {
      SowConfig()}
  # The last block's output is what the final norm reads: the logits follow from it alone.
  head = model.embed.attend if model.lm_head is None else model.lm_head
  np.testing.assert_allclose(head(model.final_norm(inter["hidden"][-1])), logits, rtol=2e-5,
                             atol=2e-5)
  # Values: layer 1's are its normalised input (layer 0's output) times the value weights.
  w = np.asarray(model.blocks[1].attn.qkv_proj.kernel[...])
  x1 = np.asarray(model.blocks[1].attn_norm(inter["hidden"][0]), np.float64)
  want = np.einsum("btd,dkh->btkh", x1, w[:, :, -1]).reshape(2, 8, -1)
  np.testing.assert_allclose(inter["values"][1], want, rtol=1e-4, atol=1e-5)
