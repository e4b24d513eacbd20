"""First-token attention statistics in O(seq) memory: logsumexp, row max, the first key's logit.

The paper's diagnostics ask, per query, how much attention goes to the first token and whether
it is the argmax; for softmax-1 and learned sinks also how much goes nowhere (the null key). All
three follow from per-row numbers without any ``[T, S]`` probability matrix::

  prob_first   = exp(s_f - lse)       (lse includes the null key: softmax-1, learned sinks)
  argmax_first = s_f >= row_max       (row_max over the real, unmasked logits)
  null_mass    = exp(c_n - lse)       (the null key's share; c_n = 0 for softmax-1, the head's
                                       sink logit for learned sinks)

where ``s_f`` is query ``t``'s scaled logit on its *first visible key* ``f``: the key of smallest
index the query may attend to (``-inf`` if it sees none). With causal attention and packed
documents (``segment_ids``) that is the first token of the query's own document; without
segment ids it is key 0; with a dense ``mask`` (xla path) the first key the mask allows. The
null key is not a real key: ``argmax_first`` compares the first visible key with the other
keys only, for every kind.

Tie rule: the first visible key is the argmax iff its score is >= the score of every other key
the query may see, so ties go to it (``argmax``'s first-index rule); a query that sees no key
has no argmax. Every implementation decides it where it computes the row max, from the same
computed dot products ``q.k`` (times the sign of the scale, which is exact): the first visible
key's score is picked out of those products, never recomputed, and nothing multiplies by the
scale (or by ``log2(e)``) between the two compared scores, as that rounding could merge two
different scores into a false tie. "xla" takes the first visible column of each row of the
dense matrix; "chunked" keeps, in the scan's carry, the first visible column of the first chunk
in which the row sees a key; "pallas" does the same across key tiles inside the GPU forward
kernel (tiles are visited in ascending key order). Where the dot products are exact in float32
(small integers, powers of two), all three give float64's answer, ties and one-ulp near-ties
included; otherwise each decides on its own float32 products.

Example:
  >>> q = k = jnp.ones((1, 8, 2, 16))
  >>> stats = first_token_stats(q, k, is_causal=True)
  >>> sorted(stats)
  ['argmax_first', 'null_mass', 'prob_first']
  >>> bool(stats["argmax_first"].all())  # every score ties with key 0's: key 0 wins
  True
  >>> ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]])  # the second document starts at key 3
  >>> stats = first_token_stats(q, k, is_causal=True, segment_ids=ids)
  >>> bool(stats["argmax_first"].all())  # query 4 sees keys 3, 4: key 3 is its first key
  True
  >>> round(stats["prob_first"][0, 0, 4].item(), 4)  # e^4 / (1 + 2 e^4): softmax-1
  0.4955
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softmax_one_jax.attention import _padding
from softmax_one_jax.attention.per_shard import (AttentionSharding, run_per_shard,
                                                 split_segment_arrays)
from softmax_one_jax.attention.reference import (
    SegmentIds,
    attention_logits,
    check_shapes,
    combine_masks,
)
from softmax_one_jax.sharding import target_platform
from softmax_one_jax.softmax import resolve_sinks

STATS_IMPLEMENTATIONS = (None, "xla", "chunked", "pallas")


def _scores(dots, where, scale: float):
  """``(logits, d)``: ``scale * q.k`` and the decision scores ``sign(scale) * q.k`` (exact), both
  ``-inf`` where ``where`` (None = nothing masked) is False."""
  sign = _padding.scale_sign(scale)
  d = dots if sign == 1.0 else dots * sign
  logits = dots * scale
  if where is None:
    return logits, d
  return jnp.where(where, logits, -jnp.inf), jnp.where(where, d, -jnp.inf)


def _decide(top, first, scale: float):
  """``(row_max, first_logit, argmax_first)`` from the decision scores of one computation.

  Tie rule: the first visible key is the argmax iff its score is >= every visible key's
  (``first >= top``, ties to it), compared in the units of the dot products, before any scaling
  rounds them; ``first = -inf`` (nothing visible) is never the argmax.
  """
  size = abs(scale)
  to_logit = lambda d: jnp.where(jnp.isneginf(d), -jnp.inf, d * size)  # noqa: E731
  return to_logit(top), to_logit(first), ~jnp.isneginf(first) & (first >= top)


def _xla_stats(query, key, sinks, is_causal, segment_ids, mask, scale):
  """Dense reference: materialises the ``[B, N, T, S]`` logits. ``sinks``: ``[N]`` or None.

  Returns ``(lse, row_max, first_logit, argmax_first)``.
  """
  t, s = query.shape[1], key.shape[1]
  scale = _padding.resolve_scale(scale, query.shape[3])
  dots = attention_logits(query, key, 1.0)  # q.k once; logits and decision both read it
  where = combine_masks(t, s, is_causal=is_causal, mask=mask, segment_ids=segment_ids)
  if where is not None:
    where = jnp.broadcast_to(where, dots.shape)
  logits, d = _scores(dots, where, scale)
  lse = jax.nn.logsumexp(logits, axis=-1, where=where)  # -inf for a row with no key
  if sinks is not None:  # the null key joins the normaliser: log(exp(c) + sum_j exp(s_j))
    lse = jnp.logaddexp(sinks.astype(lse.dtype)[:, None], lse)
  # Each row's first allowed column, picked from the same decision scores as the row max.
  return (lse,) + _decide(*_padding.max_and_first(d, jnp.arange(s), s), scale)


def _chunked_stats(query, key, sinks, is_causal, segment_ids, scale, chunk: int = 512):
  """Online logsumexp over key chunks (``lax.scan``): ``[B, N, T, chunk]`` at a time.

  ``sinks`` (``[N]`` or None) seed the running state as a key seen first: ``m = c, total = 1``.
  The largest decision score and the first visible key's ride in the scan's carry: chunks come
  in ascending key order, so the first chunk in which a row sees any key holds its first
  visible key, and later chunks leave that score alone.
  Returns ``(lse, row_max, first_logit, argmax_first)``.
  """
  b, t, n, h = query.shape
  s = key.shape[1]
  scale = _padding.resolve_scale(scale, h)
  chunk = min(chunk, s)
  s_pad = _padding.round_up(s, chunk)
  ids = _padding.padded_segment_ids(segment_ids, b, t, s, t, s_pad)
  k_cbskh = jnp.moveaxis(
      _padding.pad_axis(key, 1, s_pad).reshape(b, s_pad // chunk, chunk, *key.shape[2:]), 1, 0)
  kv_ids_cbs = None if ids is None else jnp.moveaxis(ids[1].reshape(b, -1, chunk), 1, 0)
  t_pos = jnp.arange(t)[:, None]

  def step(carry, xs):
    m, total, top, first = carry
    c, k_bskh, kv_ids_bs = xs
    k_pos = c * chunk + jnp.arange(chunk)[None, :]
    where = (k_pos < s)[None, None]
    if is_causal:
      where = where & (t_pos >= k_pos)[None, None]
    if ids is not None:
      where = where & (ids[0][:, :, None] == kv_ids_bs[:, None, :])[:, None]
    dots = attention_logits(query, k_bskh, 1.0)
    logits, d = _scores(dots, jnp.broadcast_to(where, dots.shape), scale)
    chunk_top, chunk_first = _padding.max_and_first(d, k_pos, s_pad)
    # -inf until the row has seen a key (a visible score is finite): then it is kept.
    top, first = jnp.maximum(top, chunk_top), jnp.where(jnp.isneginf(first), chunk_first, first)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    total = total * jnp.exp(m - m_use) + jnp.sum(jnp.exp(logits - m_use[..., None]), axis=-1)
    return (m_new, total, top, first), None

  shape = (b, n, t)
  neg_inf = jnp.full(shape, -jnp.inf)
  init = ((neg_inf, jnp.zeros(shape)) if sinks is None else
          (jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], shape), jnp.ones(shape)))
  init += (neg_inf, neg_inf)
  xs = (jnp.arange(s_pad // chunk), k_cbskh,
        jnp.zeros((s_pad // chunk, b, chunk), jnp.int32) if kv_ids_cbs is None else kv_ids_cbs)
  (m, total, top, first), _ = jax.lax.scan(step, init, xs)
  lse = jnp.where(jnp.isneginf(m), 0.0, m) + jnp.log(total)
  return (lse,) + _decide(top, first, scale)


def _pick(implementation: str | None, mask) -> str:
  if implementation not in STATS_IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not known; expected one of "
                     f"{STATS_IMPLEMENTATIONS}.")
  if implementation is not None:
    return implementation
  if mask is not None:
    return "xla"
  # GPUs and TPUs: the scan, which XLA compiles anywhere ("pallas" is by name, like the kernel).
  return "chunked" if target_platform() in ("gpu", "tpu") else "xla"


def _stats(query, key, *, softmax, is_causal, segment_ids, mask, scale, implementation,
           interpret, sharding, sinks):
  """``(lse, row_max, first_logit, argmax_first)``, each ``[B, N, T]``, from one path."""
  check_shapes(query, key, key)
  sinks_n = resolve_sinks(softmax, sinks, (query.shape[2],))
  impl = _pick(implementation, mask)
  if mask is not None and impl != "xla":
    raise ValueError(f"implementation={impl!r} takes is_causal and segment_ids, not a dense "
                     "mask; pass implementation='xla' (or None) to use mask.")
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  sinks_n = None if sinks_n is None else jax.lax.stop_gradient(sinks_n)
  if impl == "xla":
    return _xla_stats(query, key, sinks_n, is_causal, segment_ids, mask, scale)
  if impl == "chunked":
    return _chunked_stats(query, key, sinks_n, is_causal, segment_ids, scale)
  from softmax_one_jax.attention import pallas_gpu  # pylint: disable=g-import-not-at-top
  ids, ids_kinds, rebuild_ids = split_segment_arrays(segment_ids)
  # Learned sinks travel as a per-head operand, split like the heads.
  sink_args, sink_kinds = ((), ()) if sinks is None else ((sinks_n,), ("n",))

  def local(q, k, *rest):
    return pallas_gpu.flash_stats(
        q, k, softmax=softmax, sinks=rest[0] if sink_args else None, is_causal=is_causal,
        segment_ids=rebuild_ids(rest[len(sink_args):]), scale=scale, interpret=interpret)

  return run_per_shard(local, sharding, (query, key, *sink_args, *ids),
                       ("btnh", "btnh", *sink_kinds, *ids_kinds), ("bnt",) * 4)


def attention_stats(
    query: jax.Array,
    key: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    segment_ids: SegmentIds | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    sharding: AttentionSharding | None = None,
    sinks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-query ``(lse, row_max, first_logit)``, each ``[B, N, T]`` float32.

  ``first_logit`` is the logit on the query's first visible key (the first token of its
  document under causal attention with ``segment_ids``; key 0 without them; see the module
  docstring). A finite ``first_logit >= row_max`` holds exactly where that key is the argmax by
  the tie rule of the module docstring, as decided inside the chosen implementation: where
  rounding the two scores to logits made a lower first-key score equal to the row max,
  ``first_logit`` is the float32 just below ``row_max`` (a change of one ulp, within that
  rounding).

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    softmax: "softmax1" (``lse`` includes the null key of logit 0), "softmax" or "learned_sink"
      (``lse`` includes the null key of logit ``sinks[n]``).
    is_causal, segment_ids, mask, scale: as in ``dot_product_attention``.
    implementation: "xla" (dense logits; supports ``mask``), "chunked" (scan over 512-key
      chunks, linear memory, any platform), "pallas" (the GPU flash kernel's forward without the
      value product); None picks chunked on GPU and TPU, xla elsewhere or with ``mask`` (the
      platform of the mesh in context, else JAX's default backend). The statistics never come
      from the attention forward (cuDNN's returns no logsumexp): they are their own pass over
      ``q`` and ``k``, whichever path computed the output.
    interpret: run the Pallas kernel in the interpreter (CPU tests).
    sharding: batch and head mesh axes: under a mesh the Pallas kernel runs once per shard.
    sinks: ``[N]`` sink logits for ``softmax="learned_sink"``, as in ``dot_product_attention``.

  Returns:
    ``lse``: log-normaliser (``-inf`` for a softmax row that sees no key); ``row_max``: largest
    unmasked logit (``-inf`` if none); ``first_logit``: logit on the query's first visible key
    (``-inf`` if it sees none).
    Not differentiated through (monitoring).

  Example:
    >>> lse, row_max, s0 = attention_stats(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)))
    >>> lse.shape
    (1, 2, 4)
  """
  lse, row_max, first, hit = _stats(
      query, key, softmax=softmax, is_causal=is_causal, segment_ids=segment_ids, mask=mask,
      scale=scale, implementation=implementation, interpret=interpret, sharding=sharding,
      sinks=sinks)
  below = jnp.minimum(first, jnp.nextafter(row_max, jnp.full_like(row_max, -jnp.inf)))
  return lse, row_max, jnp.where(hit, first, below)



