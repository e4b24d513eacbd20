"""``TransformerConfig``: one decoder family; GPT-2 and Llama-2 flavours are presets of it.

Example:
  >>> cfg = preset("llama2-60m", softmax="softmax", norm="scalar_rmsnorm")
  >>> cfg.num_layers, cfg.head_dim
  (8, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from softmax_one_jax.attention import IMPLEMENTATIONS as ATTENTION_IMPLS

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm", "scalar_rmsnorm", "scalar_layernorm")
MLPS = ("gelu", "swiglu")
SOFTMAXES = ("softmax", "softmax1", "learned_sink")  # the baseline first, as grids list them
DTYPES = ("float32", "bfloat16", "float16")
# What each block keeps for the backward pass; ``models.transformer.remat_policy`` maps each name
# to its jax.checkpoint policy. "none" first: the default.
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out", "offload_attention_out")
# Configs written when remat was a switch: True rematerialised everything.
_LEGACY_REMAT = {True: "full", False: "none"}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and flavour of a decoder-only Transformer language model.

  Attributes:
    vocab_size: number of token ids.
    num_layers: number of decoder blocks.
    d_model: width of the residual stream.
    num_heads: query heads.
    mlp_dim: hidden width of the MLP (per branch for SwiGLU).
    num_kv_heads: key/value heads (grouped-query attention); None means ``num_heads``.
    head_dim: width of each head; None means ``d_model // num_heads``.
    max_seq_len: longest sequence (size of the learned position table; RoPE ignores it).
    position: "learned" absolute positions (GPT-2) or "rope" rotary embeddings (Llama).
    rope_theta: RoPE base frequency.
    norm: "layernorm" (centring, per-channel gain and bias; GPT-2's), "rmsnorm" (per-channel
      gain; Llama's), or a scalar-gain form that keeps everything else of its family's norm and
      has one learned scalar gain per norm: "scalar_rmsnorm" (RMSNorm's) or "scalar_layernorm"
      (LayerNorm's centring and per-channel bias). The paper pairs OrthoAdam with a scalar-gain
      norm, since a per-channel gain privileges the coordinate basis OrthoAdam rotates away.
    norm_eps: epsilon of the norms.
    mlp: "gelu" (tanh-approximate GELU, as GPT-2) or "swiglu" (Llama).
    use_bias: biases in the linear layers.
    softmax: "softmax1" (the paper's fix), "softmax", or "learned_sink" (softmax-1 with a learned
      null-key logit per head, ``Attention.sink_logits``, initialised to 0) in every attention
      layer.
    tie_embeddings: share the input embedding with the output projection.
    dtype: compute dtype; parameters are kept in ``param_dtype``.
    param_dtype: parameter dtype.
    remat: what each block keeps for the backward pass, the rest recomputed there (activation
      memory against recompute; every policy gives the same numbers): "none" (keep everything),
      "full" (keep the block's input only: recompute the whole block, attention included),
      "save_dots" (keep the outputs of the projection and MLP matmuls; recompute norms,
      activations and attention), "save_attention_out" (keep the attention output, named
      ``layers.ATTENTION_OUT``, and recompute the rest: the XLA path recomputes its softmax, and a
      flash kernel's forward runs again unless the kernel names its own residuals so too),
      "offload_attention_out" (the same kept in pinned host memory; on CPU that is the same RAM,
      so it runs but saves nothing). True and False, from configs written when this was a
      switch, mean "full" and "none".
    attention_impl: implementation passed to ``dot_product_attention`` (None = the best for the
      platform of the mesh in context, else of the default backend).
    attention_interpret: run a Pallas attention kernel in the Pallas interpreter (CPU tests).
    init_std: standard deviation of the normal initialiser (residual outputs get
      ``init_std / sqrt(2 * num_layers)``, as GPT-2).
  """

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  max_seq_len: int = 1024
  position: str = "learned"
  rope_theta: float = 10_000.0
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  mlp: str = "gelu"
  use_bias: bool = True
  softmax: str = "softmax1"
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str | None = None
  attention_interpret: bool = False
  init_std: float = 0.02

  def __post_init__(self) -> None:
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", _LEGACY_REMAT[self.remat])
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.num_heads > 0 and self.d_model % self.num_heads:
        raise ValueError(
            f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}; change "
            "one of them or set head_dim explicitly."
        )
      object.__setattr__(self, "head_dim", self.d_model // max(self.num_heads, 1))
    _validate(self)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **overrides: Any) -> "TransformerConfig":
    """A copy with some fields changed (validated again).

    Example:
      >>> preset("tiny").replace(num_layers=2).num_layers
      2
    """
    return _replace_fields(self, overrides)


