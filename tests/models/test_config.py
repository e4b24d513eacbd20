"""TransformerConfig validation, presets and parameter counts."""

import pytest

from softmax_one_jax.models import PRESET_NAMES, TransformerConfig, count_params, preset
from softmax_one_jax.models.config import NORMS
from softmax_one_jax.models.hf import config_from_hf


def test_every_preset_counts_near_its_name():
  for name in PRESET_NAMES:
    if name == "tiny":
      continue
    size = name.split("-")[1]
    nominal = float(size[:-1]) * (1e6 if size.endswith("m") else 1e9)
    count = count_params(preset(name))
    assert 0.85 <= count / nominal <= 1.15, (name, count)


def test_llama2_7b_has_the_published_parameter_count():
  # Llama-2-7B: 6,738,415,616 parameters (Touvron et al. 2023; the HF checkpoint's total).
  assert count_params(preset("llama2-7b")) == 6_738_415_616


def test_gpt2_small_has_the_published_parameter_count():
  # GPT-2 small (124M): 124,439,808 parameters with tied embeddings (the HF "gpt2" checkpoint).
  assert count_params(preset("gpt2-130m")) == 124_439_808


def test_overrides_and_flavours():
  c = preset("llama2-60m", softmax="softmax", norm="scalar_rmsnorm", num_kv_heads=2)
  assert (c.softmax, c.norm, c.num_groups, c.head_dim) == ("softmax", "scalar_rmsnorm", 4, 64)
  assert preset("tiny").replace(num_layers=1).num_layers == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=100, num_heads=12), "d_model=100 is not a multiple of num_heads=12"),
        (dict(num_heads=8, num_kv_heads=3), "num_heads=8 is not a multiple of num_kv_heads=3"),
        (dict(softmax="sparsemax"), r"softmax='sparsemax' is not allowed; expected one of"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not allowed; expected one of .*"
                                 "'scalar_rmsnorm', 'scalar_layernorm'"),
        (dict(position="alibi"), "position='alibi' is not allowed"),
        (dict(mlp="relu"), "mlp='relu' is not allowed"),
        (dict(dtype="float8"), "dtype='float8' is not allowed"),
        (dict(num_layers=0), "num_layers=0 must be a positive integer"),
        (dict(position="rope", head_dim=7, d_model=28, num_heads=4), "must be even"),
        (dict(n_layers=3), r"unknown TransformerConfig field\(s\) \['n_layers'\]"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    preset("tiny", **overrides)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
    preset("gpt5")


def test_config_is_frozen_and_hashable():
  c = preset("tiny")
  with pytest.raises(Exception):
    c.num_layers = 3
  assert hash(c) == hash(preset("tiny"))
  assert isinstance(c, TransformerConfig)


def test_scalar_layernorm_changes_only_the_gain_of_gpt2_small():
  # Per norm, LayerNorm's [D] gain becomes one scalar: 2 norms per block and the final one.
  d, norms = 768, 2 * 12 + 1
  assert count_params(preset("gpt2-130m", norm="scalar_layernorm")) == 124_439_808 - norms * (d - 1)
  assert preset("gpt2-60m", norm="scalar_layernorm").norm == "scalar_layernorm"


_HF_GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
_HF_LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 64}


@pytest.mark.parametrize("hf_config, own", [(_HF_GPT2, "layernorm"), (_HF_LLAMA, "rmsnorm")])
def test_hf_import_refuses_a_norm_other_than_the_checkpoints(hf_config, own):
  assert config_from_hf(hf_config).norm == own
  assert config_from_hf(hf_config, norm=own).norm == own
  for norm in NORMS:
    if norm == own:
      continue
    with pytest.raises(ValueError) as e:
      config_from_hf(hf_config, norm=norm)
    msg = str(e.value)
    assert f"norm={norm!r} cannot be imported from a {hf_config['model_type']} checkpoint" in msg
    assert f"Load it with norm={own!r}" in msg and f",{norm})" in msg
  with pytest.raises(ValueError, match="norm='batchnorm' is not allowed; expected one of"):
    config_from_hf(hf_config, norm="batchnorm")
