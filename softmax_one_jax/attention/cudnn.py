"""The "cudnn" attention path: softmax-1 and learned sinks on cuDNN's fused flash attention.

softmax-1 is ordinary softmax over one extra key whose logit is 0 and whose value is 0 (the
null key of ``softmax.py``). ``null_key_attention`` builds that key and hands the problem to
``jax.nn.dot_product_attention``, whose ``implementation="cudnn"`` is NVIDIA's flash attention
(forward and backward; the one JAX's own tests run on GPUs):

- a zero key and a zero value are put in front of the keys (``S + 1`` keys): ``exp(q.0) = 1`` is
  softmax-1's ``1 +`` in the denominator, and the zero value adds nothing to the output;
- with a causal mask a zero query is put in front of the queries too (``T + 1``), so that query
  ``t`` is row ``t + 1`` of cuDNN's top-left causal mask and sees the null key and its own keys
  ``0..t``; that row is dropped again (it saw only the null key: output 0, no gradient);
- cuDNN's backward takes even lengths only (jax 0.10 applies its rule for biased attention to
  every call), so a length made odd gets one more zero row at its end, hidden by the
  sequence lengths (``query_seq_lengths``, ``key_value_seq_lengths``: cuDNN's padding mask);
- learned sinks (logit ``c_n`` per query head) ride on ``EXTRA_DIMS`` = 8 extra head-dim
  columns (cuDNN wants head dims in multiples of 8): the null key holds ``1`` in the first three,
  every real key 0, and query head ``n`` holds ``c_n / scale`` split into three terms of the
  query's dtype (``hi + mid + lo``: bfloat16 carries 8 significant bits, three carry 24, about
  float32's). The null key's logit is then ``scale * (hi + mid + lo) = c_n`` to float32
  rounding while every real logit is unchanged; the values get 8 zero columns, dropped after.
  The sinks' gradient flows through ``hi`` (``mid`` and ``lo`` have derivative 0 in ``c``).

The tests check the construction with a float64 softmax attention standing in for cuDNN
(``implementation=`` takes one with ``jax.nn.dot_product_attention``'s keywords) against ``reference.py``'s softmax-1 and learned sinks: causal
and non-causal, grouped-query heads, segment ids and padding, values and gradients; and through
``jax.nn``'s XLA attention (``implementation="xla"``, softmax in float32).

What cuDNN takes (``unsupported_reason`` says why not, and ``resolve_implementation`` then falls
back to "xla"): float16/bfloat16; a head dim that is a multiple of 8 and at most
``max_head_dim()`` (128, or 256 on a visible Hopper or newer GPU), plus ``EXTRA_DIMS`` for learned
sinks; no dense ``mask``; and a causal mask only over ``T == S`` (self-attention, where top-left and
bottom-right alignment agree). Segment ids (packed documents, padding) become a dense
``[B, 1, T + 1, S + 1]`` mask, which cuDNN takes as a bias (and returns its gradient): memory
``B T S`` per layer in the forward and the backward, small next to the activations at the
sequence lengths the paper trains on.

cuDNN returns no per-query statistics the paper's diagnostics can use: ``stats.py`` computes
them in its own O(seq) pass over ``q`` and ``k`` ("chunked" on GPUs), whatever ran the forward.

Example:
  >>> q = k = v = jnp.ones((1, 16, 4, 64), jnp.float32)
  >>> out = null_key_attention(q, k, v, is_causal=True, implementation="xla")
  >>> out.shape
  (1, 16, 4, 64)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from softmax_one_jax.attention.reference import SegmentIds, check_shapes, split_segment_ids

# Head-dim columns added for learned sinks: cuDNN takes head dims in multiples of 8.
EXTRA_DIMS = 8
# Terms of the query's dtype that carry a sink logit (hi + mid + lo).
_SINK_TERMS = 3
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def max_head_dim() -> int:
  """The largest head dim cuDNN's flash attention takes here: 256 on a visible GPU of compute
  capability >= 9.0 (Hopper), else 128 (older GPUs, and compiling for an absent GPU, where
  jax's own check cannot see the device and applies 128).

  Example:
    >>> max_head_dim()   # on a CPU host
    128
  """
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return 128
  capability = getattr(devices[0], "compute_capability", "0.0")
  return 256 if tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0) else 128


def cudnn_available() -> bool:
  """Whether jax can call cuDNN: a visible NVIDIA GPU (jax's CUDA wheels bring cuDNN), or, when
  compiling for an absent one, a CUDA plugin with cuDNN's libraries (tracing a cuDNN call raises
  "cuDNN is not detected" otherwise)."""
  try:
    if jax.devices("cuda"):
      return True
  except RuntimeError:
    pass
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
    return cuda_versions is not None and cuda_versions.cudnn_get_version() > 0
  except Exception:  # noqa: BLE001  (moved in another jax, or the library is absent)
    return False


def unsupported_reason(
    *,
    softmax: str,
    dtype: jax.typing.DTypeLike,
    head_dim: int | None,
    q_len: int | None = None,
    kv_len: int | None = None,
    is_causal: bool = True,
    mask: bool = False,
) -> str | None:
  """None when the cudnn path takes the call, else why not (the rule of the module docstring).

  Example:
    >>> unsupported_reason(softmax="softmax1", dtype=jnp.float32, head_dim=64)
    'float32 inputs (cuDNN takes float16 and bfloat16)'
  """
  if jnp.dtype(dtype) not in CUDNN_DTYPES:
    return f"{jnp.dtype(dtype).name} inputs (cuDNN takes float16 and bfloat16)"
  if mask:
    return "a dense mask"
  if head_dim is not None:
    width = head_dim + (EXTRA_DIMS if softmax == "learned_sink" else 0)
    if head_dim % 8 or width > max_head_dim():
      extra = f" + {EXTRA_DIMS} for the sinks" if softmax == "learned_sink" else ""
      return (f"head dim {head_dim}{extra} (cuDNN takes multiples of 8 up to "
              f"{max_head_dim()})")
  if is_causal and q_len is not None and kv_len is not None and q_len != kv_len:
    return f"causal attention of {q_len} queries over {kv_len} keys (cuDNN aligns top-left)"
  return None


def split_in_terms(x: jax.Array, dtype: jax.typing.DTypeLike, terms: int = _SINK_TERMS
                   ) -> jax.Array:
  """``x`` (float32) as ``terms`` values of ``dtype`` whose float32 sum is ``x`` to float32
  rounding: ``[..., terms]``. Differentiable: the first term carries the whole gradient.

  Example:
    >>> parts = split_in_terms(jnp.array([1 / 3]), jnp.bfloat16)
    >>> abs(float(parts.astype(jnp.float32).sum()) - 1 / 3) < 1e-7
    True
  """
  parts, rest = [], x
  for _ in range(terms):
    part = rest.astype(dtype)
    parts.append(part)
    rest = rest - part.astype(rest.dtype)
  return jnp.stack(parts, axis=-1)


def _visible_mask(segment_ids: SegmentIds | None, q_len: int, kv_len: int, lead: int,
                  q_tail: int, kv_tail: int, null: int) -> jax.Array | None:
  """``[B, 1, T', S']`` bool of the constructed problem: same-segment pairs, with the null key's
  column (``null`` = 1) visible to every query, the added rows seeing only it; None without
  segment ids."""
  ids = split_segment_ids(segment_ids, q_len, kv_len)
  if ids is None:
    return None
  q_ids, kv_ids = ids
  same_bts = q_ids[:, :, None] == kv_ids[:, None, :]
  same_bts = jnp.pad(same_bts, ((0, 0), (lead, q_tail), (0, kv_tail)), constant_values=False)
  null_bts = jnp.ones(same_bts.shape[:2] + (null,), bool)
  return jnp.concatenate([null_bts, same_bts], axis=2)[:, None]


def _pad_seq(x: jax.Array, lead: int, tail: int) -> jax.Array:
  """``x`` ``[B, L, ...]`` with ``lead`` zero rows before and ``tail`` after along ``L``."""
  return jnp.pad(x, ((0, 0), (lead, tail)) + ((0, 0),) * (x.ndim - 2))


def null_key_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    sinks: jax.Array | None = None,
    implementation: str | Callable[..., jax.Array] = "cudnn",
) -> jax.Array:
  """softmax, softmax-1 or learned-sink attention as ``jax.nn.dot_product_attention``.

  Args:
    query: ``[B, T, N, H]``.
    key, value: ``[B, S, K, H]``, ``N % K == 0``.
    softmax: "softmax1", "softmax" or "learned_sink" (with ``sinks``).
    is_causal: query ``t`` sees keys ``<= t`` (top-left, as ``reference.py``).
    segment_ids: ``[B, T]`` or ``(q [B, T], kv [B, S])``: no attention across segments (a dense
      mask; the null key stays visible to every query).
    scale: logit scale, ``1/sqrt(H)`` by default (``H`` the caller's head dim).
    sinks: ``[N]`` sink logits for "learned_sink" (float; units of the scaled logits).
    implementation: "cudnn" (NVIDIA's fused flash attention), "xla" (jax.nn's, which computes
      its softmax in float32), or any softmax attention with ``jax.nn.dot_product_attention``'s
      keywords (``f(q, k, v, mask=, scale=, is_causal=, query_seq_lengths=,
      key_value_seq_lengths=)``; the tests' float64 stand-in).

  Returns:
    ``[B, T, N, H]`` in the query's dtype.

  Example:
    >>> q = k = v = jnp.ones((1, 8, 2, 16))
    >>> out = null_key_attention(q, k, v, softmax="learned_sink", sinks=jnp.zeros(2),
    ...                          implementation="xla")
  """
  check_shapes(query, key, value)
  b, t, n, h = query.shape
  s, kv_heads = key.shape[1], key.shape[2]
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  attend = implementation if callable(implementation) else functools.partial(
      jax.nn.dot_product_attention, implementation=implementation)
  null = 0 if softmax == "softmax" else 1
  null_key = jnp.zeros((b, null, kv_heads, h), key.dtype)
  if softmax == "learned_sink":
    if sinks is None:
      raise ValueError("softmax='learned_sink' needs sinks=[N] sink logits.")
    sinks = jnp.asarray(sinks)
    sinks = sinks.astype(jnp.promote_types(sinks.dtype, jnp.float32))
    terms_n3 = split_in_terms(sinks / scale, query.dtype)
    extra_btn8 = jnp.zeros((b, t, n, EXTRA_DIMS), query.dtype)
    query = jnp.concatenate([query, extra_btn8.at[..., :_SINK_TERMS].set(terms_n3)], axis=-1)
    pad = ((0, 0), (0, 0), (0, 0), (0, EXTRA_DIMS))
    key, value, null_key = jnp.pad(key, pad), jnp.pad(value, pad), jnp.pad(null_key, pad)
    null_key = null_key.at[..., h:h + _SINK_TERMS].set(1)
  # cuDNN's backward wants even lengths: an odd one gets a zero row at its end, hidden by the
  # sequence lengths (cuDNN's padding mask).
  lead = null if is_causal else 0
  q_tail, kv_tail = (t + lead) % 2, (s + null) % 2
  key = jnp.concatenate([null_key, _pad_seq(key, 0, kv_tail)], axis=1)
  value = jnp.concatenate([jnp.zeros_like(null_key), _pad_seq(value, 0, kv_tail)], axis=1)
  query = _pad_seq(query, lead, q_tail)
  lengths = {}
  if q_tail or kv_tail:
    lengths = dict(query_seq_lengths=jnp.full((b,), t + lead, jnp.int32),
                   key_value_seq_lengths=jnp.full((b,), s + null, jnp.int32))
  mask = _visible_mask(segment_ids, t, s, lead, q_tail, kv_tail, null)
  out = attend(query, key, value, mask=mask, scale=scale, is_causal=is_causal, **lengths)
  return out[:, lead:lead + t, :, :h]
