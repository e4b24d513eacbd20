"""Round-to-nearest post-training quantisation (the paper's "basic algorithms"), as fake-quant.

Fake-quant = quantise then dequantise, in float32: the model runs unchanged on values that lie
exactly on the quantisation grid, so perplexity measures the quantisation error alone.

What is quantised is one rule for every model family (``COVERAGE_RULE``): every matrix that
multiplies activations. That is every linear layer (``q/k/v/o_proj``, ``up/gate/down_proj``) and
the output head, whether it is its own ``lm_head`` (Llama-2) or the token embedding read as
``x @ E.T`` (tied, GPT-2); under an activation scheme the input of each of them, the head's
included, is quantised too. The token-embedding lookup (a gather, no multiply) is quantised only
with ``include_embeddings`` (scheme suffix ``+emb``). Position embeddings, norms, biases and sink
logits stay float. ``quantized_tensors`` lists what a scheme covers in a given model.

Weights (kernels are ``[in, out]``; the head's output channels are vocabulary rows and its
groups run along ``d_model``, tied or not):

* absmax int8, per tensor or per output channel: ``s = max|w| / 127``, ``q = clip(round(w/s),
  -127, 127)``, ``w_hat = q * s``; ``|w - w_hat| <= s / 2``.
* asymmetric zero-point int4, per output channel or in groups of ``group_size`` inputs per output
  channel: ``s = (max - min) / 15``, ``z = round(-min / s)``, ``q = clip(round(w / s) + z, 0, 15)``,
  ``w_hat = (q - z) * s``; ``|w - w_hat| <= s / 2``.

Activations (``ACT_SCALE_RULE``): dynamic absmax int8, one scale per sequence ("per_sequence":
over a row ``[T, D]`` of the batch) or per token vector ("per_token"), so a sequence's result
never depends on the other rows of its batch.

Both are applied to a *copy* of the model, from outside: linear layers are wrapped
(``ActQuantLinear``), and a tied embedding is replaced by a ``TiedHead`` that sends the lookup
(``embed(tokens)``) and the head (``embed.attend(x)``) to their own tables.

Example:
  >>> qmodel = quantize_model(model, SCHEMES["w4_g128"])      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

LINEAR_NAMES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj", "lm_head")
EMBEDDING_NAMES = ("embed",)
WEIGHT_GRANULARITIES = {"int8": ("per_tensor", "per_channel"), "int4": ("per_channel", "group")}
ACT_GRANULARITIES = (None, "per_sequence", "per_token")

# What each quantised tensor is, in names shared by every family (gate and up both read the
# block's normalised input, so both are "mlp.in").
ROLES = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
         "up_proj": "mlp.in", "gate_proj": "mlp.in", "down_proj": "mlp.out", "lm_head": "head"}

COVERAGE_RULE = (
    "Quantised in every model family: the weights of every matrix that multiplies activations "
    "(attention q/k/v/o, MLP, and the output head, tied to the token embedding as in GPT-2 or "
    "not as in Llama-2) and, under an A8 scheme, the input of each of them, the head's included. "
    "The token-embedding lookup (a gather, no multiply) is quantised only with +emb. Position "
    "embeddings, norms, biases and sink logits stay float. The head's output channels are "
    "vocabulary rows and its groups run along d_model."
)
ACT_SCALE_RULE = (
    "Activation scales are dynamic absmax int8 and never span two sequences: 'seq' (the "
    "activation 'tensor' of the scheme names w8a8_tensor and w8a8_channel_tensor) = one scale "
    "per sequence (a row [T, D] of the batch; a packed row counts as one), 'token' = one per "
    "token vector. A sequence's result does not depend on the rest of its batch."
)


# ----------------------------------------------------------------------------------------------
# Quantisers on arrays.


def absmax_quantize(
    x: jax.Array, bits: int = 8, axis: int | tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax quantisation to signed ``bits``-bit integers.

  Args:
    x: any float array.
    bits: bit width; levels are ``-(2^(bits-1) - 1) .. 2^(bits-1) - 1`` (127 for int8).
    axis: axes the absmax is taken over (they share one scale); None = the whole tensor.

  Returns:
    ``(q, scale)``: integer-valued float32 ``q`` of ``x``'s shape and the float32 scale,
    broadcastable to ``x`` (kept dims). ``x ~ q * scale``.

  Example:
    >>> q, s = absmax_quantize(jnp.array([-1.0, 0.5, 0.25]))
    >>> q.tolist(), round(float(s[0]) * 127, 6)
    ([-127.0, 64.0, 32.0], 1.0)
  """
  qmax = 2 ** (bits - 1) - 1
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(jnp.round(x / scale), -qmax, qmax)
  return q, scale


