"""Round-to-nearest post-training quantisation (the paper's "basic algorithms"), as fake-quant.

Fake-quant = quantise then dequantise, in float32: the model runs unchanged on values that lie
exactly on the quantisation grid, so perplexity measures the quantisation error alone.

What is quantised is one rule for every model family (``COVERAGE_RULE``): every matrix that
multiplies activations. That is every linear layer (``qkv_proj``, ``o_proj``,
``up/gate/down_proj``) and the output head, whether it is its own ``lm_head`` (Llama-2) or the
token embedding read as ``x @ E.T`` (tied, GPT-2); under an activation scheme the input of each
of them, the head's included, is quantised too. The token-embedding lookup (a gather, no
multiply) is quantised only with ``include_embeddings`` (scheme suffix ``+emb``). Position
embeddings, norms, biases and sink logits stay float. ``quantized_tensors`` lists what a scheme covers in a given model.

The head's output channels are vocabulary rows and its groups run along ``d_model``, tied or
not. The quantisers and the named schemes (``SCHEMES``) are ``analysis.quant_schemes``.

Weights and inputs are quantised in a *copy* of the model, from outside: linear layers are wrapped
(``ActQuantLinear``), and a tied embedding is replaced by a ``TiedHead`` that sends the lookup
(``embed(tokens)``) and the head (``embed.attend(x)``) to their own tables.

Example:
  >>> qmodel = quantize_model(model, SCHEMES["w4_g128"])      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from softmax_one_jax.analysis.quant_schemes import (ACT_GRANULARITIES, ACT_SCALE_RULE,
                                                    DEFAULT_SCHEMES, EMBEDDING_SUFFIX, SCHEMES,
                                                    WEIGHT_GRANULARITIES, QuantScheme,
                                                    absmax_quantize, asymmetric_quantize,
                                                    check_act_granularity, fake_quant_absmax,
                                                    fake_quant_activation, fake_quant_asymmetric,
                                                    resolve_schemes)
from softmax_one_jax.models.layers import fuse_qkv, split_qkv

LINEAR_NAMES = ("qkv_proj", "o_proj", "up_proj", "gate_proj", "down_proj", "lm_head")
EMBEDDING_NAMES = ("embed",)
# What each quantised tensor is, in names shared by every family (gate and up both read the
# block's normalised input, so both are "mlp.in"; q, k and v read one input, "attn.qkv").
ROLES = {"qkv_proj": "attn.qkv", "o_proj": "attn.o", "up_proj": "mlp.in", "gate_proj": "mlp.in",
         "down_proj": "mlp.out", "lm_head": "head"}
# The fused q/k/v kernel is quantised as the three matrices it holds, each with its own scales,
# exactly as separate q, k and v projections would be.
QKV_WEIGHT_ROLES = ("attn.q", "attn.k", "attn.v")

COVERAGE_RULE = (
    "Quantised in every model family: the weights of every matrix that multiplies activations "
    "(attention q/k/v/o, MLP, and the output head, tied to the token embedding as in GPT-2 or "
    "not as in Llama-2) and, under an A8 scheme, the input of each of them, the head's included. "
    "The token-embedding lookup (a gather, no multiply) is quantised only with +emb. Position "
    "embeddings, norms, biases and sink logits stay float. The head's output channels are "
    "vocabulary rows and its groups run along d_model."
)

# The schemes are re-exported: ``quantize.SCHEMES`` and friends are the public spelling.
__all__ = [
    "ACT_GRANULARITIES", "ACT_SCALE_RULE", "COVERAGE_RULE", "DEFAULT_SCHEMES", "EMBEDDING_NAMES",
    "EMBEDDING_SUFFIX", "LINEAR_NAMES", "QKV_WEIGHT_ROLES", "ROLES", "SCHEMES",
    "WEIGHT_GRANULARITIES",
    "ActQuantLinear", "QuantScheme", "QuantTarget", "TiedHead", "absmax_quantize",
    "asymmetric_quantize", "fake_quant_absmax", "fake_quant_activation", "fake_quant_asymmetric",
    "quantize_model", "quantize_params", "quantized_param_names", "quantized_tensors",
    "resolve_schemes", "with_activation_quant",
]


# ----------------------------------------------------------------------------------------------
# Parameters.


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """``('blocks', '0', 'attn', 'qkv_proj', 'kernel')`` for a key path (nnx's ``.value`` dropped)."""
  name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
  return tuple(name.removesuffix(".value").split("."))


def quantized_param_names(state: Any, scheme: QuantScheme) -> list[str]:
  """Dotted paths of the parameters ``quantize_params`` changes in place.

  These are the linear kernels (the untied head's included) and, with ``include_embeddings``,
  the embedding table. A tied head is quantised into a table of its own by ``quantize_model``,
  which a parameter pytree cannot show; ``quantized_tensors`` lists everything a scheme covers.

  Example:
    >>> params = nnx.state(model, nnx.Param)                                # doctest: +SKIP
    >>> quantized_param_names(params, SCHEMES["w8_tensor"])[:1]             # doctest: +SKIP
    ['blocks.0.attn.qkv_proj.kernel']
  """
  names: list[str] = []
  for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
    p = _path_names(path)
    if _selected(p, scheme):
      names.append(".".join(p))
  return names


def _selected(p: tuple[str, ...], scheme: QuantScheme) -> bool:
  if len(p) >= 2 and p[-1] == "kernel" and p[-2] in LINEAR_NAMES:
    return True
  return (scheme.include_embeddings and len(p) >= 2 and p[-1] == "embedding"
          and p[-2] in EMBEDDING_NAMES)


def quantize_params(state: Any, scheme: QuantScheme) -> Any:
  """A copy of a parameter pytree (e.g. ``nnx.State``) with the chosen weights fake-quantised.

  Embedding tables ``[V, D]`` are quantised like the head they are when tied: one scale per row
  (one token = one output channel) for "per_channel", in groups along ``D`` for "group".

  Args:
    state: parameters, e.g. ``nnx.state(model, nnx.Param)``; leaves are ``[in, out]`` kernels
      (``qkv_proj``'s ``[D, K, G + 2, H]`` is quantised as its q, k and v matrices).
    scheme: the weight scheme.

  Returns:
    The same structure with quantised linear kernels (and embeddings with
    ``include_embeddings``); others unchanged. A tied head needs ``quantize_model``.

  Example:
    >>> q = quantize_params(nnx.state(model, nnx.Param), SCHEMES["w4_channel"])  # doctest: +SKIP
  """

  def one(path, leaf):
    p = _path_names(path)
    if not _selected(p, scheme):
      return leaf
    w = jnp.asarray(leaf)
    if p[-1] == "embedding":
      return scheme.quantize_weight(w.T).T
    if p[-2] == "qkv_proj":
      parts = [scheme.quantize_weight(part) for part in split_qkv(w)]
      return fuse_qkv(*parts, num_kv_heads=w.shape[1])
    return scheme.quantize_weight(w)

  return jax.tree_util.tree_map_with_path(one, state)


# ----------------------------------------------------------------------------------------------
# Wrappers and their application to a model.


class ActQuantLinear(nnx.Module):
  """Wraps a linear module so its input is fake-quantised to int8 before the matmul.

  Example:
    >>> lin = ActQuantLinear(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), "per_token")
    >>> lin(jnp.ones((3, 4))).shape
    (3, 2)
  """

  def __init__(self, inner: nnx.Module, granularity: str):
    check_act_granularity(granularity)
    self.inner = inner
    self.granularity = granularity

  def __call__(self, x, *args, **kwargs):
    return self.inner(fake_quant_activation(x, self.granularity), *args, **kwargs)


class TiedHead(nnx.Module):
  """A tied token embedding split into its two uses: the lookup and the output head.

  Stands in for the model's ``nnx.Embed`` and answers the same calls: ``tied(tokens)`` (the
  lookup, a gather) reads ``lookup``'s table; ``tied.attend(x)`` (the head, ``x @ E.T``)
  fake-quantises ``x`` when ``act`` is set, then multiplies by ``head``'s table. ``embedding``
  is the head's table, which ``Transformer.unembedding()`` reads. The two may be one module.

  Example:
    >>> e = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
    >>> tied = TiedHead(e, e, act="per_token")        # float table, quantised head input
    >>> tied(jnp.array([[1, 2, 3]])).shape, tied.attend(jnp.ones((1, 3, 4))).shape
    ((1, 3, 4), (1, 3, 10))
  """

  def __init__(self, lookup: nnx.Embed, head: nnx.Embed, act: str | None = None):
    if act is not None:
      check_act_granularity(act)
    self.lookup = lookup
    self.head = head
    self.act = act

  @property
  def embedding(self) -> nnx.Param:
    """The head's ``[V, D]`` table."""
    return self.head.embedding

  def __call__(self, tokens: jax.Array, *args, **kwargs) -> jax.Array:
    return self.lookup(tokens, *args, **kwargs)

  def attend(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    if self.act is not None:
      x = fake_quant_activation(x, self.act)
    return self.head.attend(x, *args, **kwargs)


def _linear_children(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module, str, Any]]:
  """``(path, parent, name, child)`` of every sub-module attribute named in ``LINEAR_NAMES``."""
  out = []
  for path, module in nnx.iter_modules(model):
    for name in LINEAR_NAMES:
      child = getattr(module, name, None)
      if isinstance(child, nnx.Module):
        out.append((path, module, name, child))
  return out


def _tied_heads(model: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module, str, Any]]:
  """``(path, owner, name, embed)`` of every embedding that is also its owner's output head.

  An owner is tied when it has an embedding named in ``EMBEDDING_NAMES`` and an ``lm_head``
  attribute that is None, as ``Transformer`` with ``tie_embeddings``: its head is
  ``embed.attend``.
  """
  out = []
  for path, module in nnx.iter_modules(model):
    if not hasattr(module, "lm_head") or module.lm_head is not None:
      continue
    for name in EMBEDDING_NAMES:
      embed = getattr(module, name, None)
      if isinstance(embed, (nnx.Embed, TiedHead)):
        out.append((path, module, name, embed))
  return out


