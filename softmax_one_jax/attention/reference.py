"""Reference (XLA) attention with softmax, softmax-1 or learned sinks; can return the probabilities.

Layout follows ``jax.nn.dot_product_attention``: ``query [B, T, N, H]``, ``key``/``value``
``[B, S, K, H]`` with ``N`` a multiple of ``K`` (grouped-query attention: query head ``n`` reads
key/value head ``n // (N // K)``). This is the path that materialises ``[B, N, T, S]`` logits: use
it for analysis and as the ground truth for the fused kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softmax_one_jax.softmax import compute_dtype, resolve_sinks, softmax_with_sink

SegmentIds = jax.Array | tuple[jax.Array, jax.Array]


def check_shapes(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
  """Raises a ValueError naming the problem when q/k/v shapes do not form an attention.

  Example:
    >>> check_shapes(jnp.zeros((1, 4, 8, 16)), jnp.zeros((1, 4, 2, 16)), jnp.zeros((1, 4, 2, 16)))
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(
        "query, key and value must be [batch, seq, heads, head_dim]; got shapes "
        f"{query.shape}, {key.shape}, {value.shape}."
    )
  if key.shape != value.shape:
    raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape.")
  (b, _, n, h), (bk, _, k, hk) = query.shape, key.shape
  if b != bk or h != hk:
    raise ValueError(
        f"query {query.shape} and key {key.shape} must agree on batch and head_dim."
    )
  if n % k:
    raise ValueError(
        f"query heads ({n}) must be a multiple of key/value heads ({k}) for grouped-query "
        "attention."
    )


def split_segment_ids(
    segment_ids: SegmentIds | None, q_len: int, kv_len: int
) -> tuple[jax.Array, jax.Array] | None:
  """Normalises ``segment_ids`` to a ``(q_segment_ids [B, T], kv_segment_ids [B, S])`` pair.

  A single ``[B, T]`` array is allowed for self-attention (``T == S``).

  Example:
    >>> q_ids, kv_ids = split_segment_ids(jnp.zeros((2, 5), jnp.int32), 5, 5)
  """
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    q_ids, kv_ids = segment_ids
  else:
    if q_len != kv_len:
      raise ValueError(
          f"a single segment_ids array needs q_len == kv_len (got {q_len} and {kv_len}); "
          "pass a (q_segment_ids, kv_segment_ids) pair instead."
      )
    q_ids = kv_ids = segment_ids
  if q_ids.shape[-1] != q_len or kv_ids.shape[-1] != kv_len:
    raise ValueError(
        f"segment ids of shapes {q_ids.shape}, {kv_ids.shape} do not match q_len={q_len}, "
        f"kv_len={kv_len}."
    )
  return q_ids, kv_ids


def combine_masks(
    q_len: int,
    kv_len: int,
    *,
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: SegmentIds | None = None,
) -> jax.Array | None:
  """One boolean ``[B or 1, N or 1, T, S]`` mask (True = may attend) from every masking option.

  ``is_causal`` aligns the diagonal to the top-left (query ``t`` sees keys ``<= t``), as
  ``jax.nn.dot_product_attention`` does. Returns None when nothing is masked.

  Example:
    >>> combine_masks(3, 3, is_causal=True)[0, 0].astype(int)
    Array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]], dtype=int32)
  """
  out = None
  if is_causal:
    out = jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))[None, None]
  ids = split_segment_ids(segment_ids, q_len, kv_len)
  if ids is not None:
    q_ids, kv_ids = ids
    same = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
    out = same if out is None else out & same
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    if mask.ndim != 4:
      mask = jnp.broadcast_to(mask, (1,) * (4 - mask.ndim) + mask.shape)
    out = mask if out is None else out & mask
  return out


def attention_logits(
    query: jax.Array, key: jax.Array, scale: float | None = None
) -> jax.Array:
  """Scaled dot-product logits ``[B, N, T, S]`` in float32 (float64 for float64 inputs), GQA aware.

  Example:
    >>> attention_logits(jnp.ones((1, 2, 4, 8)), jnp.ones((1, 3, 2, 8))).shape
    (1, 4, 2, 3)
  """
  b, t, n, h = query.shape
  k = key.shape[2]
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  acc_dtype = compute_dtype(query.dtype)
  q_btkgh = query.reshape(b, t, k, n // k, h)
  logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, key, preferred_element_type=acc_dtype)
  return logits_bkgts.reshape(b, n, t, key.shape[1]) * jnp.asarray(scale, acc_dtype)


def reference_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    return_probs: bool = False,
    sinks: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Attention computed in plain jnp; optionally returns the ``[B, N, T, S]`` probabilities.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, H]``.
    softmax: "softmax1" (the default), "softmax" or "learned_sink" (needs ``sinks``).
    is_causal: query ``t`` attends to keys ``<= t``.
    mask: boolean, broadcastable to ``[B, N, T, S]``; True = may attend.
    segment_ids: ``[B, T]`` (self-attention) or a ``(q [B, T], kv [B, S])`` pair; tokens attend
      only within their own segment (packed documents).
    scale: logit scale; ``1/sqrt(H)`` by default.
    return_probs: also return the probabilities (float32, or float64 for float64 inputs).
    sinks: ``[N]`` float sink logits, one per query head, for ``softmax="learned_sink"``: a
      virtual key with logit ``sinks[n]`` (in the units of the scaled logits) and value 0.

  Returns:
    ``[B, T, N, H]`` in the query dtype, and the probabilities if asked for (rows sum to one
    minus the sink's share). A query that may attend to nothing outputs zeros.

  Example:
    >>> q = k = v = jnp.ones((1, 4, 2, 8))
    >>> reference_attention(q, k, v, is_causal=True).shape
    (1, 4, 2, 8)
  """
  check_shapes(query, key, value)
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  sinks_n = resolve_sinks(softmax, sinks, (n,))
  logits_bnts = attention_logits(query, key, scale)
  where = combine_masks(t, s, is_causal=is_causal, mask=mask, segment_ids=segment_ids)
  sinks_n11 = None if sinks_n is None else sinks_n[:, None, None]
  probs_bnts = softmax_with_sink(logits_bnts, sinks_n11, axis=-1, where=where)
  probs_bkgts = probs_bnts.reshape(b, k, n // k, t, s).astype(value.dtype)
  out_btkgh = jnp.einsum(
      "bkgts,bskh->btkgh", probs_bkgts, value, preferred_element_type=compute_dtype(value.dtype)
  )
  out_btnh = out_btkgh.reshape(b, t, n, h).astype(query.dtype)
  return (out_btnh, probs_bnts) if return_probs else out_btnh
