"""Per-batch sums of the outlier metrics: exact under a sum (or max) over batches.

Each function returns arrays whose sum over batches (maximum, for the ``max_*`` entries:
``combine_sums``) is exact; ``outliers.finalize`` turns the totals into the reported means. The
definitions of the metrics are in the docstring of ``softmax_one_jax.analysis.outliers``.

Example:
  >>> s = combine_sums(nll_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32)),
  ...                  nll_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32)))
  >>> float(s["nll_weight"])
  4.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softmax_one_jax.analysis.layout import counted_queries, document_layout, first_token_probs
from softmax_one_jax.attention.stats import first_token_prob
from softmax_one_jax.models.loss import weighted_cross_entropy

Sums = dict[str, jax.Array]



def first_token_sums_from_probs(
    probs_lbnts: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    argmax_first_lbnt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from attention probabilities.

  A query's hit: with ``argmax_first_lbnt``, its flag (its first visible key, the first token
  of its document, has a logit >= every visible logit, ties to it:
  ``attention.first_token_stats``); without, ``argmax`` over its probabilities names its
  document's first token (ties go to the earliest key, so a near-tie that exp rounding merged
  counts as a hit, and a row of all-zero probabilities names key 0). The mass is always the
  probability on the document's first token.

  Args:
    probs_lbnts: ``[L, B, N, T, T]`` attention probabilities (rows may sum to < 1: softmax-1).
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).
    argmax_first_lbnt: optional ``[L, B, N, T]`` bool, the logit-decided first-key argmax flags
      of the same attention; they decide every query's hit.

  Returns:
    ``ft_hits`` ``[L, N]`` (queries whose argmax key is their first token), ``ft_mass`` ``[L, N]``
    (summed probability on the first token) and ``ft_count`` ``[L, N]`` (queries counted).

  Example:
    >>> p = jnp.tril(jnp.ones((4, 4)))[None, None, None] / jnp.arange(1, 5)[:, None]
    >>> first_token_sums_from_probs(p)["ft_count"].tolist()
    [[3.0]]
  """
  if argmax_first_lbnt is None:
    _, b, _, t, _ = probs_lbnts.shape
    first_key_bt, _, _ = document_layout(segment_ids_bt, b, t)
    argmax_first_lbnt = jnp.argmax(probs_lbnts, axis=-1) == first_key_bt[None, :, None, :]
  mass_lbnt = first_token_probs(probs_lbnts, segment_ids_bt)
  return first_token_sums_from_flags(argmax_first_lbnt, mass_lbnt, segment_ids_bt)


def first_token_sums_from_stats(
    first_logit_lbnt: jax.Array,
    row_max_lbnt: jax.Array,
    lse_lbnt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from per-query kernel statistics (no ``T x T`` array).

  Tie rule: the query's first visible key (the first token of its document) is the argmax iff
  ``first_logit >= row_max`` (ties go to it, as ``argmax`` does). ``attention.attention_stats``
  returns its three arrays so that this comparison reproduces the decision its implementation
  made from the scores themselves (see its docstring); arrays from elsewhere should come from
  one computation of the logits. The probability is ``exp(first_logit - lse)`` where ``lse`` is
  the row's log-normaliser (for softmax-1 it includes the virtual zero logit,
  ``log(1 + sum exp)``; for learned sinks the head's sink logit).

  ``softmax_one_jax.attention.attention_stats`` gives the logit on each query's first visible
  key, which under causal attention with ``segment_ids`` is the first token of its document:
  every document's queries are counted, as in ``first_token_sums_from_probs``.

  Args:
    first_logit_lbnt: ``[L, B, N, T]`` logit of each query on its first visible key.
    row_max_lbnt: ``[L, B, N, T]`` maximum logit over the visible keys (not counting the null key).
    lse_lbnt: ``[L, B, N, T]`` log-normaliser of each row.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).

  Returns:
    The same ``ft_hits`` / ``ft_mass`` / ``ft_count`` ``[L, N]`` sums as
    ``first_token_sums_from_probs``.

  Example:
    >>> z = jnp.zeros((1, 1, 1, 3))
    >>> first_token_sums_from_stats(z, z, z)["ft_hits"].tolist()
    [[2.0]]
  """
  first = first_logit_lbnt.astype(jnp.float32)
  seen = ~jnp.isneginf(first)
  hit_lbnt = seen & (first >= row_max_lbnt.astype(jnp.float32))
  mass_lbnt = first_token_prob(first, lse_lbnt)
  return first_token_sums_from_flags(hit_lbnt, mass_lbnt, segment_ids_bt)


def first_token_sums_from_flags(
    argmax_first_lbnt: jax.Array,
    prob_first_lbnt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from per-query flags (``attention.first_token_stats`` output).

  Nothing is decided here: the flags carry the tie rule of ``attention.stats`` (the query's
  first visible key's score >= every visible key's, ties to it), decided where the row max was
  computed.

  Args:
    argmax_first_lbnt: ``[L, B, N, T]`` bool, the query's first visible key (the first token of
      its document) is its argmax.
    prob_first_lbnt: ``[L, B, N, T]`` probability on that key.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding); every document's queries
      count except its first (``layout.counted_queries``).

  Returns:
    ``ft_hits`` / ``ft_mass`` / ``ft_count`` ``[L, N]``.

  Example:
    >>> s = first_token_sums_from_flags(jnp.ones((1, 1, 1, 3), bool), jnp.ones((1, 1, 1, 3)))
    >>> s["ft_count"].tolist()
    [[2.0]]
  """
  _, b, _, t = argmax_first_lbnt.shape
  _, counted_bt = counted_queries(segment_ids_bt, b, t)
  w_lbnt = jnp.broadcast_to(counted_bt[None, :, None, :], argmax_first_lbnt.shape)
  w_lbnt = w_lbnt.astype(jnp.float32)
  return {
      "ft_hits": jnp.sum(argmax_first_lbnt.astype(jnp.float32) * w_lbnt, axis=(1, 3)),
      "ft_mass": jnp.sum(prob_first_lbnt.astype(jnp.float32) * w_lbnt, axis=(1, 3)),
      "ft_count": jnp.sum(w_lbnt, axis=(1, 3)),
  }