def fake_quant_absmax(
    x: jax.Array, bits: int = 8, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
  """``q * scale`` of ``absmax_quantize``, in ``x``'s dtype.

  Example:
    >>> fake_quant_absmax(jnp.array([1.0, 0.003]), axis=None).tolist()
    [1.0, 0.0]
  """
  q, scale = absmax_quantize(x, bits, axis)
  return (q * scale).astype(x.dtype)


def asymmetric_quantize(
    x: jax.Array, bits: int = 4, axis: int | tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Asymmetric (zero-point) quantisation to unsigned ``bits``-bit integers ``0 .. 2^bits - 1``.

  Args:
    x: any float array.
    bits: bit width (4: 16 levels).
    axis: axes min/max are taken over (they share scale and zero point); None = whole tensor.

  Returns:
    ``(q, scale, zero)``: integer-valued float32 ``q`` and the float32 scale and zero point
    (kept dims). ``x ~ (q - zero) * scale``.

  Example:
    >>> q, s, z = asymmetric_quantize(jnp.array([-1.0, 0.0, 2.0]))
    >>> q.tolist(), round(float(s[0]), 4), float(z[0])
    ([0.0, 5.0, 15.0], 0.2, 5.0)
  """
  qmax = 2**bits - 1
  x = x.astype(jnp.float32)
  lo = jnp.min(x, axis=axis, keepdims=True)
  hi = jnp.max(x, axis=axis, keepdims=True)
  scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
  zero = jnp.round(-lo / scale)
  q = jnp.clip(jnp.round(x / scale) + zero, 0, qmax)
  return q, scale, zero


def fake_quant_asymmetric(
    w_io: jax.Array, bits: int = 4, group_size: int | None = None
) -> jax.Array:
  """Asymmetric fake-quant of a ``[in, out]`` kernel per output channel, or in input groups.

  Args:
    w_io: ``[in, out]`` kernel (``y = x @ w``).
    bits: bit width.
    group_size: None = one scale per output channel (over all inputs); else one per
      ``group_size`` consecutive inputs per output channel. A last, shorter group is padded
      with its own edge value, which does not change its min or max.

  Returns:
    ``[in, out]`` dequantised kernel in ``w_io``'s dtype.

  Example:
    >>> fake_quant_asymmetric(jnp.ones((256, 4)), group_size=128).shape
    (256, 4)
  """
  if w_io.ndim != 2:
    raise ValueError(f"expected a [in, out] kernel, got shape {w_io.shape}.")
  if group_size is None:
    q, s, z = asymmetric_quantize(w_io, bits, axis=0)
    return ((q - z) * s).astype(w_io.dtype)
  if group_size <= 0:
    raise ValueError(f"group_size={group_size} must be positive (or None for per-channel).")
  n_in, n_out = w_io.shape
  n_groups = -(-n_in // group_size)
  padded = jnp.pad(w_io, ((0, n_groups * group_size - n_in), (0, 0)), mode="edge")
  w_gko = padded.reshape(n_groups, group_size, n_out)
  q, s, z = asymmetric_quantize(w_gko, bits, axis=1)
  return ((q - z) * s).reshape(-1, n_out)[:n_in].astype(w_io.dtype)


def _check_act(granularity: Any) -> None:
  if granularity is not None and granularity in ACT_GRANULARITIES:
    return
  hint = (" Activation scales are taken per sequence, never over the whole batch: use "
          "'per_sequence' (one scale per row [T, D])." if granularity == "per_tensor" else "")
  raise ValueError(
      f"activation granularity={granularity!r} is not known; expected 'per_sequence' or "
      f"'per_token'.{hint}")


def fake_quant_activation(x: jax.Array, granularity: str) -> jax.Array:
  """Dynamic absmax int8 fake-quant of a matmul's input.

  Args:
    x: ``[..., T, D]`` activations, e.g. ``[B, T, D]``; a ``[T, D]`` array is one sequence and
      a ``[D]`` vector one token.
    granularity: "per_sequence" (one scale per ``[T, D]`` slice, the last two axes: a row of
      the batch is quantised the same whatever the other rows hold) or "per_token" (one scale
      per ``D`` vector). In incremental decoding (``Transformer.extend``) a call sees only its
      new tokens, so a per-sequence scale spans those.

  Returns:
    The dequantised activations, same shape and dtype.

  Example:
    >>> x = jnp.array([[[254.0, 1.2]], [[127.0, 1.2]]])   # two sequences of one token
    >>> fake_quant_activation(x, "per_sequence").tolist()  # steps 2 and 1
    [[[254.0, 2.0]], [[127.0, 1.0]]]
  """
  _check_act(granularity)
  if granularity == "per_token" or x.ndim < 2:
    return fake_quant_absmax(x, 8, axis=-1)
  return fake_quant_absmax(x, 8, axis=(-2, -1))


# ----------------------------------------------------------------------------------------------
# Schemes.


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  """One round-to-nearest scheme (what it covers: ``COVERAGE_RULE``).

  Attributes:
    name: short label used in tables.
    weight_bits: 8 (symmetric absmax) or 4 (asymmetric zero point).
    weight_granularity: int8: "per_tensor" | "per_channel"; int4: "per_channel" | "group".
    group_size: inputs per group for "group".
    act: None (float activations), "per_sequence" or "per_token" dynamic absmax int8.
    include_embeddings: also quantise the token-embedding lookup (the head is always quantised).
  """

  name: str
  weight_bits: int
  weight_granularity: str
  group_size: int = 128
  act: str | None = None
  include_embeddings: bool = False

  def __post_init__(self) -> None:
    kind = {8: "int8", 4: "int4"}.get(self.weight_bits)
    if kind is None:
      raise ValueError(f"weight_bits={self.weight_bits} is not supported; use 8 or 4.")
    if self.weight_granularity not in WEIGHT_GRANULARITIES[kind]:
      raise ValueError(
          f"{kind} weights support granularity {WEIGHT_GRANULARITIES[kind]}, got "
          f"{self.weight_granularity!r}."
      )
    if self.act is not None:
      _check_act(self.act)

  def quantize_weight(self, w_io: jax.Array) -> jax.Array:
    """Fake-quantises one ``[in, out]`` kernel (or ``[D, V]`` transposed embedding table)."""
    if self.weight_bits == 8:
      axis = None if self.weight_granularity == "per_tensor" else 0
      return fake_quant_absmax(w_io, 8, axis=axis)
    group = self.group_size if self.weight_granularity == "group" else None
    return fake_quant_asymmetric(w_io, 4, group)

  def describe(self) -> str:
    """What the scheme does to weights, matmul inputs and the embedding lookup (one line).

    Example:
      >>> SCHEMES["w8a8_tensor"].describe().split("; ")[:2]
      ['weights int8 absmax, one scale per matrix', 'inputs int8, one scale per sequence']
    """
    if self.weight_bits == 8:
      weights = "int8 absmax, " + ("one scale per matrix" if self.weight_granularity == "per_tensor"
                                   else "one scale per output channel")
    else:
      weights = "int4 zero-point, " + (
          "one scale per output channel" if self.weight_granularity == "per_channel"
          else f"one scale per {self.group_size} inputs of an output channel")
    inputs = {None: "inputs float", "per_sequence": "inputs int8, one scale per sequence",
              "per_token": "inputs int8, one scale per token"}[self.act]
    lookup = ("embedding lookup quantised as the head" if self.include_embeddings
              else "embedding lookup float")
    return f"weights {weights}; {inputs}; {lookup}"


# Names: w<bits>[a8]_<weight granularity>[_<activation granularity>]; activation "tensor" means
# one scale per sequence (see ACT_SCALE_RULE). "w8a8_tensor" is per-tensor weights with
# per-sequence activations, "w8a8_token" per-channel weights with per-token activations. The
# names stay as they are so that metrics of earlier analyses keep their keys.
SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("w8_tensor", 8, "per_tensor"),
        QuantScheme("w8_channel", 8, "per_channel"),
        QuantScheme("w8a8_tensor", 8, "per_tensor", act="per_sequence"),
        QuantScheme("w8a8_token", 8, "per_channel", act="per_token"),
        QuantScheme("w8a8_tensor_token", 8, "per_tensor", act="per_token"),
        QuantScheme("w8a8_channel_tensor", 8, "per_channel", act="per_sequence"),
        QuantScheme("w4_channel", 4, "per_channel"),
        QuantScheme("w4_g128", 4, "group", group_size=128),
    )
}
DEFAULT_SCHEMES: tuple[str, ...] = tuple(SCHEMES)
EMBEDDING_SUFFIX = "+emb"


def resolve_schemes(names: str | list[str] | tuple[str, ...] | None) -> list[QuantScheme]:
  """Schemes by name (comma-separated string or list); None = all of ``SCHEMES``.

  A name ending in ``+emb`` also quantises the token-embedding lookup (e.g. ``w4_g128+emb``).

  Example:
    >>> [s.name for s in resolve_schemes("w8_tensor,w4_g128+emb")]
    ['w8_tensor', 'w4_g128+emb']
  """
  if names is None:
    names = DEFAULT_SCHEMES
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  base = [n[: -len(EMBEDDING_SUFFIX)] if n.endswith(EMBEDDING_SUFFIX) else n for n in names]
  unknown = [n for n, b in zip(names, base) if b not in SCHEMES]
  if unknown:
    raise ValueError(
        f"unknown quantisation scheme(s) {unknown}; known: {list(SCHEMES)} (add "
        f"'{EMBEDDING_SUFFIX}' to also quantise the embedding lookup)."
    )
  return [
      SCHEMES[b] if n == b else dataclasses.replace(SCHEMES[b], name=n, include_embeddings=True)
      for n, b in zip(names, base)
  ]


# ----------------------------------------------------------------------------------------------
# Parameters.


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(n for n in out if n != "value")


def quantized_param_names(state: Any, scheme: QuantScheme) -> list[str]:
  """Dotted paths of the parameters ``quantize_params`` changes in place.

  These are the linear kernels (the untied head's included) and, with ``include_embeddings``,
  the embedding table. A tied head is quantised into a table of its own by ``quantize_model``,
  which a parameter pytree cannot show; ``quantized_tensors`` lists everything a scheme covers.

  Example:
    >>> params = nnx.state(model, nnx.Param)                                # doctest: +SKIP
    >>> quantized_param_names(params, SCHEMES["w8_tensor"])[:1]             # doctest: +SKIP
    ['blocks.0.attn.q_proj.kernel']
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
    state: parameters, e.g. ``nnx.state(model, nnx.Param)``; leaves are ``[in, out]`` kernels.
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
    _check_act(granularity)
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
      _check_act(act)
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
  _check_act(granularity)
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
    model: an NNX model whose linear layers are called as sub-modules (``self.q_proj(x)``).
    granularity: "per_sequence" or "per_token".

  Returns:
    The wrapped copy.

  Raises:
    ValueError: the granularity is not known, or the model has no linear sub-module with a
      known name and no tied head.

  Example:
    >>> aq = with_activation_quant(model, "per_token")            # doctest: +SKIP
  """
  _check_act(granularity)
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
    path: dotted path of the module that holds it (``blocks.0.attn.q_proj``, ``lm_head``,
      ``embed``).
    role: the same names in every family: "attn.q", "attn.k", "attn.v", "attn.o", "mlp.in"
      (up and gate), "mlp.out" (down), "head" (``lm_head`` or the tied embedding read as a
      head), "embedding" (the lookup table).
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
    out += [QuantTarget(dotted(path, name), ROLES[name], kind) for kind in kinds]
  for path, _, name, _ in _tied_heads(model):
    out += [QuantTarget(dotted(path, name), "head", kind) for kind in kinds]
  if scheme.include_embeddings:
    for path, module in nnx.iter_modules(model):
      for name in EMBEDDING_NAMES:
        if isinstance(getattr(module, name, None), nnx.Embed):
          out.append(QuantTarget(dotted(path, name), "embedding", "weight"))
  return out