def _quantize_inputs_in_place(model: nnx.Module, granularity: str) -> None:
  check_act_granularity(granularity)
  linears = [(m, n, c) for _, m, n, c in _linear_children(model)
             if not isinstance(c, ActQuantLinear)]
  tied = _tied_heads(model)
  if not linears and not tied:
    raise ValueError(
        f"no linear sub-modules named {LINEAR_NAMES} and no tied embedding head found in "
        f"{type(model).__name__}; activation quantisation needs them."
    )
  for module, name, child in linears:
    setattr(module, name, ActQuantLinear(child, granularity))
  for _, owner, name, embed in tied:
    if isinstance(embed, TiedHead):
      embed.act = granularity
    else:
      setattr(owner, name, TiedHead(embed, embed, granularity))


def with_activation_quant(model: nnx.Module, granularity: str) -> nnx.Module:
  """A copy of ``model`` whose matmuls quantise their inputs (dynamic absmax int8).

  Every sub-module attribute named in ``LINEAR_NAMES`` is replaced by an ``ActQuantLinear``
  around it, and a tied embedding (see ``quantize_model``) by a ``TiedHead`` that quantises the
  head's input; the lookup stays as it is. The original model is not modified.

  Args:
    model: an NNX model whose linear layers are called as sub-modules (``self.o_proj(x)``).
    granularity: "per_sequence" or "per_token".

  Returns:
    The wrapped copy.

  Raises:
    ValueError: the granularity is not known, or the model has no linear sub-module with a
      known name and no tied head.

  Example:
    >>> aq = with_activation_quant(model, "per_token")            # doctest: +SKIP
  """
  check_act_granularity(granularity)
  copy = nnx.clone(model)
  _quantize_inputs_in_place(copy, granularity)
  return copy