def token_kurtosis(x_td: jax.Array) -> jax.Array:
  """Raw fourth standardised moment over the last axis: ``E[(x - mu)^4] / sigma^4``.

  Computed in float32 as ``mean(z^4)`` with ``z = (x - mu) / sigma`` (no ``x^4`` overflow). A
  constant vector (``sigma = 0``) gives 0.

  Args:
    x_td: ``[..., D]``.

  Returns:
    ``[...]`` kurtosis (about 3 for a Gaussian vector, up to ``D`` for one spike).

  Example:
    >>> float(token_kurtosis(jnp.array([0.0, 0.0, 0.0, 4.0])))  # one spike: D - 2 + 1/(D-1)
    2.333...
  """
  x = x_td.astype(jnp.float32)
  c = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(c * c, axis=-1, keepdims=True)
  safe = jnp.where(var > 0, var, 1.0)
  z = c * jax.lax.rsqrt(safe)
  return jnp.where(var[..., 0] > 0, jnp.mean(z**4, axis=-1), 0.0)


def hidden_state_sums(hidden_lbtd: jax.Array, segment_ids_bt: jax.Array | None = None) -> Sums:
  """Kurtosis and max |activation| sums of block outputs, first tokens vs the rest.

  Args:
    hidden_lbtd: ``[L, B, T, D]`` block outputs (residual stream after each block).
    segment_ids_bt: optional ``[B, T]`` document ids; "first" = a document's first token.

  Returns:
    ``kurt_first`` / ``kurt_rest`` ``[L]`` (summed per-token kurtosis), ``n_first`` / ``n_rest``
    (token counts, scalars), ``max_first`` / ``max_rest`` ``[L]`` (max |x|) and
    ``max_chan_first`` / ``max_chan_rest`` ``[L, D]`` (max |x| per channel).

  Example:
    >>> s = hidden_state_sums(jnp.ones((2, 1, 3, 8)))
    >>> float(s["n_first"]), float(s["n_rest"])
    (1.0, 2.0)
  """
  _, b, t, _ = hidden_lbtd.shape
  _, is_first_bt, valid_bt = document_layout(segment_ids_bt, b, t)
  first_bt = is_first_bt.astype(jnp.float32)
  rest_bt = (valid_bt & ~is_first_bt).astype(jnp.float32)
  kurt_lbt = token_kurtosis(hidden_lbtd)
  abs_lbtd = jnp.abs(hidden_lbtd.astype(jnp.float32))

  def chan_max(w_bt):
    return jnp.max(jnp.where(w_bt[None, :, :, None] > 0, abs_lbtd, 0.0), axis=(1, 2))

  max_chan_first, max_chan_rest = chan_max(first_bt), chan_max(rest_bt)
  return {
      "kurt_first": jnp.sum(kurt_lbt * first_bt[None], axis=(1, 2)),
      "kurt_rest": jnp.sum(kurt_lbt * rest_bt[None], axis=(1, 2)),
      "n_first": jnp.sum(first_bt),
      "n_rest": jnp.sum(rest_bt),
      "max_first": jnp.max(max_chan_first, axis=-1),
      "max_rest": jnp.max(max_chan_rest, axis=-1),
      "max_chan_first": max_chan_first,
      "max_chan_rest": max_chan_rest,
  }


def nll_sums(
    logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array | None = None
) -> Sums:
  """Summed next-token negative log-likelihood (ordinary softmax over the vocabulary).

  Args:
    logits_btv: ``[B, T, V]``.
    targets_bt: ``[B, T]`` int target ids.
    weights_bt: optional ``[B, T]`` target weights (0 = ignore); all ones by default.

  Returns:
    ``nll`` (weighted sum) and ``nll_weight`` (sum of weights), scalars.

  Example:
    >>> s = nll_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))
    >>> float(jnp.exp(s["nll"] / s["nll_weight"]))  # uniform over 4 tokens
    4.0...
  """
  if weights_bt is None:
    weights_bt = jnp.ones(targets_bt.shape, jnp.float32)
  nll, weight = weighted_cross_entropy(logits_btv, targets_bt, weights_bt)
  return {"nll": nll, "nll_weight": weight}


def combine_sums(a: Sums, b: Sums) -> Sums:
  """Adds two batches' sums (maximum for the ``max_*`` entries).

  Example:
    >>> c = combine_sums({"n_rest": 1.0, "max_rest": 2.0}, {"n_rest": 2.0, "max_rest": 1.0})
    >>> float(c["n_rest"]), float(c["max_rest"])
    (3.0, 2.0)
  """
  if set(a) != set(b):
    raise ValueError(f"cannot combine sums with different entries: {sorted(a)} vs {sorted(b)}.")
  return {k: (jnp.maximum if k.startswith("max_") else jnp.add)(a[k], b[k]) for k in a}
