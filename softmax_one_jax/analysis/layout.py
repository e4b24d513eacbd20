"""Where documents start in a packed batch: the token layout every analysis metric shares.

With packed documents (``segment_ids``, 0 = padding) "the first token" of a query is the first
token of the query's own document; without them it is position 0 of the row.

Example:
  >>> first_key_bt, counted_bt = counted_queries(jnp.array([[1, 1, 2, 2, 0]]), 1, 5)
  >>> first_key_bt.tolist()
  [[0, 0, 2, 2, 4]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_layout(
    segment_ids_bt: jax.Array | None, batch: int, seq_len: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Where each query's document starts, which tokens start a document, which are real.

  Args:
    segment_ids_bt: ``[B, T]`` int document ids (0 = padding), or None for one document per row.
    batch: ``B`` (used when ``segment_ids_bt`` is None).
    seq_len: ``T`` (used when ``segment_ids_bt`` is None).

  Returns:
    ``first_key_bt`` int32 ``[B, T]`` (index of the first token of the token's document),
    ``is_first_bt`` bool ``[B, T]`` (the token starts a document) and ``valid_bt`` bool ``[B, T]``
    (not padding).

  Example:
    >>> first, is_first, valid = document_layout(jnp.array([[1, 1, 2, 2, 0]]), 1, 5)
    >>> first.tolist(), is_first.tolist()
    ([[0, 0, 2, 2, 4]], [[True, False, True, False, False]])
  """
  t_idx = jnp.arange(seq_len, dtype=jnp.int32)
  if segment_ids_bt is None:
    first_key_bt = jnp.zeros((batch, seq_len), jnp.int32)
    is_first_bt = jnp.broadcast_to(t_idx == 0, (batch, seq_len))
    return first_key_bt, is_first_bt, jnp.ones((batch, seq_len), bool)
  seg_bt = jnp.asarray(segment_ids_bt)
  valid_bt = seg_bt != 0
  prev_bt = jnp.concatenate([jnp.full_like(seg_bt[:, :1], -1), seg_bt[:, :-1]], axis=1)
  starts_bt = seg_bt != prev_bt
  first_key_bt = jax.lax.cummax(jnp.where(starts_bt, t_idx[None, :], 0), axis=1)
  return first_key_bt.astype(jnp.int32), starts_bt & valid_bt, valid_bt


def counted_queries(
    segment_ids_bt: jax.Array | None, batch: int, seq_len: int
) -> tuple[jax.Array, jax.Array]:
  """Which queries the first-token metrics count: real ones that do not start a document.

  A document's first query can only see its own first token under causal masking, so it would
  count as a first-token hit for every model; padding (segment id 0) is never counted.

  Args:
    segment_ids_bt: ``[B, T]`` int document ids (0 = padding), or None for one document per row.
    batch: ``B``.
    seq_len: ``T``.

  Returns:
    ``first_key_bt`` int32 ``[B, T]`` (see ``document_layout``) and ``counted_bt`` bool ``[B, T]``.

  Example:
    >>> counted_queries(jnp.array([[1, 1, 2, 2, 0]]), 1, 5)[1].tolist()
    [[False, True, False, True, False]]
  """
  first_key_bt, is_first_bt, valid_bt = document_layout(segment_ids_bt, batch, seq_len)
  return first_key_bt, valid_bt & ~is_first_bt


def first_token_chance(segment_ids_bt: jax.Array | None, batch: int, seq_len: int) -> jax.Array:
  """The chance level of the first-token metrics on this token layout.

  A counted query ``t`` of a document starting at ``f`` sees ``t - f + 1`` keys. A head whose
  most-attended key is uniformly random among them names the first key with probability
  ``1 / (t - f + 1)``, and a head attending uniformly puts that mass on it; the chance level of
  both first-token metrics (argmax share and mean probability) is the mean of ``1 / (t - f + 1)``
  over the counted queries: ``(H_T - 1) / (T - 1)`` for unpacked rows of ``T`` tokens (3.5% at
  ``T = 128``).

  Args:
    segment_ids_bt: ``[B, T]`` int document ids (0 = padding), or None for one document per row.
    batch: ``B``.
    seq_len: ``T``.

  Returns:
    Scalar float32 (0 if no query is counted).

  Example:
    >>> round(float(first_token_chance(None, 1, 3)), 4)   # (1/2 + 1/3) / 2
    0.4167
  """
  first_key_bt, counted_bt = counted_queries(segment_ids_bt, batch, seq_len)
  visible_bt = jnp.arange(seq_len, dtype=jnp.float32)[None, :] - first_key_bt + 1.0
  total = jnp.sum(jnp.where(counted_bt, 1.0 / visible_bt, 0.0))
  return total / jnp.maximum(jnp.sum(counted_bt), 1)
