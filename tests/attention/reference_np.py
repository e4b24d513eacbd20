"""An independent float64 numpy attention, the ground truth for every attention implementation."""

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


def np_attention(q, k, v, *, softmax="softmax1", is_causal=False, mask=None, segment_ids=None,
                 scale=None):
  """``q [B, T, N, H]``, ``k/v [B, S, K, H]`` -> ``(out [B, T, N, H], probs [B, N, T, S])`` in float64.

  Loops over heads so that the grouped-query mapping (head n reads kv head n // (N // K)) is
  written out independently of the einsum reshapes in the package.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  allowed = np_allowed(b, n, t, s, is_causal=is_causal, segment_ids=segment_ids, mask=mask)
  out = np.zeros((b, t, n, h))
  probs = np.zeros((b, n, t, s))
  for bi in range(b):
    for ni in range(n):
      kv = ni // (n // kh)
      logits = q[bi, :, ni] @ k[bi, :, kv].T * scale
      logits = np.where(allowed[bi, ni], logits, -np.inf)
      if softmax == "softmax1":
        logits = np.concatenate([np.zeros((t, 1)), logits], axis=1)
      row_max = logits.max(axis=1, keepdims=True)
      row_max = np.where(np.isfinite(row_max), row_max, 0.0)
      e = np.exp(logits - row_max)
      denom = e.sum(axis=1, keepdims=True)
      p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
      if softmax == "softmax1":
        p = p[:, 1:]
      probs[bi, ni] = p
      out[bi, :, ni] = p @ v[bi, :, kv]
  return out, probs