def quantize_model(model: nnx.Module, scheme: QuantScheme) -> nnx.Module:
  """A fake-quantised copy of ``model``: everything ``quantized_tensors`` lists.

  Linear kernels (and the embedding table with ``include_embeddings``) are quantised in place by
  ``quantize_params``. A tied embedding becomes a ``TiedHead``: its head reads the table
  quantised like any head (``scheme.quantize_weight(E.T).T``), its lookup the embedding as
  ``quantize_params`` left it (float unless ``include_embeddings``). With ``scheme.act`` the
  inputs of every linear layer and of the head are quantised too.

  Example:
    >>> q = quantize_model(model, SCHEMES["w8a8_token"])          # doctest: +SKIP
  """
  copy = nnx.clone(model)
  heads = []
  for _, owner, name, embed in _tied_heads(copy):
    if not isinstance(embed, nnx.Embed):
      raise ValueError(
          f"{type(model).__name__}.{name} is already a {type(embed).__name__}; quantise the "
          "float model, not a quantised copy.")
    heads.append((owner, name, nnx.clone(embed)))     # float tables, before +emb changes them
  nnx.update(copy, quantize_params(nnx.state(copy, nnx.Param), scheme))
  for owner, name, head in heads:
    head.embedding.set_value(scheme.quantize_weight(head.embedding[...].T).T)
    setattr(owner, name, TiedHead(getattr(owner, name), head))
  if scheme.act is not None:
    _quantize_inputs_in_place(copy, scheme.act)
  return copy


