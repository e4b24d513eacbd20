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


# The loss's chunks, per device: at most 512 rows (tokens) and at most 2^24 logits (64 MiB of
# float32). Speed: every chunk reads the whole [V, D] unembedding again for its matmuls (logits,
# d/dx, d/dunembed), which do 2 * rows FLOPs per element of it each. Accelerators' matmul peak
# is some 100-600 FLOPs per byte of memory bandwidth, so the head is compute-bound with hundreds
# of rows per chunk; 512 rows (512 FLOPs per byte of a bfloat16 unembedding) is that on every
# platform, and more rows only make the chunk's temporaries (its logits and their gradient)
# larger, so that more of them fall out of the faster memories. Memory: the logit cap keeps those
# temporaries a few times 64 MiB for any vocabulary; at large vocabularies it is the cap that
# binds (333 rows at GPT-2's 50257 words, 130 at a 128k vocabulary).
_CHUNK_ROWS_PER_DEVICE = 512
_CHUNK_LOGITS_PER_DEVICE = 1 << 24


def sequence_chunk(batch: int, seq: int, vocab: int, logits_per_device: int | None = None) -> int:
  """The largest divisor ``c`` of ``seq`` whose chunk of ``batch * c`` rows fits (at least 1).

  Fits: at most 512 rows and ``logits_per_device`` logits (``batch * c * vocab``) per device, the
  devices being those of the mesh in context, else ``jax.device_count()``, since the batch axis
  is sharded over them. The defaults are the same on every platform: enough rows for the head's
  matmuls to be compute-bound rather than re-reading the unembedding at memory speed, and no
  more, with memory bounded by 2^24 logits (64 MiB of float32) for any vocabulary. A smaller
  logit budget (training's ``config.loss_chunk_logits``) makes smaller chunks at large
  vocabularies, fewer rows each; ``bench/train.py --loss_chunk_logits`` measures its speed.

  Example:
    >>> sequence_chunk(4, 256, 50257)   # on one device: 256 rows, 12.9M logits
    64
    >>> sequence_chunk(16, 128, 4096)   # 512 rows
    32
  """
  if logits_per_device is None:
    logits_per_device = _CHUNK_LOGITS_PER_DEVICE
  if logits_per_device <= 0:
    raise ValueError(f"logits_per_device must be positive; got {logits_per_device}.")
  mesh = current_mesh()
  devices = jax.device_count() if mesh is None else mesh.size
  max_rows, max_logits = _CHUNK_ROWS_PER_DEVICE * devices, logits_per_device * devices
  best = 1
  for c in range(1, seq + 1):
    if seq % c == 0 and batch * c <= max_rows and batch * c * vocab <= max_logits:
      best = c
  return best


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """``[B, T, ...] -> [T / c, B, c, ...]``: sequence chunks, the batch axis kept whole (sharded)."""
  b, t = x.shape[:2]
  return jnp.swapaxes(x.reshape((b, t // c, c) + x.shape[2:]), 0, 1)


def _chunk_logits(x_bcd: jax.Array, unembed_vd: jax.Array) -> jax.Array:
  return jnp.einsum("bcd,vd->bcv", x_bcd, unembed_vd, preferred_element_type=jnp.float32)


def _chunked_inputs(x_btd, targets_bt, w_bt, chunk):
  """The scan's ``(x, targets, weights)`` sequence chunks, each ``[T / c, B, c, ...]``."""
  return _chunks(x_btd, chunk), _chunks(targets_bt, chunk), _chunks(w_bt, chunk)


def _unchunk(x: jax.Array) -> jax.Array:
  """Inverse of ``_chunks``: ``[T / c, B, c, ...] -> [B, T, ...]``."""
  n, b, c = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _loss_sum(x_btd, unembed_vd, targets_bt, w_bt, chunk):
  """Evaluation: the weighted sum of negative log-likelihoods, one chunk of logits at a time."""
  def body(loss_sum, xs):
    x_bcd, t_bc, w_bc = xs
    nll_bc = _token_nll(_chunk_logits(x_bcd, unembed_vd), t_bc)
    return loss_sum + jnp.sum(nll_bc * w_bc), None

  loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                             _chunked_inputs(x_btd, targets_bt, w_bt, chunk))
  return loss_sum


def _chunk_loss_and_grads(x_bcd, unembed_vd, t_bc, w_bc):
  """One chunk's loss sum and its gradients, from one ``[B, c, V]`` chunk of logits.

  Returns ``(loss_sum, d/dx [B, c, D] in x's dtype, d/dunembed as [D, V] float32, nll [B, c])``;
  the per-token negative log-likelihoods ``nll`` are the gradient with respect to the weights.
  """
  logits_bcv = _chunk_logits(x_bcd, unembed_vd)
  # d nll / d logits = exp(l - lse) - onehot(target). The exponentials are taken twice, inside
  # the row sum and inside the gradient, so that neither writes a [B, c, V] array of them to
  # memory: the logits are read again instead, and the only [B, c, V] written after them is the
  # gradient itself.
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  nll_bc = lse_bc - _target_logit(logits_bcv, t_bc)
  onehot_bcv = jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32) == t_bc[..., None]
  g_logits_bcv = ((jnp.exp(logits_bcv - lse_bc[..., None]) - onehot_bcv) * w_bc[..., None]
                  ).astype(x_bcd.dtype)
  g_x_bcd = jnp.einsum("bcv,vd->bcd", g_logits_bcv, unembed_vd,
                       preferred_element_type=jnp.float32).astype(x_bcd.dtype)
  # As [D, V], with the tokens as the rows of 2-D operands: both then contract their leading axis,
  # which matmul libraries read in place; a [V, D] result, or two token axes, would make XLA
  # transpose one operand first.
  g_unembed_dv = jnp.einsum("nd,nv->dv", x_bcd.reshape(-1, x_bcd.shape[-1]),
                            g_logits_bcv.reshape(-1, g_logits_bcv.shape[-1]),
                            preferred_element_type=jnp.float32)
  return jnp.sum(nll_bc * w_bc), g_x_bcd, g_unembed_dv, nll_bc


# Rematerialised for second-order derivatives only. A first-order derivative evaluates the JVP
# rule's gradient pass on primal values and never differentiates it, so this changes nothing there;
# differentiating a gradient again (reverse-over-reverse) would otherwise keep every chunk's
# logits. prevent_cse=False is safe inside a scan, which already keeps XLA from merging the
# recomputation with the forward pass.
_remat_chunk_loss_and_grads = jax.checkpoint(_chunk_loss_and_grads, prevent_cse=False)


def _loss_sum_and_grads(x_btd, unembed_vd, targets_bt, w_bt, chunk):
  """The loss sum and its gradients ``(d/dx [B, T, D], d/dunembed [V, D], d/dweights [B, T])``.

  One pass over the sequence chunks; ``d/dunembed`` is accumulated over them in the scan's carry.
  """
  def body(carry, xs):
    loss_sum, g_unembed_dv = carry
    x_bcd, t_bc, w_bc = xs
    loss_c, g_x_bcd, g_unembed_c, nll_bc = _remat_chunk_loss_and_grads(x_bcd, unembed_vd, t_bc,
                                                                       w_bc)
    return (loss_sum + loss_c, g_unembed_dv + g_unembed_c), (g_x_bcd, nll_bc)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_vd.shape[::-1], jnp.float32))
  (loss_sum, g_unembed_dv), (g_x, nll) = jax.lax.scan(
      body, init, _chunked_inputs(x_btd, targets_bt, w_bt, chunk))
  return loss_sum, (_unchunk(g_x), g_unembed_dv.T.astype(unembed_vd.dtype), _unchunk(nll))


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``<a, b>``, the sum of the elementwise product, in float32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _fused_loss_sum(x_btd, unembed_vd, targets_bt, w_bt, chunk):
  # Undifferentiated, JAX runs only this forward-only scan; the rule below (and its gradient
  # work) is traced only under jvp, grad, linearize and the like.
  return _loss_sum(x_btd, unembed_vd, targets_bt, w_bt, chunk)


