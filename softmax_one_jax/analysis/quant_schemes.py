"""Round-to-nearest quantisers on arrays, and the named schemes built from them (fake-quant).

Weights (kernels are ``[in, out]``):

* absmax int8, per tensor or per output channel: ``s = max|w| / 127``, ``q = clip(round(w/s),
  -127, 127)``, ``w_hat = q * s``; ``|w - w_hat| <= s / 2``.
* asymmetric zero-point int4, per output channel or in groups of ``group_size`` inputs per output
  channel: ``s = (max - min) / 15``, ``z = round(-min / s)``, ``q = clip(round(w / s) + z, 0, 15)``,
  ``w_hat = (q - z) * s``; ``|w - w_hat| <= s / 2``.

Activations (``ACT_SCALE_RULE``): dynamic absmax int8, one scale per sequence ("per_sequence":
over a row ``[T, D]`` of the batch) or per token vector ("per_token"), so a sequence's result
never depends on the other rows of its batch. Which tensors of a model a scheme covers, and how
it is applied, is ``softmax_one_jax.analysis.quantize``.

Example:
  >>> [s.name for s in resolve_schemes("w8_tensor,w4_g128+emb")]
  ['w8_tensor', 'w4_g128+emb']
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

WEIGHT_GRANULARITIES = {"int8": ("per_tensor", "per_channel"), "int4": ("per_channel", "group")}
ACT_GRANULARITIES = (None, "per_sequence", "per_token")

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


def check_act_granularity(granularity: Any) -> None:
  """Raises ``ValueError`` unless ``granularity`` is 'per_sequence' or 'per_token'."""
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
  check_act_granularity(granularity)
  if granularity == "per_token" or x.ndim < 2:
    return fake_quant_absmax(x, 8, axis=-1)
  return fake_quant_absmax(x, 8, axis=(-2, -1))


# ----------------------------------------------------------------------------------------------
# Schemes.


@dataclasses.dataclass(frozen=True)
class QuantScheme:
  """One round-to-nearest scheme (what it covers: ``quantize.COVERAGE_RULE``).

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
      check_act_granularity(self.act)

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
