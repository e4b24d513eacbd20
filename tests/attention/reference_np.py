"""An independent float64 numpy attention, the ground truth for every attention implementation.

The null key of softmax-1 (logit 0) and of learned sinks (logit ``sinks[n]`` per query head) is
written out as an explicit extra column with value 0, never as an offset of a running state.
"""

import numpy as np


def np_allowed(b, n, t, s, *, is_causal=False, segment_ids=None, mask=None):
  """Boolean ``[B, N, T, S]``: True where query t may attend to key s."""
  allowed = np.ones((b, n, t, s), bool)
  if is_causal:
    allowed &= np.tril(np.ones((t, s), bool))
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    allowed &= (np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :])[:, None]
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask, bool), allowed.shape)
  return allowed


def np_null_logits(softmax, n, sinks=None):
  """The null key's logit per query head ``[N]`` float64, or None for plain softmax."""
  if softmax == "softmax":
    return None
  if softmax == "softmax1":
    return np.zeros(n)
  assert softmax == "learned_sink" and sinks is not None
  return np.asarray(sinks, np.float64).reshape(n)


def random_sinks(rng, n):
  """``[N]`` float32 sink logits: one large positive, one very negative, the rest N(0, 2^2).

  With N(0, 1)-sized logits, a sink of +6 takes almost all of a row and -30 almost none.
  """
  sinks = rng.standard_normal(n) * 2.0
  sinks[0] = 6.0 + rng.random()
  if n > 1:
    sinks[-1] = -30.0 - rng.random()
  return sinks.astype(np.float32)