@_fused_loss_sum.defjvp
def _fused_loss_sum_jvp(chunk, primals, tangents):
  # The loss and its gradient g come from one pass over the chunks; the tangent is then
  # <g, (dx, dunembed, dweights)>, linear in the tangents with coefficients from that pass. Reverse
  # mode transposes this linear map, so its backward pass is g times the cotangent: no logits
  # recomputed, and only g ([B, T, D] + [V, D] + [B, T]) kept for it. The targets are integers
  # (no tangent).
  x_btd, unembed_vd, targets_bt, w_bt = primals
  dx_btd, dunembed_vd, _, dw_bt = tangents
  loss_sum, (g_x, g_unembed, nll) = _loss_sum_and_grads(x_btd, unembed_vd, targets_bt, w_bt,
                                                         chunk)
  return loss_sum, _dot(g_x, dx_btd) + _dot(g_unembed, dunembed_vd) + _dot(nll, dw_bt)


def _linear_ce(x_btd, unembed_vd, targets_bt, weights_bt, chunk):
  """The loss sums ``(loss_sum, weight_sum)``, a scan over sequence chunks of ``chunk`` positions."""
  w_bt = weights_bt.astype(jnp.float32)
  return _fused_loss_sum(x_btd, unembed_vd, targets_bt, w_bt, chunk), jnp.sum(w_bt)


def linear_cross_entropy(x_btd: jax.Array, unembed_vd: jax.Array, targets_bt: jax.Array,
                         weights_bt: jax.Array, *, chunk: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """``weighted_cross_entropy(x @ unembed^T, targets, weights)`` without the ``[B, T, V]`` logits.

  The LM head and the loss, fused: logits are made a sequence chunk at a time (``[B, c, V]``,
  by default at most 512 rows and 2^24 logits per device: see ``sequence_chunk``) in a
  ``lax.scan``, so the full logits, their softmax and their gradient never exist. Under
  differentiation the same pass over the chunks also makes the gradient with respect to ``x``,
  the unembedding and the weights (a ``jax.custom_jvp`` whose tangent is the inner product of that
  gradient with the input tangents): reverse mode transposes this linear tangent, so its backward
  pass recomputes no logits and keeps only the gradient. Evaluation without differentiation
  runs the forward-only scan. The rule is plain JAX, so forward mode (``jax.jvp``,
  ``jax.jacfwd``), Hessian-vector products, reverse-over-reverse and ``jax.linear_transpose``
  work as for any JAX function. Matmuls run in the inputs' dtype with float32 accumulation; the
  batch axis is never split (it may be sharded).

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
