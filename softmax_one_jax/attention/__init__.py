"""softmax-1 attention: one entry point that dispatches on ``implementation``.

Example:
  >>> import jax.numpy as jnp
  >>> from softmax_one_jax.attention import dot_product_attention
  >>> q = k = v = jnp.ones((2, 16, 4, 64))
  >>> dot_product_attention(q, k, v, is_causal=True).shape
  (2, 16, 4, 64)
"""

from __future__ import annotations

import jax

from softmax_one_jax.attention.reference import (
    SegmentIds,
    attention_logits,
    check_shapes,
    combine_masks,
    reference_attention,
)

IMPLEMENTATIONS = (None, "xla")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
  """Scaled dot-product attention with softmax-1 (default) or softmax.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``; ``N`` must be a multiple of ``K`` (grouped-query attention).
    value: ``[B, S, K, H]``.
    softmax: "softmax1" or "softmax".
    is_causal: query ``t`` attends only to keys ``<= t`` (top-left aligned).
    mask: boolean broadcastable to ``[B, N, T, S]``, True = may attend.
    segment_ids: ``[B, T]`` or ``(q [B, T], kv [B, S])``; no attention across segments.
    scale: logit scale, ``1/sqrt(H)`` by default.
    implementation: None (the fastest correct path for the platform) or "xla".

  Returns:
    ``[B, T, N, H]`` in the query's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is not known; expected one of {IMPLEMENTATIONS}."
    )
  return reference_attention(
      query,
      key,
      value,
      softmax=softmax,
      is_causal=is_causal,
      mask=mask,
      segment_ids=segment_ids,
      scale=scale,
  )


__all__ = [
    "IMPLEMENTATIONS",
    "SegmentIds",
    "attention_logits",
    "check_shapes",
    "combine_masks",
    "dot_product_attention",
    "reference_attention",
]