def _replace_fields(config: TransformerConfig, overrides: dict[str, Any]) -> TransformerConfig:
  overrides = dict(overrides)
  known = {f.name for f in dataclasses.fields(TransformerConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(
        f"unknown TransformerConfig field(s) {unknown}; known fields are {sorted(known)}."
    )
  # Derived defaults follow the fields they come from unless overridden themselves.
  if "head_dim" not in overrides and config.head_dim * config.num_heads == config.d_model:
    overrides["head_dim"] = None
  if "num_kv_heads" not in overrides and config.num_kv_heads == config.num_heads:
    overrides["num_kv_heads"] = None
  return dataclasses.replace(config, **overrides)


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; expected one of {allowed}.")


def _validate(c: TransformerConfig) -> None:
  for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "num_kv_heads",
               "head_dim", "max_seq_len"):
    value = getattr(c, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  if c.num_heads % c.num_kv_heads:
    raise ValueError(
        f"num_heads={c.num_heads} is not a multiple of num_kv_heads={c.num_kv_heads}; "
        "grouped-query attention shares each key/value head among a whole number of query heads."
    )
  if c.position == "rope" and c.head_dim % 2:
    raise ValueError(f"head_dim={c.head_dim} must be even for rotary position embeddings.")
  _check_choice("position", c.position, POSITIONS)
  _check_choice("norm", c.norm, NORMS)
  _check_choice("mlp", c.mlp, MLPS)
  _check_choice("softmax", c.softmax, SOFTMAXES)
  _check_choice("dtype", c.dtype, DTYPES)
  _check_choice("param_dtype", c.param_dtype, DTYPES)
  _check_choice("attention_impl", c.attention_impl, ATTENTION_IMPLS)
  if c.remat not in REMAT_POLICIES:
    raise ValueError(f"remat={c.remat!r} is not allowed; expected one of {REMAT_POLICIES} "
                     "(True and False still mean 'full' and 'none').")
  if not c.norm_eps > 0:
    raise ValueError(f"norm_eps={c.norm_eps!r} must be positive.")
  if not c.init_std > 0:
    raise ValueError(f"init_std={c.init_std!r} must be positive.")


_GPT2 = dict(
    vocab_size=50_257, max_seq_len=1024, position="learned", norm="layernorm", norm_eps=1e-5,
    mlp="gelu", use_bias=True, tie_embeddings=True,
)
_LLAMA2 = dict(
    vocab_size=32_000, max_seq_len=4096, position="rope", norm="rmsnorm", norm_eps=1e-5,
    mlp="swiglu", use_bias=False, tie_embeddings=False,
)

# Widths follow GPT-2 small/medium and Llama-2; the paper's 60M-350M models are not fully specified
# in our sources, so depths were chosen to land near each name (see tests/models for the counts).
_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, GPT-2 flavoured; vocab matches the small BPE trained on the embedded corpus.
    "tiny": dict(_GPT2, vocab_size=4096, max_seq_len=256, num_layers=4, d_model=128,
                 num_heads=4, mlp_dim=512),
    "gpt2-60m": dict(_GPT2, num_layers=11, d_model=512, num_heads=8, mlp_dim=2048),
    "gpt2-130m": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, mlp_dim=3072),
    "gpt2-350m": dict(_GPT2, num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096),
    "llama2-60m": dict(_LLAMA2, num_layers=8, d_model=512, num_heads=8, mlp_dim=1376),
    "llama2-130m": dict(_LLAMA2, num_layers=12, d_model=768, num_heads=12, mlp_dim=2048),
    "llama2-350m": dict(_LLAMA2, num_layers=24, d_model=1024, num_heads=16, mlp_dim=2736),
    # The TinyLlama-1.1B shape (grouped-query attention with 4 key/value heads).
    "llama2-1b": dict(_LLAMA2, num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                      mlp_dim=5632),
    # The real Llama-2-7B shape.
    "llama2-7b": dict(_LLAMA2, num_layers=32, d_model=4096, num_heads=32, mlp_dim=11008),
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> TransformerConfig:
  """A named configuration, optionally with fields overridden.

  Args:
    name: one of ``PRESET_NAMES``.
    **overrides: ``TransformerConfig`` fields to change.

  Returns:
    The validated config.

  Example:
    >>> preset("gpt2-130m", softmax="softmax").d_model
    768
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESET_NAMES}.")
  return _replace_fields(TransformerConfig(**_PRESETS[name]), overrides)
