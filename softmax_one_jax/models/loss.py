"""The language-model loss: weighted next-token cross-entropy (training and evaluation share it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Sum of per-token negative log-likelihoods times weights, and the sum of weights (float32).

  Ordinary softmax over the vocabulary (softmax-1 lives only inside attention).

  Args:
    logits_btv: [B, T, V] logits (any float dtype; computed in float32).
    targets_bt: [B, T] int next tokens.
    weights_bt: [B, T] float weights (0 = ignore).

  Returns:
    ``(loss_sum, weight_sum)``, float32 scalars; the mean loss is ``loss_sum / weight_sum``.

  Example:
    >>> s, w = weighted_cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), int), jnp.ones((1, 2)))
    >>> float(s / w)   # log(4)
    1.386...
  """
  logits_btv = logits_btv.astype(jnp.float32)
  target_logit_bt = jnp.take_along_axis(
      logits_btv, targets_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll_bt = jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt
  w_bt = weights_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * w_bt), jnp.sum(w_bt)
