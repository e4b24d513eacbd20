"""load_hf: randomly initialised Hugging Face GPT-2 and Llama (GQA) give transformers' logits.

The equivalence tests need the ``hf`` extra (torch, transformers); .ci/run installs it (with the
CPU torch pinned). Without it they skip with the reason.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.models import hf


def _torch_and_transformers():
  torch = pytest.importorskip(
      "torch", reason="the HF equivalence tests need torch: pip install torch==2.13.0 '.[hf]'")
  transformers = pytest.importorskip(
      "transformers", reason="the HF equivalence tests need transformers: pip install '.[hf]'")
  return torch, transformers


def _randomize(torch, model, std):
  """Larger-than-default random weights (norm gains around 1), so logits are far from zero."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_gain = ("ln_" in name or "norm" in name) and name.endswith("weight")
      p.copy_(1.0 + noise if is_gain else noise)


def _compare(torch, hf_model, path, vocab, seq_len=24):
  hf_model.eval()
  hf_model.save_pretrained(path, safe_serialization=True)
  model = hf.load_hf(path)
  tokens = np.random.default_rng(0).integers(0, vocab, size=(2, seq_len))
  with torch.no_grad():
    ref = hf_model(torch.as_tensor(tokens)).logits.float().numpy()
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  assert ours.shape == ref.shape
  scale = np.abs(ref).max()
  assert scale > 1.0  # a meaningful comparison, not near-zero logits
  np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0)
  return model


def test_gpt2_logits_match_transformers(tmp_path):
  torch, transformers = _torch_and_transformers()
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                   attn_implementation="eager")
  hf_model = transformers.GPT2LMHeadModel(config)
  _randomize(torch, hf_model, 0.3)
  model = _compare(torch, hf_model, tmp_path, 101)
  cfg = model.config
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim) == (2, 48, 4, 192)
  assert cfg.softmax == "softmax" and cfg.tie_embeddings and cfg.position == "learned"


@pytest.mark.parametrize("tie", [False, True])
def test_llama_gqa_logits_match_transformers(tmp_path, tie):
  torch, transformers = _torch_and_transformers()
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-6, tie_word_embeddings=tie, attn_implementation="eager",
      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
  )
  hf_model = transformers.LlamaForCausalLM(config)
  _randomize(torch, hf_model, 0.25)
  if tie:
    hf_model.tie_weights()
  model = _compare(torch, hf_model, tmp_path, 103)
  cfg = model.config
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
  assert cfg.rope_theta == 500.0 and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
  assert cfg.tie_embeddings == tie
  if not tie:  # the analysis runs on an imported model as on ours (grouped-query attention)
    from softmax_one_jax.analysis.outliers import evaluate_sums, finalize

    tokens = np.random.default_rng(3).integers(0, 103, size=(1, 2, 16)).astype(np.int32)
    rep = finalize(evaluate_sums(model, {"inputs": tokens, "targets": tokens}))
    assert rep.per_head["first_token_attention"].shape == (2, 4)
    assert np.isfinite(rep.scalars["perplexity"]) and np.isfinite(rep.scalars["kurtosis_rest"])


def test_read_safetensors_matches_the_library(tmp_path):
  st = pytest.importorskip("safetensors.numpy", reason="needs safetensors: pip install '.[hf]'")
  import ml_dtypes

  rng = np.random.default_rng(1)
  tensors = {"a": rng.normal(size=(3, 4)).astype(np.float32),
             "b": rng.normal(size=(5,)).astype(np.float16),
             "c": rng.integers(-5, 5, size=(2, 2)).astype(np.int64)}
  st.save_file(tensors, str(tmp_path / "x.safetensors"))
  got = hf.read_safetensors(tmp_path / "x.safetensors")
  for k, v in tensors.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)
  # bfloat16 (numpy has no bf16: written by hand in the safetensors layout).
  x = rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16)
  info = {"dtype": "BF16", "shape": [4, 2], "data_offsets": [0, x.nbytes]}
  header = json.dumps({"w": info}).encode()
  (tmp_path / "y.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + x.tobytes())
  np.testing.assert_array_equal(hf.read_safetensors(tmp_path / "y.safetensors")["w"], x)


def test_config_errors_say_what_is_unsupported(tmp_path):
  with pytest.raises(ValueError, match="model_type='bert'"):
    hf.config_from_hf({"model_type": "bert"})
  with pytest.raises(ValueError, match="activation_function"):
    hf.config_from_hf({"model_type": "gpt2", "vocab_size": 8, "n_embd": 8, "n_layer": 1,
                       "n_head": 2, "activation_function": "relu"})
  with pytest.raises(ValueError, match="RoPE scaling"):
    hf.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
                       "rope_scaling": {"rope_type": "llama3"}})
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    hf.load_hf(tmp_path)


def test_bfloat16_checkpoint_loads_to_float32(tmp_path):
  torch, transformers = _torch_and_transformers()
  torch.manual_seed(1)
  config = transformers.LlamaConfig(
      vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=1, attn_implementation="eager")
  hf_model = transformers.LlamaForCausalLM(config)
  _randomize(torch, hf_model, 0.25)
  hf_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
  # Reference: the bf16 weights read back in float32 (a fresh model, so RoPE's inv_freq buffer is
  # float32 again; .to(bfloat16) had rounded it).
  hf_model = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
  model = hf.load_hf(tmp_path)
  assert model.embed.embedding.value.dtype == jnp.float32
  tokens = np.random.default_rng(2).integers(0, 67, size=(1, 16))
  with torch.no_grad():
    ref = hf_model(torch.as_tensor(tokens)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
