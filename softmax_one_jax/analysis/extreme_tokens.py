"""Metrics of extreme tokens: how much the first token drains attention, values and the residual.

Definitions (``counted`` queries are real and not their document's first, see
``layout.counted_queries``; "first tokens" start a document, "other tokens" are the rest):

* **first_token_mass**: mean attention probability on the query's first token over (layer, head,
  counted query); optionally split by a boolean ``[B, T]`` mask of trigger query positions.
* **sink_rate**: share of (layer, head) whose mean first-token probability over counted queries
  exceeds ``epsilon = 0.3`` (Sink_1 of Gu et al. 2024, "When Attention Sink Emerges in Language
  Models", arXiv:2410.10781).
* **null_mass** (softmax-1 and learned sinks): mean share of the null key over the counted queries,
  so that first-token mass + null mass + mass on the other keys = 1 on the same queries.
* **value_drain_ratio** (per layer): mean norm of the first tokens' value states over the mean
  norm of the other tokens' value states (all key/value heads concatenated).
* **residual_peak_ratio** (per layer): mean norm of the first tokens' block outputs over the
  median norm of the other tokens' block outputs.
* **first_token_attention**: share of counted queries whose largest *real logit* is on the
  first token, ties going to the first token (the tie rule of ``softmax_one_jax.attention.stats``:
  the score of the query's first visible key >= every visible key's, decided where the row max
  is computed, the same on the xla, chunked and Pallas paths). Taken from logits, not
  probabilities: exp rounding can merge a near-tie, and a softmax-1 row whose probabilities all
  underflow to 0 is all ties.

The attention statistics of the model (``attention_stats``) are about each query's first visible
key, which under the model's causal, document-masked attention is the first token of the query's
document: every metric counts every document, whether read from ``attention_stats`` or from
``attention_probs`` (documents are runs of equal segment ids, as packed data yields them).

Example:
  >>> m = extreme_token_metrics(model, tokens_bt)                   # doctest: +SKIP
  >>> m["sink_rate"], m["value_drain_ratio_per_layer"]               # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from softmax_one_jax.analysis.layout import (attention_intermediates, counted_queries,
                                             document_layout, first_token_probs)
from softmax_one_jax.models.intermediates import with_intermediates

SINK_EPSILON = 0.3


def _masked_mean(x: jax.Array, w: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  """``sum(x * w) / sum(w)`` over ``axis`` (NaN where ``w`` sums to 0)."""
  w = jnp.broadcast_to(w, x.shape).astype(jnp.float32)
  num = jnp.sum(jnp.where(w > 0, x.astype(jnp.float32), 0.0) * w, axis=axis)
  den = jnp.sum(w, axis=axis)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def first_token_mass(
    prob_first_lbnt: jax.Array, counted_bt: jax.Array, trigger_bt: jax.Array | None = None
) -> dict[str, jax.Array]:
  """Mean probability on the first token over (layer, head, counted query).

  Args:
    prob_first_lbnt: ``[L, B, N, T]`` probability of each query on its first token.
    counted_bt: ``[B, T]`` bool, the queries to average over (``layout.counted_queries``).
    trigger_bt: optional ``[B, T]`` bool, trigger query positions.

  Returns:
    ``first_token_mass`` (scalar) and, with ``trigger_bt``, ``first_token_mass_trigger`` and
    ``first_token_mass_non_trigger`` (the same mean over counted trigger / other queries; NaN
    when a group is empty).

  Example:
    >>> p = jnp.array([0.0, 0.5, 0.1]).reshape(1, 1, 1, 3)
    >>> counted = jnp.array([[False, True, True]])
    >>> m = first_token_mass(p, counted, jnp.array([[False, True, False]]))
    >>> [round(float(m[k]), 3) for k in sorted(m)]
    [0.3, 0.1, 0.5]
  """
  if trigger_bt is not None and tuple(trigger_bt.shape) != tuple(counted_bt.shape):
    raise ValueError(f"trigger positions have shape {tuple(trigger_bt.shape)}; expected the "
                     f"tokens' [B, T] = {tuple(counted_bt.shape)}: pass one flag per token.")
  axes = (0, 1, 2, 3)
  out = {"first_token_mass": _masked_mean(prob_first_lbnt, counted_bt[None, :, None], axes)}
  if trigger_bt is not None:
    trigger_bt = jnp.asarray(trigger_bt, bool)
    for name, group_bt in (("trigger", trigger_bt), ("non_trigger", ~trigger_bt)):
      w_bt = counted_bt & group_bt
      out[f"first_token_mass_{name}"] = _masked_mean(prob_first_lbnt, w_bt[None, :, None], axes)
  return out


def head_first_token_mass(prob_first_lbnt: jax.Array, counted_bt: jax.Array) -> jax.Array:
  """Per (layer, head) mean probability on the first token over the counted queries.

  Args:
    prob_first_lbnt: ``[L, B, N, T]``.
    counted_bt: ``[B, T]`` bool.

  Returns:
    ``[L, N]`` float32 (NaN when no query is counted).

  Example:
    >>> p = jnp.array([1.0, 0.2, 0.4]).reshape(1, 1, 1, 3)
    >>> round(float(head_first_token_mass(p, jnp.array([[False, True, True]]))[0, 0]), 3)
    0.3
  """
  return _masked_mean(prob_first_lbnt, counted_bt[None, :, None], (1, 3))


def sink_rate(head_mass_ln: jax.Array, epsilon: float = SINK_EPSILON) -> jax.Array:
  """Per layer, the share of heads whose mean first-token probability exceeds ``epsilon``.

  The mean over layers is Sink_1^epsilon of Gu et al. 2024 (every layer has the same number of
  heads, so it is also the share of all (layer, head) pairs).

  Args:
    head_mass_ln: ``[L, N]`` from ``head_first_token_mass``.
    epsilon: threshold (strictly exceeded).

  Returns:
    ``[L]`` float32 in ``[0, 1]``.

  Example:
    >>> sink_rate(jnp.array([[0.29, 0.31], [0.9, 0.1]])).tolist()
    [0.5, 0.5]
  """
  return jnp.mean((head_mass_ln > epsilon).astype(jnp.float32), axis=-1)


def null_mass(null_mass_lbnt: jax.Array, counted_bt: jax.Array) -> jax.Array:
  """Mean share of the null key (softmax-1's zero logit, or a learned sink) over (layer, head,
  counted query).

  Args:
    null_mass_lbnt: ``[L, B, N, T]`` ``1 - sum_j p_j`` of each query row.
    counted_bt: ``[B, T]`` bool.

  Returns:
    Scalar float32.

  Example:
    >>> float(null_mass(jnp.array([1.0, 0.25, 0.75]).reshape(1, 1, 1, 3),
    ...                 jnp.array([[False, True, True]])))
    0.5
  """
  return _masked_mean(null_mass_lbnt, counted_bt[None, :, None], (0, 1, 2, 3))


def first_token_argmax_share(argmax_first_lbnt: jax.Array, segment_ids_bt: jax.Array | None = None
                             ) -> jax.Array:
  """Share of counted queries whose largest real logit is on their document's first token.

  Nothing is decided here: the flags carry the tie rule of ``attention.stats`` (the query's
  first visible key's score >= every visible key's, ties to it).

  Args:
    argmax_first_lbnt: ``[L, B, N, T]`` bool from ``attention.first_token_stats`` of causal,
      document-masked attention (decided from the real logits where the row max is computed, so
      underflowing probabilities do not matter).
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding); every document's queries
      count except its first (``layout.counted_queries``).

  Returns:
    Scalar float32.

  Example:
    >>> float(first_token_argmax_share(jnp.array([True, False, True]).reshape(1, 1, 1, 3)))
    0.5
  """
  _, b, _, t = argmax_first_lbnt.shape
  _, counted_bt = counted_queries(segment_ids_bt, b, t)
  return _masked_mean(argmax_first_lbnt.astype(jnp.float32), counted_bt[None, :, None],
                      (0, 1, 2, 3))


def _first_vs_rest_norms(x_lbtf: jax.Array, segment_ids_bt: jax.Array | None):
  _, b, t, _ = x_lbtf.shape
  _, is_first_bt, valid_bt = document_layout(segment_ids_bt, b, t)
  norm_lbt = jnp.linalg.norm(x_lbtf.astype(jnp.float32), axis=-1)
  first = _masked_mean(norm_lbt, is_first_bt[None], (1, 2))
  return norm_lbt, first, valid_bt & ~is_first_bt


def value_drain_ratio(values_lbtf: jax.Array, segment_ids_bt: jax.Array | None = None
                      ) -> jax.Array:
  """Per layer, mean value-state norm of first tokens over that of the other tokens.

  Args:
    values_lbtf: ``[L, B, T, F]`` value states (``F`` = key/value heads x head dim).
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).

  Returns:
    ``[L]`` float32 (small: the first token's value is drained).

  Example:
    >>> v = jnp.array([[1.0, 0.0], [3.0, 4.0], [0.0, 5.0]])[None, None]
    >>> [round(r, 3) for r in value_drain_ratio(v).tolist()]  # 1 / mean(5, 5)
    [0.2]
  """
  norm_lbt, first_l, rest_bt = _first_vs_rest_norms(values_lbtf, segment_ids_bt)
  return first_l / _masked_mean(norm_lbt, rest_bt[None], (1, 2))


def residual_peak_ratio(hidden_lbtd: jax.Array, segment_ids_bt: jax.Array | None = None
                        ) -> jax.Array:
  """Per layer, mean block-output norm of first tokens over the median norm of the others.

  Args:
    hidden_lbtd: ``[L, B, T, D]`` block outputs.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).

  Returns:
    ``[L]`` float32 (large: a massive activation on the first token).

  Example:
    >>> h = jnp.array([[30.0, 40.0], [1.0, 0.0], [2.0, 0.0], [100.0, 0.0]])[None, None]
    >>> residual_peak_ratio(h).tolist()
    [25.0]
  """
  norm_lbt, first_l, rest_bt = _first_vs_rest_norms(hidden_lbtd, segment_ids_bt)
  rest_lbt = jnp.where(rest_bt[None], norm_lbt, jnp.nan)
  return first_l / jnp.nanmedian(rest_lbt.reshape(rest_lbt.shape[0], -1), axis=-1)


def extreme_token_arrays(
    model: nnx.Module,
    tokens_bt: jax.Array,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    trigger_bt: jax.Array | None = None,
    attention: str = "probs",
) -> dict[str, jax.Array]:
  """All extreme-token metrics of one batch as arrays (one forward pass; jit-friendly).

  Args: as ``extreme_token_metrics``.

  Returns:
    Scalars and ``[L]`` arrays (keys ending in ``_per_layer``).
  """
  wanted = attention_intermediates(attention) + ("values",)
  _, inter = with_intermediates(model, tokens_bt, wanted, segment_ids=segment_ids,
                                positions=positions)
  hidden = inter["hidden"]
  out: dict[str, jax.Array] = {}
  if attention != "none":
    st = inter["attention_stats"]
    _, counted_bt = counted_queries(segment_ids, *tokens_bt.shape)
    # Both sources give each query's probability on its document's first token.
    prob_first = (first_token_probs(inter["attention_probs"], segment_ids)
                  if attention == "probs" else st["prob_first"])
    out.update(first_token_mass(prob_first, counted_bt, trigger_bt))
    out["sink_rate_per_layer"] = sink_rate(head_first_token_mass(prob_first, counted_bt))
    out["first_token_attention"] = first_token_argmax_share(st["argmax_first"], segment_ids)
    if "null_mass" in st:
      out["null_mass"] = null_mass(st["null_mass"], counted_bt)
  out["value_drain_ratio_per_layer"] = value_drain_ratio(inter["values"], segment_ids)
  out["residual_peak_ratio_per_layer"] = residual_peak_ratio(hidden, segment_ids)
  for key in [k for k in out if k.endswith("_per_layer")]:
    out[key[:-len("_per_layer")]] = jnp.mean(out[key])
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _jitted_arrays(graphdef, state, tokens_bt, segment_ids, positions, trigger_bt, *, attention):
  model = nnx.merge(graphdef, state)
  return extreme_token_arrays(model, tokens_bt, segment_ids, positions, trigger_bt, attention)


def extreme_token_metrics(
    model: nnx.Module,
    tokens_bt: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    trigger_positions: jax.Array | None = None,
    attention: str = "probs",
) -> dict[str, Any]:
  """The extreme-token metrics of one batch: floats, and lists of floats for per-layer ones.

  Args:
    model: the Transformer.
    tokens_bt: ``[B, T]`` int tokens.
    segment_ids: optional ``[B, T]`` document ids (0 = padding).
    positions: optional ``[B, T]`` positions within each document.
    trigger_positions: optional ``[B, T]`` bool, trigger query positions (splits the mass).
    attention: "probs" (mass from ``attention_probs``), "stats" (mass from
      ``attention_stats``, no ``T x T`` array) or "none" (no attention metrics); the first-token
      share comes from the logit-decided flags of ``attention_stats`` on both, every document
      counted.

  Returns:
    ``first_token_mass`` (``_trigger`` / ``_non_trigger`` with triggers), ``sink_rate``,
    ``first_token_attention`` (from logits), ``null_mass`` (softmax-1, learned sinks),
    ``value_drain_ratio``, ``residual_peak_ratio`` (means over layers) and ``*_per_layer`` lists.

  Example:
    >>> m = extreme_token_metrics(model, jnp.zeros((2, 16), jnp.int32))   # doctest: +SKIP
    >>> m["sink_rate"], len(m["residual_peak_ratio_per_layer"])            # doctest: +SKIP
  """
  attention_intermediates(attention)  # an unknown source fails here, before anything compiles
  tokens_bt = jnp.asarray(tokens_bt)
  if trigger_positions is not None:
    trigger_positions = jnp.asarray(trigger_positions, bool)
    if trigger_positions.shape != tokens_bt.shape:
      raise ValueError(f"trigger_positions has shape {trigger_positions.shape}; expected the "
                       f"tokens' shape {tokens_bt.shape}: pass one flag per token.")
  opt = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
  graphdef, state = nnx.split(model)
  arrays = _jitted_arrays(graphdef, state, tokens_bt, opt(segment_ids), opt(positions),
                          trigger_positions, attention=attention)
  return {k: (jax.device_get(v).tolist() if k.endswith("_per_layer") else float(v))
          for k, v in arrays.items()}
