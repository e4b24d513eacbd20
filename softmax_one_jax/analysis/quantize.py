"""Round-to-nearest post-training quantisation (the paper's "basic algorithms"), as fake-quant.

Fake-quant = quantise then dequantise, in float32: the model runs unchanged on values that lie
exactly on the quantisation grid, so perplexity measures the quantisation error alone.

Weights (every linear layer: ``q/k/v/o_proj``, ``up/gate/down_proj``, ``lm_head``; the token
embedding only with ``include_embeddings``; kernels are ``[in, out]``):

* absmax int8, per tensor or per output channel: ``s = max|w| / 127``, ``q = clip(round(w/s),
  -127, 127)``, ``w_hat = q * s``; ``|w - w_hat| <= s / 2``.
* asymmetric zero-point int4, per output channel or in groups of ``group_size`` inputs per output
  channel: ``s = (max - min) / 15``, ``z = round(-min / s)``, ``q = clip(round(w / s) + z, 0, 15)``,
  ``w_hat = (q - z) * s``; ``|w - w_hat| <= s / 2``.

Activations (the input of every quantised linear layer, dynamic absmax int8 per tensor or per
token) are quantised by wrapping the linear modules of a *copy* of the model
(``with_activation_quant``): the model code is not forked or changed.

With tied embeddings (GPT-2) the output projection *is* the token embedding, so it is quantised
only with ``include_embeddings``.

Example:
  >>> qmodel = quantize_model(model, SCHEMES["w4_g128"])      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LINEAR_NAMES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj", "lm_head")
EMBEDDING_NAMES = ("embed",)
WEIGHT_GRANULARITIES = {"int8": ("per_tensor", "per_channel"), "int4": ("per_channel", "group")}
ACT_GRANULARITIES = (None, "per_tensor", "per_token")


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


def fake_quant_activation(x_btd: jax.Array, granularity: str) -> jax.Array:
  """Dynamic absmax int8 fake-quant of a linear layer's input.

  Args:
    x_btd: ``[..., D]`` activations.
    granularity: "per_tensor" (one scale for the whole array) or "per_token" (one per vector).

  Returns:
    The dequantised activations, same shape and dtype.

  Example:
    >>> fake_quant_activation(jnp.array([[127.0, 0.4], [1.0, 0.4]]), "per_tensor").tolist()
    [[127.0, 0.0], [1.0, 0.0]]
  """
  if granularity == "per_tensor":
    return fake_quant_absmax(x_btd, 8, axis=None)
  if granularity == "per_token":
    return fake_quant_absmax(x_btd, 8, axis=-1)
  raise ValueError(
      f"granularity={granularity!r} is not known; expected 'per_tensor' or 'per_token'.")


# ----------------------------------------------------------------------------------------------
# Schemes and their application to a model.


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  """One round-to-nearest scheme.

  Attributes:
    name: short label used in tables.
    weight_bits: 8 (symmetric absmax) or 4 (asymmetric zero point).
    weight_granularity: int8: "per_tensor" | "per_channel"; int4: "per_channel" | "group".
    group_size: inputs per group for "group".
    act: None (float activations), "per_tensor" or "per_token" dynamic absmax int8.
    include_embeddings: also quantise the token embedding (the output projection when tied).
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
    if self.act not in ACT_GRANULARITIES:
      raise ValueError(f"act={self.act!r} is not known; expected one of {ACT_GRANULARITIES}.")

  def quantize_weight(self, w_io: jax.Array) -> jax.Array:
    """Fake-quantises one ``[in, out]`` kernel (or ``[V, D]`` embedding, rows as channels)."""
    if self.weight_bits == 8:
      axis = None if self.weight_granularity == "per_tensor" else 0
      return fake_quant_absmax(w_io, 8, axis=axis)
    group = self.group_size if self.weight_granularity == "group" else None
    return fake_quant_asymmetric(w_io, 4, group)


