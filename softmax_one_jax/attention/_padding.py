"""Shared wrapper logic of the fused kernels: argument checks, padding to blocks, segment ids,
and the per-row score reduction of the first-token statistics (``max_and_first``).

The kernels see block-multiple sequence lengths and a power-of-two head_dim; this module pads the
inputs (zeros: zero q/k columns leave the logits unchanged, zero v columns add zero output
columns) and hands the true lengths to the kernels, which mask padded keys themselves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softmax_one_jax.attention.reference import SegmentIds, check_shapes, split_segment_ids
from softmax_one_jax.softmax import check_softmax_kind

KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def next_power_of_2(x: int) -> int:
  """Smallest power of two ``>= x`` (``x >= 1``).

  Example:
    >>> next_power_of_2(65)
    128
  """
  return 1 << max(0, (int(x) - 1).bit_length())


def round_up(x: int, multiple: int) -> int:
  """``x`` rounded up to a multiple of ``multiple``.

  Example:
    >>> round_up(100, 64)
    128
  """
  return -(-x // multiple) * multiple


def check_kernel_args(
    query: jax.Array, key: jax.Array, value: jax.Array, softmax: str, mask: jax.Array | None
) -> None:
  """Raises a ValueError for what the fused kernels cannot do (say what to use instead)."""
  check_shapes(query, key, value)
  check_softmax_kind(softmax)
  if mask is not None:
    raise ValueError(
        "the Pallas attention kernels take is_causal and segment_ids, not a dense mask "
        "(a [B, N, T, S] mask is the quadratic memory they avoid); express the mask with "
        "segment_ids or pass implementation='xla'."
    )
  for name, x in (("query", query), ("key", key), ("value", value)):
    if jnp.dtype(x.dtype) not in KERNEL_DTYPES:
      raise ValueError(
          f"{name} has dtype {x.dtype}; the Pallas kernels take float32, bfloat16 or float16 "
          "(use implementation='xla' for other dtypes)."
      )


def resolve_scale(scale: float | None, head_dim: int) -> float:
  """``1/sqrt(head_dim)`` of the true (unpadded) head_dim unless ``scale`` is given."""
  return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def scale_sign(scale: float) -> float:
  """+1, -1 or 0: the factor that orders dot products as the logits ``scale * q.k`` are ordered.

  Example:
    >>> scale_sign(-0.25)
    -1.0
  """
  return 1.0 if scale > 0 else (-1.0 if scale < 0 else 0.0)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``x`` along ``axis`` up to ``size`` (no-op if already that long).

  Example:
    >>> pad_axis(jnp.ones((2, 3)), 1, 4).shape
    (2, 4)
  """
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def padded_segment_ids(
    segment_ids: SegmentIds | None, batch: int, q_len: int, kv_len: int, q_pad: int, kv_pad: int
) -> tuple[jax.Array, jax.Array] | None:
  """``(q_ids [B, q_pad], kv_ids [B, kv_pad])`` int32, padded with ids that never match.

  Padded keys get an id below every real id and padded queries one lower still, so nothing real
  attends to padding. Returns None when there are no segment ids (the GPU kernel then masks
  padded keys by position).

  Example:
    >>> q_ids, kv_ids = padded_segment_ids(jnp.zeros((1, 3), jnp.int32), 1, 3, 3, 4, 4)
    >>> kv_ids.tolist()
    [[0, 0, 0, -1]]
  """
  ids = split_segment_ids(segment_ids, q_len, kv_len)
  if ids is None:
    return None
  q_ids, kv_ids = (jnp.broadcast_to(jnp.asarray(i, jnp.int32), (batch, n)) for i, n in
                   zip(ids, (q_len, kv_len)))
  floor = jnp.minimum(jnp.min(q_ids), jnp.min(kv_ids))
  q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(floor - 2, (batch, q_pad - q_len))], axis=1)
  kv_ids = jnp.concatenate([kv_ids, jnp.broadcast_to(floor - 1, (batch, kv_pad - kv_len))],
                           axis=1)
  return q_ids, kv_ids


def max_and_first(d: jax.Array, k_pos: jax.Array, none: int) -> tuple[jax.Array, jax.Array]:
  """Per row, the largest of the scores ``d [..., S]`` and the score of the first visible key.

  A key is visible where its score is not ``-inf`` (masked scores are ``-inf``; a dot product of
  finite inputs is finite); the first visible key is the one of smallest ``k_pos`` (``[..., S]``
  key indices, broadcastable to ``d``). Both come from ``d`` itself by masked reductions, not by
  a slice or a second product that XLA or Triton could round differently. Rows with nothing
  visible give ``-inf`` twice. ``none``: an index above every key's (the number of keys). Used
  by the statistics paths: dense logits, a key chunk or a kernel key tile.

  Example:
    >>> d = jnp.array([[-jnp.inf, 3.0, 5.0], [1.0, 2.0, 0.0]])
    >>> [x.tolist() for x in max_and_first(d, jnp.arange(3)[None, :], 3)]
    [[5.0, 2.0], [3.0, 1.0]]
  """
  first_pos = jnp.min(jnp.where(d == -jnp.inf, none, k_pos), axis=-1)  # plain ops: Triton
  first = jnp.max(jnp.where(k_pos == first_pos[..., None], d, -jnp.inf), axis=-1)
  return jnp.max(d, axis=-1), first