def first_token_prob(first_logit: jax.Array, lse: jax.Array) -> jax.Array:
  """Attention probability on the first visible key: ``exp(first_logit - lse)``, in [0, 1].

  Args:
    first_logit: ``[..., T]`` the first visible key's logit per query; ``-inf`` where the query
      sees no key.
    lse: ``[..., T]`` the row's log-normaliser (including the null key of softmax-1 / sinks).

  Returns:
    float32 ``[..., T]``: 0 where no key is visible. ``first_logit <= lse`` exactly; in float32
    the two roundings may put it a hair above, so the result is clipped at 1.

  Example:
    >>> first_token_prob(jnp.array([0.0, -jnp.inf]), jnp.log(jnp.array([4.0, 1.0]))).tolist()
    [0.25, 0.0]
  """
  first = first_logit.astype(jnp.float32)
  seen = ~jnp.isneginf(first)
  log_p = jnp.minimum(jnp.where(seen, first - lse.astype(jnp.float32), 0.0), 0.0)
  return jnp.where(seen, jnp.exp(log_p), 0.0)

def first_token_stats(
    query: jax.Array,
    key: jax.Array,
    *,
    softmax: str = "softmax1",
    sinks: jax.Array | None = None,
    is_causal: bool = False,
    segment_ids: SegmentIds | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    sharding: AttentionSharding | None = None,
) -> dict[str, jax.Array]:
  """Attention on each query's first visible key without probabilities: each value ``[B, N, T]``.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``.
    softmax: "softmax1", "softmax" or "learned_sink" (needs ``sinks``).
    sinks: ``[N]`` sink logits for ``softmax="learned_sink"``.
    is_causal, segment_ids, mask, scale, implementation, interpret, sharding: as in
      :func:`attention_stats`.

  Returns:
    ``prob_first`` (float32, probability on the query's first visible key: the first token of
    its document under causal attention with ``segment_ids``, key 0 without them),
    ``argmax_first`` (bool, that key's score is >= every visible key's, ties to it, the null key
    not counted; False for a query that sees no key: the tie rule of the module docstring,
    decided where the row max is computed) and, for softmax-1 and learned sinks, ``null_mass``
    (float32, the null key's share ``exp(c_n - lse)``, ``1 - sum_j p_j``).

  Example:
    >>> stats = first_token_stats(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), softmax="softmax")
    >>> jnp.round(stats["prob_first"][0, 0], 4).tolist()
    [0.25, 0.25, 0.25, 0.25]
  """
  lse, _, first, hit = _stats(
      query, key, softmax=softmax, is_causal=is_causal, segment_ids=segment_ids, mask=mask,
      scale=scale, implementation=implementation, interpret=interpret, sharding=sharding,
      sinks=sinks)
  out = {"prob_first": first_token_prob(first, lse), "argmax_first": hit}
  sinks_n = resolve_sinks(softmax, sinks, (query.shape[2],))
  if sinks_n is not None:  # the null key's logit minus the log-normaliser (which includes it)
    sinks_n = jax.lax.stop_gradient(sinks_n).astype(lse.dtype)
    out["null_mass"] = jnp.exp(jnp.minimum(sinks_n[:, None] - lse, 0.0))
  return out