class QuantTarget(NamedTuple):
  """One tensor a scheme quantises.

  Attributes:
    path: dotted path of the module that holds it (``blocks.0.attn.qkv_proj``, ``lm_head``,
      ``embed``).
    role: the same names in every family: "attn.q", "attn.k", "attn.v" (the weights in
      ``qkv_proj``), "attn.qkv" (their shared input), "attn.o", "mlp.in" (up and gate),
      "mlp.out" (down), "head" (``lm_head`` or the tied embedding read as a head), "embedding"
      (the lookup table).
    kind: "weight" or "input" (the activation the weight multiplies).
  """

  path: str
  role: str
  kind: str


def quantized_tensors(model: nnx.Module, scheme: QuantScheme) -> list[QuantTarget]:
  """Every tensor ``quantize_model(model, scheme)`` quantises, found as it finds them.

  Args:
    model: the float model.
    scheme: the scheme.

  Returns:
    Weights (every linear layer and the head, tied or not; the embedding lookup with
    ``include_embeddings``) and, with ``scheme.act``, the inputs of the same linear layers and
    head, in module order.

  Example:
    >>> {t.role for t in quantized_tensors(model, SCHEMES["w8_tensor"])}  # doctest: +SKIP
    {'attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.in', 'mlp.out', 'head'}
  """
  out: list[QuantTarget] = []
  kinds = ("weight", "input") if scheme.act is not None else ("weight",)

  def dotted(path, name):
    return ".".join([str(p) for p in path] + [name])

  for path, _, name, _ in _linear_children(model):
    weight_roles = QKV_WEIGHT_ROLES if name == "qkv_proj" else (ROLES[name],)
    out += [QuantTarget(dotted(path, name), role, "weight") for role in weight_roles]
    if scheme.act is not None:
      out.append(QuantTarget(dotted(path, name), ROLES[name], "input"))
  for path, _, name, _ in _tied_heads(model):
    out += [QuantTarget(dotted(path, name), "head", kind) for kind in kinds]
  if scheme.include_embeddings:
    for path, module in nnx.iter_modules(model):
      for name in EMBEDDING_NAMES:
        if isinstance(getattr(module, name, None), nnx.Embed):
          out.append(QuantTarget(dotted(path, name), "embedding", "weight"))
  return out