# Names: w<bits>[a8]_<weight granularity>[_<activation granularity>]; "w8a8_tensor" is per-tensor
# weights and activations, "w8a8_token" per-channel weights with per-token activations.
SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("w8_tensor", 8, "per_tensor"),
        QuantScheme("w8_channel", 8, "per_channel"),
        QuantScheme("w8a8_tensor", 8, "per_tensor", act="per_tensor"),
        QuantScheme("w8a8_token", 8, "per_channel", act="per_token"),
        QuantScheme("w8a8_tensor_token", 8, "per_tensor", act="per_token"),
        QuantScheme("w8a8_channel_tensor", 8, "per_channel", act="per_tensor"),
        QuantScheme("w4_channel", 4, "per_channel"),
        QuantScheme("w4_g128", 4, "group", group_size=128),
    )
}
DEFAULT_SCHEMES: tuple[str, ...] = tuple(SCHEMES)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(n for n in out if n != "value")


def quantized_param_names(state: Any, scheme: QuantScheme) -> list[str]:
  """Dotted paths of the parameters ``quantize_params`` changes (for reports and tests).

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

  Embedding tables ``[V, D]`` are quantised per row (one token = one channel) for "per_channel"
  and in groups along ``D`` for "group".

  Args:
    state: parameters, e.g. ``nnx.state(model, nnx.Param)``; leaves are ``[in, out]`` kernels.
    scheme: the weight scheme.

  Returns:
    The same structure with quantised linear kernels (and embeddings if asked); others unchanged.
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


class ActQuantLinear(nnx.Module):
  """Wraps a linear module so its input is fake-quantised to int8 before the matmul.

  Example:
    >>> lin = ActQuantLinear(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), "per_token")
    >>> lin(jnp.ones((3, 4))).shape
    (3, 2)
  """

  def __init__(self, inner: nnx.Module, granularity: str):
    if granularity not in ("per_tensor", "per_token"):
      raise ValueError(f"granularity={granularity!r}; expected 'per_tensor' or 'per_token'.")
    self.inner = inner
    self.granularity = granularity

  def __call__(self, x, *args, **kwargs):
    return self.inner(fake_quant_activation(x, self.granularity), *args, **kwargs)


def with_activation_quant(model: nnx.Module, granularity: str) -> nnx.Module:
  """A copy of ``model`` whose linear layers quantise their inputs (dynamic absmax int8).

  Every sub-module attribute named in ``LINEAR_NAMES`` is replaced by an ``ActQuantLinear``
  around it; the original model is not modified.

  Args:
    model: an NNX model whose linear layers are called as sub-modules (``self.q_proj(x)``).
    granularity: "per_tensor" or "per_token".

  Returns:
    The wrapped copy.

  Raises:
    ValueError: the model has no linear sub-module with a known name.
  """
  copy = nnx.clone(model)
  targets = []
  for _, module in nnx.iter_modules(copy):
    for name in LINEAR_NAMES:
      child = getattr(module, name, None)
      if isinstance(child, nnx.Module) and not isinstance(child, ActQuantLinear):
        targets.append((module, name, child))
  if not targets:
    raise ValueError(
        f"no linear sub-modules named {LINEAR_NAMES} found in {type(model).__name__}; "
        "activation quantisation needs them."
    )
  for module, name, child in targets:
    setattr(module, name, ActQuantLinear(child, granularity))
  return copy


def quantize_model(model: nnx.Module, scheme: QuantScheme) -> nnx.Module:
  """A fake-quantised copy of ``model`` (weights, and activations if the scheme says so).

  Example:
    >>> q = quantize_model(model, SCHEMES["w8a8_token"])          # doctest: +SKIP
  """
  copy = nnx.clone(model)
  params = nnx.state(copy, nnx.Param)
  nnx.update(copy, quantize_params(params, scheme))
  if scheme.act is not None:
    copy = with_activation_quant(copy, scheme.act)
  return copy


EMBEDDING_SUFFIX = "+emb"


def resolve_schemes(names: str | list[str] | tuple[str, ...] | None) -> list[QuantScheme]:
  """Schemes by name (comma-separated string or list); None = all of ``SCHEMES``.

  A name ending in ``+emb`` also quantises the token embedding (e.g. ``w4_g128+emb``).

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
        f"'{EMBEDDING_SUFFIX}' to also quantise the embedding)."
    )
  return [
      SCHEMES[b] if n == b else dataclasses.replace(SCHEMES[b], name=n, include_embeddings=True)
      for n, b in zip(names, base)
  ]
