"""Where documents start in a packed batch: the token layout every analysis metric shares.

With packed documents (``segment_ids``, 0 = padding) "the first token" of a query is the first
token of the query's own document; without them it is position 0 of the row. Also here: which
model intermediates each attention source of the metrics reads (``ATTENTION_SOURCES``).

Example:
  >>> first_key_bt, counted_bt = counted_queries(jnp.array([[1, 1, 2, 2, 0]]), 1, 5)
  >>> first_key_bt.tolist()
  [[0, 0, 2, 2, 4]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softmax_one_jax.models.transformer import segment_starts

# Where the first-token metrics read attention from: the ``[L, B, N, T, T]`` probabilities (the
# mass; hits from the logit-decided flags), the per-query statistics only, or no attention.
ATTENTION_SOURCES = ("probs", "stats", "none")


def attention_intermediates(attention: str) -> tuple[str, ...]:
  """The model intermediates a metric source needs (``models.intermediates.with_intermediates``).

  The probabilities source also takes ``attention_stats``: probabilities cannot break ties, so
  every query's hit comes from its logit-decided flag.

  Example:
    >>> attention_intermediates("stats")
    ('hidden', 'attention_stats')
  """
  if attention not in ATTENTION_SOURCES:
    raise ValueError(f"attention={attention!r} is not known; expected one of {ATTENTION_SOURCES}.")
  return ("hidden",) + {"probs": ("attention_probs", "attention_stats"),
                        "stats": ("attention_stats",), "none": ()}[attention]


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
  first_key_bt = segment_starts(seg_bt)
  return first_key_bt, (first_key_bt == t_idx[None, :]) & valid_bt, valid_bt


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


def first_token_probs(probs_lbnts: jax.Array, segment_ids_bt: jax.Array | None = None
                      ) -> jax.Array:
  """Each query's probability on the first token of its own document.

  Args:
    probs_lbnts: ``[L, B, N, T, T]`` attention probabilities.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).

  Returns:
    ``[L, B, N, T]`` float32.

  Example:
    >>> p = jnp.eye(3)[None, None, None]  # each query on itself; query 1 starts document 2
    >>> first_token_probs(p, jnp.array([[1, 2, 2]]))[0, 0, 0].tolist()
    [1.0, 1.0, 0.0]
  """
  _, b, _, t, _ = probs_lbnts.shape
  first_key_bt, _, _ = document_layout(segment_ids_bt, b, t)
  key_idx = first_key_bt[None, :, None, :, None]
  return jnp.take_along_axis(probs_lbnts, key_idx, axis=-1)[..., 0].astype(jnp.float32)
