"""The language-model loss: weighted next-token cross-entropy (training and evaluation share it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from softmax_one_jax.sharding import current_mesh, spec_in_context


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


# The logits of one chunk, per device: 2^24 elements (64 MiB in float32). Large enough that the
# head's matmuls stay efficient (hundreds of rows per chunk at a 50k vocabulary), small beside any
# accelerator's or host's memory; the full [B, T, V] logits would grow with the sequence.
_CHUNK_LOGITS_PER_DEVICE = 1 << 24


def sequence_chunk(batch: int, seq: int, vocab: int, max_logits: int | None = None) -> int:
  """The largest divisor ``c`` of ``seq`` with ``batch * c * vocab <= max_logits`` (at least 1).

  ``max_logits`` defaults to 2^24 elements (64 MiB of float32) per device: times the devices of
  the mesh in context, else ``jax.device_count()``, since the batch axis is sharded over them.
  The same budget on every platform.

  Example:
    >>> sequence_chunk(4, 256, 50257, max_logits=1 << 24)
    64
  """
  if max_logits is None:
    mesh = current_mesh()
    devices = jax.device_count() if mesh is None else mesh.size
    max_logits = _CHUNK_LOGITS_PER_DEVICE * devices
  best = 1
  for c in range(1, seq + 1):
    if seq % c == 0 and batch * c * vocab <= max_logits:
      best = c
  return best


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """``[B, T, ...] -> [T / c, B, c, ...]``: sequence chunks, the batch axis kept whole (sharded)."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape((b, t // c, c) + x.shape[2:]), 0, 1)


def _chunk_logits(x_bcd: jax.Array, unembed_vd: jax.Array) -> jax.Array:
  return jnp.einsum("bcd,vd->bcv", x_bcd, unembed_vd, preferred_element_type=jnp.float32)


def _chunked_inputs(x_btd, targets_bt, weights_bt, chunk):
  """The scan's ``(x, targets, float32 weights)`` sequence chunks, and the sum of weights."""
  w_bt = weights_bt.astype(jnp.float32)
  return (_chunks(x_btd, chunk), _chunks(targets_bt, chunk), _chunks(w_bt, chunk)), jnp.sum(w_bt)


def _chunk_loss_sum(x_bcd: jax.Array, unembed_vd: jax.Array, targets_bc: jax.Array,
                    weights_bc: jax.Array) -> jax.Array:
  """One chunk's weighted sum of negative log-likelihoods (its ``[B, c, V]`` logits are local)."""
  return jnp.sum(_token_nll(_chunk_logits(x_bcd, unembed_vd), targets_bc) * weights_bc)


# Rematerialised: differentiation keeps only the chunk's inputs and recomputes its logits in the
# backward pass, so at most one chunk of logits (and of their gradient) exists at a time.
# prevent_cse=False is safe inside a scan, which already keeps XLA from merging the recomputation
# with the forward pass.
_remat_chunk_loss_sum = jax.checkpoint(_chunk_loss_sum, prevent_cse=False)


def _linear_ce(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  """The loss sums, a scan over sequence chunks of ``chunk`` positions."""
  def body(loss_sum, xs):
    x_bcd, t_bc, w_bc = xs
    return loss_sum + _remat_chunk_loss_sum(x_bcd, unembed_vd, t_bc, w_bc), None

  xs, weight_sum = _chunked_inputs(x_btd, targets_bt, weights_bt, chunk)
  loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return loss_sum, weight_sum


def linear_cross_entropy(x_btd: jax.Array, unembed_vd: jax.Array, targets_bt: jax.Array,
                         weights_bt: jax.Array, *, chunk: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """``weighted_cross_entropy(x @ unembed^T, targets, weights)`` without the ``[B, T, V]`` logits.

  The LM head and the loss, fused: logits are made a sequence chunk at a time (``[B, c, V]``,
  by default at most 2^24 logits, 64 MiB of float32, per device: see ``sequence_chunk``) in a
  ``lax.scan``, each chunk rematerialised (``jax.checkpoint``), so under ``jax.grad`` the backward
  pass recomputes one chunk's logits at a time and the full logits, their softmax and their
  gradient never exist. Plain JAX throughout: forward mode (``jax.jvp``, ``jax.jacfwd``,
  Hessian-vector products) and ``jax.linear_transpose`` work as for any JAX function. Matmuls run
  in the inputs' dtype with float32 accumulation; the batch axis is never split (it may be
  sharded).

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
  chunk = chunk or sequence_chunk(b, t, unembed_vd.shape[0])
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
