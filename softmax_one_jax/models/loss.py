"""The language-model loss: weighted next-token cross-entropy (training and evaluation share it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec

from softmax_one_jax.sharding import current_mesh, spec_in_context, target_platform


def _target_logit(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """``logits[..., target]``: each token's logit of its target, ``[B, T]``."""
  return jnp.take_along_axis(logits_btv, targets_bt[..., None].astype(jnp.int32), -1)[..., 0]


def _token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """Per-token negative log-likelihoods ``logsumexp(logits) - logits[target]``, ``[B, T]``."""
  return jax.nn.logsumexp(logits_btv, axis=-1) - _target_logit(logits_btv, targets_bt)


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
  nll_bt = _token_nll(logits_btv.astype(jnp.float32), targets_bt)
  w_bt = weights_bt.astype(jnp.float32)
  return jnp.sum(nll_bt * w_bt), jnp.sum(w_bt)


# The largest chunk of logits per device, in elements (64 MiB of float32). Chunks must stay
# large for matmul efficiency (measured on CPU: 16-token chunks of a 50257-word vocabulary ran
# the head 2.5x slower than unchunked; 256-token chunks matched it); the point of chunking is the
# memory of the full [B, T, V] logits and their gradient at scale.
_CHUNK_LOGITS_PER_DEVICE = 1 << 24
# On CPU, an unembedding that fits in cache is read again by every chunk for free, so smaller
# chunks pay off: ~2 MiB of float32 logits (at least 128 rows for the matmuls) stay in cache
# between the three matmuls and the softmax. Measured on the tiny train step (2-core EPYC VM,
# 4096 x 128 unembedding): 143 ms with one [2048, 4096] chunk, 132 ms with 512 rows, 130 ms
# with 128 rows, 135 ms with 64. A larger unembedding streams from memory once per chunk, so
# there chunks are as large as host memory comfortably allows, 256 MiB of logits (gpt2-60m's
# step: 1024 rows 4% faster than 256).
_CPU_CACHE_BYTES = 8 << 20
_CPU_CHUNK_LOGITS = 1 << 19
_CPU_MIN_CHUNK_ROWS = 128
_CPU_CHUNK_LOGITS_PER_DEVICE = 1 << 26


