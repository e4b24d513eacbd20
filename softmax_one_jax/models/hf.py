"""Import of local Hugging Face GPT-2 and Llama checkpoints into our Transformer (no network).

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), as ``save_pretrained`` writes them. Safetensors files are read
with a small built-in reader (numpy + ml_dtypes), so neither torch nor transformers is needed.

Mapping (our parameter paths on the left):

* GPT-2: ``wte``/``wpe`` -> ``embed``/``pos_embed``; ``ln_1``/``ln_2``/``ln_f`` ->
  ``attn_norm``/``mlp_norm``/``final_norm``; ``attn.c_attn`` (Conv1D ``[D, 3D]``, already
  ``[in, out]``) -> ``qkv_proj`` (regrouped by ``layers.fuse_qkv``); ``attn.c_proj`` ->
  ``o_proj``; ``mlp.c_fc`` -> ``up_proj``; ``mlp.c_proj`` -> ``down_proj``. GELU is the tanh
  approximation ("gelu_new").
* Llama: ``torch.nn.Linear`` weights ``[out, in]`` are transposed to ``[in, out]`` kernels, and
  ``self_attn.q/k/v_proj`` fused into ``qkv_proj`` (``layers.fuse_qkv``);
  ``input_layernorm``/``post_attention_layernorm``/``norm`` -> ``attn_norm``/``mlp_norm``/
  ``final_norm`` (RMSNorm with per-channel weight); RoPE uses HF's half-split (rotate_half)
  convention, as ours does, so queries and keys need no permutation.

The norm is the checkpoint's ("layernorm" for GPT-2, "rmsnorm" for Llama): a ``norm`` override
that differs, such as a scalar-gain norm, is refused, since the checkpoint's per-channel gains
(and GPT-2's biases) have no place in it.

Pretrained models use the ordinary softmax in attention (``softmax="softmax"``).

Example:
  >>> model = load_hf("/path/to/gpt2")                      # doctest: +SKIP
  >>> model.config.num_layers                               # doctest: +SKIP
  12
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from softmax_one_jax.errors import DataError, MissingFileError
from softmax_one_jax.models.config import TransformerConfig
from softmax_one_jax.models.layers import fuse_qkv

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
SUPPORTED_MODEL_TYPES = ("gpt2", "llama")


# ----------------------------------------------------------------------------------------------
# Files.


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads every tensor of one ``.safetensors`` file into numpy arrays (bf16 via ml_dtypes).

  Example:
    >>> tensors = read_safetensors("model.safetensors")      # doctest: +SKIP
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  out: dict[str, np.ndarray] = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise DataError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"])
  return out


def read_checkpoint(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(config.json as a dict, all tensors)`` of a local Hugging Face checkpoint directory.

  Raises:
    FileNotFoundError: no config.json or no safetensors weights (with what to do about it).
  """
  root = pathlib.Path(path).expanduser()
  if not (root / "config.json").is_file():
    raise MissingFileError(
        f"{root} has no config.json; pass a Hugging Face checkpoint directory (as written by "
        "save_pretrained or downloaded from the Hub)."
    )
  hf_config = json.loads((root / "config.json").read_text())
  index = root / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (root / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    files = sorted(p.name for p in root.glob("*.safetensors"))
  if not files:
    raise MissingFileError(
        f"{root} has no *.safetensors weights; convert a pytorch_model.bin with transformers "
        "(model.save_pretrained(dir, safe_serialization=True))."
    )
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(read_safetensors(root / name))
  return hf_config, tensors


# ----------------------------------------------------------------------------------------------
# Configs.


def _rope_theta(c: Mapping[str, Any]) -> float:
  rope = c.get("rope_parameters") or {}
  scaling = c.get("rope_scaling") or {}
  for kind in (rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
    if kind not in (None, "default"):
      raise DataError(
          f"RoPE scaling type {kind!r} is not supported; only the default rotary embedding is."
      )
  return float(rope.get("rope_theta", c.get("rope_theta", 10_000.0)))


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
  """Our ``TransformerConfig`` for a Hugging Face GPT-2 or Llama ``config.json`` dict.

  Args:
    hf_config: the parsed config.json.
    **overrides: TransformerConfig fields to change (e.g. ``dtype="bfloat16"``).

  Example:
    >>> config_from_hf({"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
    ...                 "n_head": 4}).mlp_dim
    128
  """
  c = dict(hf_config)
  kind = c.get("model_type")
  if kind == "gpt2":
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise DataError(
          f"GPT-2 activation_function={act!r} is not supported; our GPT-2 MLP uses the tanh "
          "GELU ('gelu_new')."
      )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "add_cross_attention"):
      if c.get(flag):
        raise DataError(f"GPT-2 option {flag}=True is not supported.")
    if c.get("scale_attn_weights") is False:
      raise DataError(
          "GPT-2 scale_attn_weights=False is not supported (we scale by 1/sqrt(head_dim)).")
    d = int(c["n_embd"])
    fields = dict(
        vocab_size=int(c["vocab_size"]), num_layers=int(c["n_layer"]), d_model=d,
        num_heads=int(c["n_head"]), mlp_dim=int(c.get("n_inner") or 4 * d),
        max_seq_len=int(c.get("n_positions", 1024)), position="learned", norm="layernorm",
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), mlp="gelu", use_bias=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
    )
  elif kind == "llama":
    if c.get("hidden_act", "silu") != "silu":
      raise DataError(f"Llama hidden_act={c['hidden_act']!r} is not supported; expected 'silu'.")
    if bool(c.get("attention_bias", False)) != bool(c.get("mlp_bias", False)):
      raise DataError(
          "Llama checkpoints with attention_bias != mlp_bias are not supported (one use_bias)."
      )
    if int(c.get("pretraining_tp", 1)) != 1:
      raise DataError("Llama pretraining_tp != 1 is not supported.")
    n = int(c["num_attention_heads"])
    fields = dict(
        vocab_size=int(c["vocab_size"]), num_layers=int(c["num_hidden_layers"]),
        d_model=int(c["hidden_size"]), num_heads=n,
        num_kv_heads=int(c.get("num_key_value_heads") or n),
        head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // n),
        mlp_dim=int(c["intermediate_size"]),
        max_seq_len=int(c.get("max_position_embeddings", 4096)), position="rope",
        rope_theta=_rope_theta(c), norm="rmsnorm", norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        mlp="swiglu", use_bias=bool(c.get("attention_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
  else:
    raise DataError(
        f"model_type={kind!r} is not supported; load_hf reads {SUPPORTED_MODEL_TYPES} checkpoints."
    )
  fields.update(softmax="softmax", dtype="float32", param_dtype="float32")
  _check_norm_override(kind, fields["norm"], overrides)
  fields.update(overrides)
  return TransformerConfig(**fields)


_NORM_PARAMS = {
    "layernorm": "centring, a per-channel gain [d_model] and bias [d_model]",
    "rmsnorm": "a per-channel gain [d_model], no centring or bias",
    "scalar_rmsnorm": "one scalar gain, no centring or bias",
    "scalar_layernorm": "centring, one scalar gain and a bias [d_model]",
}


def _check_norm_override(kind: str, checkpoint_norm: str, overrides: Mapping[str, Any]) -> None:
  """Refuses a norm other than the checkpoint's: its gains and biases fit only that norm."""
  norm = overrides.get("norm", checkpoint_norm)
  # An unknown name is left to TransformerConfig's validation, which lists the allowed ones.
  if norm == checkpoint_norm or norm not in _NORM_PARAMS:
    return
  example = ("tiny.py:softmax1,orthoadam" if kind == "gpt2" else "llama2.py:60m,softmax1,orthoadam")
  raise DataError(
      f"norm={norm!r} cannot be imported from a {kind} checkpoint: its norms are "
      f"{checkpoint_norm!r} ({_NORM_PARAMS[checkpoint_norm]}), a {norm!r} norm has "
      f"{_NORM_PARAMS.get(norm, 'other parameters')}. Load it with norm={checkpoint_norm!r} (drop "
      f"the norm override); train a {norm!r} model from scratch instead (e.g. "
      f"--config=experiments/configs/{example},{norm})."
  )


# ----------------------------------------------------------------------------------------------
# Weights.


def _strip(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  out = {}
  for name, arr in tensors.items():
    for p in prefixes:
      if name.startswith(p):
        name = name[len(p):]
        break
    out[name] = arr
  return out


class _Taker:
  """Pops named tensors, so unused checkpoint entries can be reported at the end."""

  def __init__(self, tensors: Mapping[str, np.ndarray]):
    self.left = dict(tensors)

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.left:
      raise KeyError(f"the checkpoint has no tensor {name!r}; it does not match its config.json.")
    return np.asarray(self.left.pop(name), np.float32)

  def has(self, name: str) -> bool:
    return name in self.left


def convert_gpt2(
    tensors: Mapping[str, np.ndarray], cfg: TransformerConfig
) -> dict[str, np.ndarray]:
  """Our dotted parameter paths -> float32 arrays, from GPT-2 tensors (Conv1D ``[in, out]``)."""
  take = _Taker(_strip(tensors, ("transformer.",)))
  out = {"embed.embedding": take("wte.weight"), "pos_embed.embedding": take("wpe.weight")}
  for i in range(cfg.num_layers):
    h, b = f"h.{i}.", f"blocks.{i}."
    qkv_w, qkv_b = take(h + "attn.c_attn.weight"), take(h + "attn.c_attn.bias")
    out[b + "attn.qkv_proj.kernel"] = fuse_qkv(*np.split(qkv_w, 3, axis=1), cfg.num_kv_heads)
    out[b + "attn.qkv_proj.bias"] = fuse_qkv(*np.split(qkv_b, 3), cfg.num_kv_heads)
    pairs = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    for ours, theirs in pairs.items():
      out[b + ours + ".kernel"] = take(h + theirs + ".weight")
      out[b + ours + ".bias"] = take(h + theirs + ".bias")
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out[b + ours + ".scale"] = take(h + theirs + ".weight")
      out[b + ours + ".bias"] = take(h + theirs + ".bias")
    for buf in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
      if take.has(h + buf):
        take.left.pop(h + buf)
  out["final_norm.scale"], out["final_norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
  return _finish(take, cfg, out)


def convert_llama(
    tensors: Mapping[str, np.ndarray], cfg: TransformerConfig
) -> dict[str, np.ndarray]:
  """Our dotted parameter paths -> float32 arrays, from Llama tensors (Linear ``[out, in]``)."""
  take = _Taker(tensors)
  m = "model." if any(k.startswith("model.") for k in tensors) else ""
  out = {"embed.embedding": take(m + "embed_tokens.weight")}
  for i in range(cfg.num_layers):
    h, b = f"{m}layers.{i}.", f"blocks.{i}."
    qkv = [take(h + f"self_attn.{name}_proj.weight").T for name in "qkv"]
    out[b + "attn.qkv_proj.kernel"] = fuse_qkv(*qkv, cfg.num_kv_heads)
    out[b + "attn.o_proj.kernel"] = take(h + "self_attn.o_proj.weight").T
    if cfg.use_bias:
      qkv_bias = [take(h + f"self_attn.{name}_proj.bias") for name in "qkv"]
      out[b + "attn.qkv_proj.bias"] = fuse_qkv(*qkv_bias, cfg.num_kv_heads)
      out[b + "attn.o_proj.bias"] = take(h + "self_attn.o_proj.bias")
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[b + f"mlp.{name}.kernel"] = take(h + f"mlp.{name}.weight").T
      if cfg.use_bias:
        out[b + f"mlp.{name}.bias"] = take(h + f"mlp.{name}.bias")
    out[b + "attn_norm.scale"] = take(h + "input_layernorm.weight")
    out[b + "mlp_norm.scale"] = take(h + "post_attention_layernorm.weight")
    if take.has(h + "self_attn.rotary_emb.inv_freq"):
      take.left.pop(h + "self_attn.rotary_emb.inv_freq")
  out["final_norm.scale"] = take(m + "norm.weight")
  return _finish(take, cfg, out)


def _finish(take: _Taker, cfg: TransformerConfig, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds the output projection (unless tied) and checks that every tensor was used."""
  if cfg.tie_embeddings:
    take.left.pop("lm_head.weight", None)
  else:
    out["lm_head.kernel"] = take("lm_head.weight").T
  _check_all_used(take)
  return out


def _check_all_used(take: _Taker) -> None:
  if take.left:
    raise DataError(
        f"{len(take.left)} checkpoint tensor(s) have no place in our model, e.g. "
        f"{sorted(take.left)[:5]}; the checkpoint has parts this importer does not know."
    )


def _path_str(path: tuple[Any, ...]) -> str:
  """A parameter's dotted name (``blocks.0.attn.qkv.kernel``), the keys of ``params``."""
  return jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")


def assign_params(model: nnx.Module, params: Mapping[str, np.ndarray], dtype: Any) -> None:
  """Writes ``params`` (dotted path -> array) into the model's ``nnx.Param`` s, checking shapes.

  Raises:
    ValueError: a parameter of the model is not provided, or a shape disagrees.
  """
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  missing = [_path_str(p) for p, _ in leaves if _path_str(p) not in params]
  if missing:
    raise DataError(f"the checkpoint provides no value for model parameter(s) {missing[:5]}.")
  extra = sorted(set(params) - {_path_str(p) for p, _ in leaves})
  if extra:
    raise DataError(f"converted tensor(s) {extra[:5]} have no parameter in our model.")
  new = []
  for path, leaf in leaves:
    name = _path_str(path)
    value = np.asarray(params[name])
    if tuple(value.shape) != tuple(leaf.shape):
      raise DataError(
          f"{name}: checkpoint shape {value.shape} != model shape {tuple(leaf.shape)}.")
    new.append(jnp.asarray(value, dtype=dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def load_hf(path: str | pathlib.Path, **overrides: Any) -> nnx.Module:
  """Loads a local Hugging Face GPT-2 or Llama checkpoint directory into our Transformer.

  Args:
    path: directory with ``config.json`` and safetensors weights (no network access).
    **overrides: TransformerConfig fields to change (e.g. ``dtype="bfloat16"``,
      ``attention_impl="xla"``); ``softmax`` stays "softmax" unless overridden.

  Returns:
    The ``Transformer``, its ``TransformerConfig`` in ``model.config``; logits equal
    transformers' within float32 tolerance.

  Example:
    >>> model = load_hf("checkpoints/gpt2")                    # doctest: +SKIP
    >>> logits_btv = model(jnp.zeros((1, 8), jnp.int32))       # doctest: +SKIP
  """
  from softmax_one_jax.models.transformer import Transformer

  hf_config, tensors = read_checkpoint(path)
  cfg = config_from_hf(hf_config, **overrides)
  convert = convert_gpt2 if hf_config["model_type"] == "gpt2" else convert_llama
  params = convert(tensors, cfg)
  # Shapes only (no random initialisation), then every parameter is written from the checkpoint.
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assign_params(model, params, jnp.dtype(cfg.param_dtype))
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model))):
    model = Transformer(cfg, rngs=nnx.Rngs(0))  # non-parameter state: initialise it for real
    assign_params(model, params, jnp.dtype(cfg.param_dtype))
  if getattr(model, "config", None) is not cfg:
    model.config = cfg
  return model