def np_attention_parts(q, k, v, *, softmax="softmax1", is_causal=False, mask=None,
                       segment_ids=None, scale=None, sinks=None):
  """``(out [B, T, N, H], probs [B, N, T, S], null [B, N, T])`` in float64.

  ``null`` is the null key's probability (zeros for plain softmax). Loops over heads so that the
  grouped-query mapping (head n reads kv head n // (N // K)) is written out independently of the
  einsum reshapes in the package.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  allowed = np_allowed(b, n, t, s, is_causal=is_causal, segment_ids=segment_ids, mask=mask)
  null_logits = np_null_logits(softmax, n, sinks)
  out = np.zeros((b, t, n, h))
  probs = np.zeros((b, n, t, s))
  null = np.zeros((b, n, t))
  for bi in range(b):
    for ni in range(n):
      kv = ni // (n // kh)
      logits = q[bi, :, ni] @ k[bi, :, kv].T * scale
      logits = np.where(allowed[bi, ni], logits, -np.inf)
      if null_logits is not None:  # the null key as column 0
        logits = np.concatenate([np.full((t, 1), null_logits[ni]), logits], axis=1)
      row_max = logits.max(axis=1, keepdims=True)
      row_max = np.where(np.isfinite(row_max), row_max, 0.0)
      e = np.exp(logits - row_max)
      denom = e.sum(axis=1, keepdims=True)
      p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
      if null_logits is not None:
        null[bi, ni], p = p[:, 0], p[:, 1:]
      probs[bi, ni] = p
      out[bi, :, ni] = p @ v[bi, :, kv]
  return out, probs, null


def np_attention(q, k, v, **kwargs):
  """``q [B, T, N, H]``, ``k/v [B, S, K, H]`` -> float64 ``(out [B, T, N, H], probs [B, N, T, S])``.

  Keyword arguments as ``np_attention_parts`` (``softmax``, ``is_causal``, ``mask``,
  ``segment_ids``, ``scale``, ``sinks``).
  """
  out, probs, _ = np_attention_parts(q, k, v, **kwargs)
  return out, probs


def np_attention_grads(q, k, v, w, *, scale=None, **kwargs):
  """float64 ``(out, dq, dk, dv)`` of ``sum(w * attention(q, k, v))``, written out per head;
  ``(out, dq, dk, dv, dsinks)`` for ``softmax="learned_sink"``.

  Every kind shares the Jacobian ``dS = P * (dP - rowsum(P * dP))``: the null key's value is
  zero, so its column of ``dP`` is zero and drops out. The null logit ``c`` moves the
  log-normaliser by ``p_null dc``, so ``out_t`` moves by ``-p_null * out_t dc`` and
  ``dc_n = -sum_{b,t} p_null[b,n,t] * <w[b,t,n], out[b,t,n]>``.
  """
  q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
  scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
  out, probs, null = np_attention_parts(q, k, v, scale=scale, **kwargs)
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  n, kh = q.shape[2], k.shape[2]
  for bi in range(q.shape[0]):
    for ni in range(n):
      kv = ni // (n // kh)
      p = probs[bi, ni]
      dv[bi, :, kv] += p.T @ w[bi, :, ni]
      dp = w[bi, :, ni] @ v[bi, :, kv].T
      ds = p * (dp - np.sum(p * dp, axis=1, keepdims=True))
      dq[bi, :, ni] = ds @ k[bi, :, kv] * scale
      dk[bi, :, kv] += ds.T @ q[bi, :, ni] * scale
  if kwargs.get("softmax") != "learned_sink":
    return out, dq, dk, dv
  w_dot_out_bnt = np.einsum("btnh,btnh->bnt", w, out)
  dsinks = -np.sum(null * w_dot_out_bnt, axis=(0, 2))
  return out, dq, dk, dv, dsinks


def sink_grad_atol(w, out, rel=2e-6):
  """Absolute tolerance for float32 sink gradients: ``rel`` times a bound on the sizes of the
  summed terms, ``max_n sum_{b,t} |w| |out|`` (the gradient itself may cancel to near zero)."""
  w, out = np.asarray(w, np.float64), np.asarray(out, np.float64)
  return rel * float(np.max(np.sum(np.linalg.norm(w, axis=-1) * np.linalg.norm(out, axis=-1),
                                   axis=(0, 1))))


def np_logits(q, k, *, is_causal=False, segment_ids=None, mask=None, scale=None):
  """float64 ``[B, N, T, S]`` logits with ``-inf`` where masked, written out per head."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  allowed = np_allowed(b, n, t, s, is_causal=is_causal, segment_ids=segment_ids, mask=mask)
  logits = np.stack([np.einsum("bth,bsh->bts", q[:, :, ni], k[:, :, ni // (n // kh)]) * scale
                     for ni in range(n)], axis=1)
  return np.where(allowed, logits, -np.inf)


def np_first_visible(logits):
  """``(first_pos, seen)``, each ``[B, N, T]``: per row of ``[B, N, T, S]`` logits (``-inf`` where
  masked) the index of the first visible key (0 where none is visible) and whether any is."""
  visible = np.isfinite(logits)
  return np.argmax(visible, axis=-1), visible.any(axis=-1)


def np_first_and_rest(logits):
  """``(first, rest_max)``, each ``[B, N, T]``: the first visible key's logit and the largest
  logit of the other visible keys (``-inf`` where there is none)."""
  pos, seen = np_first_visible(logits)
  first = np.where(seen, np.take_along_axis(logits, pos[..., None], -1)[..., 0], -np.inf)
  others = logits.copy()
  np.put_along_axis(others, pos[..., None], -np.inf, axis=-1)
  return first, others.max(axis=-1)


def np_first_token(q, k, *, softmax="softmax1", sinks=None, **kwargs):
  """float64 first-token statistics ``(argmax_first, prob_first, null_mass)``, each ``[B, N, T]``.

  "First" is the query's first visible key: the visible key of smallest index (with causal
  attention and segment ids the first token of the query's document; key 0 without them).
  ``argmax_first``: the query sees a key and the first one's logit is >= every visible logit
  (ties go to it); the null key is not a key. ``prob_first`` is 0 for a query that sees no key;
  ``null_mass`` is zeros for plain softmax. Keyword arguments as ``np_attention_parts``
  (``is_causal``, ``mask``, ``segment_ids``, ``scale``).
  """
  logits = np_logits(q, k, **kwargs)
  first, rest = np_first_and_rest(logits)
  argmax_first = np.isfinite(first) & (first >= rest)
  _, probs, null = np_attention_parts(q, k, np.zeros_like(k), softmax=softmax, sinks=sinks,
                                      **kwargs)
  pos, _ = np_first_visible(logits)
  return argmax_first, np.take_along_axis(probs, pos[..., None], -1)[..., 0], null


def np_decidable(q, k, **kwargs):
  """``[B, N, T]`` bool: rows whose first-token answer float32 arithmetic cannot get wrong.

  A float32 dot product of length ``H`` is within ``H * eps * sum_h |q_h k_h|`` of the exact one,
  so the first visible key's logit and the best other key's can swap only if their float64
  margin is below twice that (times ``|scale|``). Rows with no visible key or no other visible
  key are decidable. Keyword arguments as ``np_logits``.
  """
  h = q.shape[-1]
  eps = np.finfo(np.float32).eps
  logits = np_logits(q, k, **kwargs)
  size = np_logits(np.abs(q), np.abs(k), **{**kwargs, "scale": 1.0})
  scale = abs(kwargs.get("scale") or 1.0 / np.sqrt(h))
  bound = 2 * h * eps * scale * np.where(np.isfinite(size), size, 0.0).max(axis=-1)
  with np.errstate(invalid="ignore"):
    margin = np.subtract(*np_first_and_rest(logits))
  return ~np.isfinite(margin) | (np.abs(margin) > bound)


# One float32 ulp of a score in [8, 16) is 2^-20 = STEP * STEP: a product of two powers of two,
# exact in bfloat16 inputs and in any float32 accumulation order next to integer terms. Each
# document's first key scores 14: in float32, 14 and 14 + 2^-20 both times 0.25 * log2(e) (the
# Pallas kernel's log2 units at the scale of head_dim 16) round to the same number, so a
# decision taken after that scaling turns a one-ulp loss of the first key into a false tie.
STEP = 2.0**-10
KEY0_SCORE = 14.0


def document_starts(segment_ids, b, s):
  """``[B, S]`` bool: key 0 and every key whose (key-side) segment id differs from the previous
  key's; None segment ids: key 0 only."""
  starts = np.zeros((b, s), bool)
  starts[:, 0] = True
  if segment_ids is not None:
    kv_ids = segment_ids[1] if isinstance(segment_ids, tuple) else segment_ids
    kv_ids = np.broadcast_to(np.asarray(kv_ids), (b, s))
    starts[:, 1:] = kv_ids[:, 1:] != kv_ids[:, :-1]
  return starts


def packed_segment_ids(rng, b, t, docs=4, padding=True):
  """``[B, T]`` int32 ids of ``docs`` packed documents per row (ids 1, 2, ..., lengths >= 2 at
  random), the last 0-3 tokens padding (id 0) with ``padding``."""
  ids = np.zeros((b, t), np.int32)
  for i in range(b):
    end = t - (rng.integers(0, 4) if padding else 0)
    cuts = np.sort(rng.choice(np.arange(2, end - 1, 2), size=docs - 1, replace=False))
    ids[i, :end] = np.searchsorted(cuts, np.arange(end), side="right") + 1
  return ids


def tie_case(rng, b=2, t=20, s=20, n=4, kh=2, h=16, segment_ids=None):
  """``q [B, T, N, H]``, ``k [B, S, K, H]`` float32 (exact in bfloat16) with exact ties and
  one-ulp near-ties between each document's first key and other keys, every dot product exact
  in float32.

  Every query is ``(1, e, r)`` with ``e`` in ``{-STEP, 0, STEP}`` and ``r`` in ``{-1, 0, 1}``
  (all zero for about a third of the queries); each document's first key (key 0, and with
  ``segment_ids`` every key that starts a run of ids, see ``document_starts``) is
  ``(14, 0, 0)``, so its score is exactly 14 for every query. Each other key is:

  * a rival ``(14, STEP, 0)``: score ``14 + e * STEP``, i.e. one float32 ulp above the first
    key (``e > 0``), tied with it (``e = 0``) or one ulp below (``e < 0``);
  * or ``(a, 0, u)`` with ``a`` in ``[0, 10]``, ``u`` in ``{-1, 0, 1}``: an integer score, at
    times above 14 or exactly 14, never above 10 for a query whose ``r`` is zero (there the
    first key and the rivals decide).

  Scores stay below 32: a power-of-two scale (``1/4`` for ``h = 16``) keeps the logits exact.
  """
  q = rng.integers(-1, 2, (b, t, n, h)).astype(np.float32)
  q[rng.random((b, t, n)) < 1 / 3] = 0.0
  q[..., 0] = 1.0
  q[..., 1] = rng.integers(-1, 2, (b, t, n)) * STEP
  k = rng.integers(-1, 2, (b, s, kh, h)).astype(np.float32)
  k[..., 0] = rng.integers(0, 11, (b, s, kh))
  k[..., 1] = 0.0
  key0 = np.zeros(h, np.float32)
  key0[0] = KEY0_SCORE
  rival = key0.copy()
  rival[1] = STEP
  k[rng.random((b, s, kh)) < 0.3] = rival
  k[document_starts(segment_ids, b, s)] = key0
  return q, k


def assert_ties_present(q, k, later_documents=False, **kwargs):
  """A ``tie_case`` draw holds exact ties and one-ulp near-ties on both sides (in float64)
  between a query's first visible key and its best other key, so a test cannot pass on
  clear-cut rows only. ``later_documents``: among queries whose first visible key is not key 0.
  Keyword arguments as ``np_logits``."""
  logits = np_logits(q, k, **kwargs)
  with np.errstate(invalid="ignore"):
    margin = np.subtract(*np_first_and_rest(logits))
  if later_documents:
    margin = np.where(np_first_visible(logits)[0] > 0, margin, np.nan)
  one_ulp = 2.0**-20 * abs(kwargs.get("scale") or 1.0 / np.sqrt(q.shape[-1])) * 1.01
  assert np.any(margin == 0), "no exact tie in the draw"
  assert np.any((margin < 0) & (margin > -one_ulp)), "no near-tie with the first key one ulp below"
  assert np.any((margin > 0) & (margin < one_ulp)), "no near-tie with the first key one ulp above"