def sequence_chunk(batch: int, seq: int, vocab: int, max_logits: int | None = None, *,
                   width: int | None = None, backend: str | None = None) -> int:
  """The largest divisor ``c`` of ``seq`` with ``batch * c * vocab <= max_logits`` (at least 1).

  ``max_logits`` defaults to 2^24 elements per device (the devices of the mesh in context, else
  ``jax.device_count()``: the batch axis is sharded over the devices). On the CPU backend the default depends on the
  ``[vocab, width]`` float32 unembedding: when it fits in 8 MiB of cache, ~2^19 logits per
  device and at least 128 rows (``batch * c`` per device); otherwise 2^26 per device.

  Example:
    >>> sequence_chunk(4, 256, 50257, max_logits=1 << 24)
    64
    >>> sequence_chunk(16, 128, 4096, width=128, backend="cpu")   # 128 rows of 4096 logits
    8
  """
  if max_logits is None:
    mesh = current_mesh()
    devices = jax.device_count() if mesh is None else mesh.size
    max_logits = _CHUNK_LOGITS_PER_DEVICE * devices
    if (backend or target_platform()) == "cpu":
      if width and 4 * vocab * width <= _CPU_CACHE_BYTES:
        rows = max(_CPU_CHUNK_LOGITS // vocab, _CPU_MIN_CHUNK_ROWS)
        max_logits = rows * vocab * devices
      else:
        max_logits = _CPU_CHUNK_LOGITS_PER_DEVICE * devices
  best = 1
  for c in range(1, seq + 1):
    if seq % c == 0 and batch * c * vocab <= max_logits:
      best = c
  return best


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """``[B, T, ...] -> [T / c, B, c, ...]``: sequence chunks, the batch axis kept whole (sharded)."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape((b, t // c, c) + x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
  """Inverse of ``_chunks``: ``[T / c, B, c, ...] -> [B, T, ...]``."""
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _chunk_logits(x_bcd: jax.Array, unembed_vd: jax.Array) -> jax.Array:
  return jnp.einsum("bcd,vd->bcv", x_bcd, unembed_vd, preferred_element_type=jnp.float32)


def _chunked_inputs(x_btd, targets_bt, weights_bt, chunk):
  """The scan's ``(x, targets, float32 weights)`` sequence chunks, and the sum of weights."""
  w_bt = weights_bt.astype(jnp.float32)
  return (_chunks(x_btd, chunk), _chunks(targets_bt, chunk), _chunks(w_bt, chunk)), jnp.sum(w_bt)


def _linear_ce_sums(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  """Forward only: the loss sums, one chunk of logits at a time."""
  def body(loss_sum, xs):
    x_bcd, t_bc, w_bc = xs
    nll_bc = _token_nll(_chunk_logits(x_bcd, unembed_vd), t_bc)
    return loss_sum + jnp.sum(nll_bc * w_bc), None

  xs, weight_sum = _chunked_inputs(x_btd, targets_bt, weights_bt, chunk)
  loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return loss_sum, weight_sum


def _linear_ce_sums_and_grads(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  """The loss sums and d(loss_sum)/d(x, unembed, weights), one chunk of logits at a time."""
  def body(carry, xs):
    loss_sum, g_unembed_dv = carry
    x_bcd, t_bc, w_bc = xs
    logits_bcv = _chunk_logits(x_bcd, unembed_vd)
    # One exp per logit serves the loss and its gradient: with m the row maximum,
    # lse = m + log(sum exp(l - m)) and d nll / d logits = exp(l - m) / sum - onehot(target).
    m_bc = jnp.max(logits_bcv, axis=-1)
    exp_bcv = jnp.exp(logits_bcv - m_bc[..., None])
    sum_bc = jnp.sum(exp_bcv, axis=-1)
    nll_bc = m_bc + jnp.log(sum_bc) - _target_logit(logits_bcv, t_bc)
    onehot_bcv = jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32) == t_bc[..., None]
    g_logits_bcv = (exp_bcv * (1.0 / sum_bc)[..., None] - onehot_bcv) * w_bc[..., None]
    g_logits_bcv = g_logits_bcv.astype(x_bcd.dtype)
    g_x_bcd = jnp.einsum("bcv,vd->bcd", g_logits_bcv, unembed_vd,
                         preferred_element_type=jnp.float32).astype(x_bcd.dtype)
    # Accumulated as [D, V]: both operands then contract their leading (token) axis, which
    # matmul libraries read in place; a [V, D] result would transpose the [c, V] chunk first.
    g_unembed_dv = g_unembed_dv + jnp.einsum("bcd,bcv->dv", x_bcd, g_logits_bcv,
                                             preferred_element_type=jnp.float32)
    return (loss_sum + jnp.sum(nll_bc * w_bc), g_unembed_dv), (g_x_bcd, nll_bc)

  xs, weight_sum = _chunked_inputs(x_btd, targets_bt, weights_bt, chunk)
  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_vd.shape[::-1], jnp.float32))
  (loss_sum, g_unembed_dv), (g_x, nll) = jax.lax.scan(body, init, xs)
  grads = (_unchunk(g_x), g_unembed_dv.T.astype(unembed_vd.dtype), _unchunk(nll))
  return (loss_sum, weight_sum), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_ce(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  return _linear_ce_sums(x_btd, unembed_vd, targets_bt, weights_bt, chunk)


def _linear_ce_fwd(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  sums, grads = _linear_ce_sums_and_grads(x_btd, unembed_vd, targets_bt, weights_bt, chunk)
  return sums, (grads, targets_bt, weights_bt)


def _linear_ce_bwd(chunk, residuals, cotangents):
  del chunk
  (g_x_btd, g_unembed_vd, nll_bt), targets_bt, weights_bt = residuals
  ct_loss, ct_weight = cotangents
  g_weights_bt = (ct_loss * nll_bt + ct_weight).astype(weights_bt.dtype)
  g_targets = np.zeros(targets_bt.shape, jax.dtypes.float0)
  return ((ct_loss * g_x_btd).astype(g_x_btd.dtype),
          (ct_loss * g_unembed_vd).astype(g_unembed_vd.dtype), g_targets, g_weights_bt)


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def linear_cross_entropy(x_btd: jax.Array, unembed_vd: jax.Array, targets_bt: jax.Array,
                         weights_bt: jax.Array, *, chunk: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """``weighted_cross_entropy(x @ unembed^T, targets, weights)`` without the ``[B, T, V]`` logits.

  The LM head and the loss, fused: logits are made a sequence chunk at a time (``[B, c, V]``,
  by default at most 64 MiB per accelerator, cache-sized or up to 256 MiB on CPU: see
  ``sequence_chunk``) and, under differentiation, the gradients with respect to ``x`` and the
  unembedding are computed in the same pass from the chunk while it is in cache (a custom
  VJP), so the full logits, their softmax and their gradient never exist. Matmuls run in the
  inputs' dtype with float32 accumulation; the batch axis is never split (it may be sharded).

  Args:
    x_btd: ``[B, T, D]`` final (normalised) hidden states.
    unembed_vd: ``[V, D]`` output embedding (the tied token embedding, or the head's kernel
      transposed).
    targets_bt: ``[B, T]`` int next tokens.
    weights_bt: ``[B, T]`` float weights (0 = ignore).
    chunk: sequence positions per chunk (a divisor of ``T``); default ``sequence_chunk``.

  Returns:
    ``(loss_sum, weight_sum)``, float32 scalars, as ``weighted_cross_entropy``.

  Example:
    >>> x, w = jnp.ones((2, 8, 4)), jnp.ones((16, 4))
    >>> s, n = linear_cross_entropy(x, w, jnp.zeros((2, 8), int), jnp.ones((2, 8)))
    >>> float(s / n)   # log(16)
    2.772...
  """
  b, t, d = x_btd.shape
  if unembed_vd.ndim != 2 or unembed_vd.shape[1] != d:
    raise ValueError(f"unembed_vd must be [V, D={d}]; got {unembed_vd.shape}.")
  if targets_bt.shape != (b, t) or weights_bt.shape != (b, t):
    raise ValueError(f"targets and weights must be [B, T] = {(b, t)}; got {targets_bt.shape} "
                     f"and {weights_bt.shape}.")
  chunk = chunk or sequence_chunk(b, t, unembed_vd.shape[0], width=d)
  if t % chunk:
    raise ValueError(f"chunk={chunk} must divide the sequence length {t}.")
  return _per_batch_shard(functools.partial(_linear_ce, chunk=chunk), x_btd, unembed_vd,
                          targets_bt, weights_bt)


def _per_batch_shard(loss_fn, x_btd, unembed_vd, targets_bt, weights_bt):
  """``loss_fn`` run once per batch shard under the mesh in context, its sums added across shards.

  Each device then reads the whole unembedding once and accumulates its gradient locally over
  the sequence chunks; one reduction follows. Left to XLA's partitioner, the scan over chunks
  would gather the FSDP-sharded unembedding and all-reduce its gradient at every chunk.
  """
  spec = spec_in_context(("batch",), x_btd.shape[:1])
  batch_axes = None if spec is None or not tuple(spec) else tuple(spec)[0]
  if batch_axes is None:
    return loss_fn(x_btd, unembed_vd, targets_bt, weights_bt)

  def local(x_btd, unembed_vd, targets_bt, weights_bt):
    loss_sum, weight_sum = loss_fn(x_btd, unembed_vd, targets_bt, weights_bt)
    return jax.lax.psum(loss_sum, batch_axes), jax.lax.psum(weight_sum, batch_axes)

  rows = PartitionSpec(batch_axes)
  return jax.shard_map(local, mesh=current_mesh(), in_specs=(rows, PartitionSpec(), rows, rows),
                       out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)(
                           x_btd, unembed_vd, targets_bt, weights_bt)
