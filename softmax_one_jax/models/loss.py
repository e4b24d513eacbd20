"""The language-model loss: weighted next-token cross-entropy (training and evaluation share it).

``linear_cross_entropy`` fuses the LM head with the loss. Under a mesh it is vocab-parallel: the
unembedding stays in its parameter sharding (vocabulary over the tensor axis, model width over
fsdp, through ``sharding.LOGICAL_AXIS_RULES``), each device makes the logits of its own rows and
its own words only, and the gradient of the unembedding leaves reduce-scattered into that same
sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jax.sharding import AbstractMesh, PartitionSpec

from softmax_one_jax.sharding import current_mesh, spec_in_context

# The unembedding's logical axes, ``[V, D]``: those of the tied token embedding, and of the LM
# head's ``("embed", "vocab")`` kernel transposed (models/transformer.py).
UNEMBED_AXES: tuple[str, str] = ("vocab", "embed")


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


# ------------------------------------------------------------------------------- the mesh layout

def _spec_axes(spec: PartitionSpec | None, dim: int) -> tuple[str, ...]:
  """The mesh axes that shard dimension ``dim`` of a ``PartitionSpec`` (none when absent)."""
  entry = None if spec is None or len(spec) <= dim else spec[dim]
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
  """One dimension's ``PartitionSpec`` entry for ``axes``: None, one name, or a tuple."""
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _size(mesh: AbstractMesh, axes: Sequence[str]) -> int:
  """Devices along ``axes`` of ``mesh`` (1 for none)."""
  return math.prod(mesh.shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class LossLayout:
  """Which mesh axes split what in the fused loss; every axis of size > 1 splits something.

  The unembedding ``[V, D]`` enters as its parameter is sharded: ``vocab`` over its rows,
  ``embed`` over its columns. A device makes the logits of its rows of the batch (split over
  ``rows`` along the batch and ``seq`` along the sequence) and of its ``V / prod(vocab)`` words,
  so no two devices compute the same rows for the same words. ``embed`` axes always split rows
  too: the unembedding is gathered over them once, and its gradient reduce-scattered back.

  Attributes:
    chunk: sequence positions per chunk of a device's scan (a divisor of its part of ``T``).
    rows: mesh axes splitting the batch dimension: the "batch" rule's, then any axis that
      shards neither the batch nor the vocabulary (e.g. tensor when it does not divide ``V``).
    seq: mesh axes splitting the sequence (such axes the batch cannot take).
    vocab: mesh axes splitting the vocabulary (vocab-parallel logits and logsumexp).
    embed: mesh axes splitting the unembedding's model width.

  Example:
    >>> with jax.set_mesh(make_mesh(1, 4, 2)):
    ...   loss_layout(8, 64, 512, 64, chunk=16)
    LossLayout(chunk=16, rows=('fsdp',), seq=(), vocab=('tensor',), embed=('fsdp',))
  """
  chunk: int
  rows: tuple[str, ...] = ()
  seq: tuple[str, ...] = ()
  vocab: tuple[str, ...] = ()
  embed: tuple[str, ...] = ()

  @property
  def row_axes(self) -> tuple[str, ...]:
    """Every axis that splits the rows: the sums over rows are taken over these."""
    return self.rows + self.seq

  @property
  def sharded(self) -> bool:
    """Whether any mesh axis splits the work (else the loss runs as is, with no shard_map)."""
    return bool(self.row_axes or self.vocab)

  def rows_spec(self) -> PartitionSpec:
    """``[B, T, ...]`` operands (hidden states, targets, weights, their gradients)."""
    return PartitionSpec(_spec_entry(self.rows), _spec_entry(self.seq))

  def unembed_spec(self) -> PartitionSpec:
    """The unembedding ``[V, D]`` and its gradient: the parameter's own sharding."""
    return PartitionSpec(_spec_entry(self.vocab), _spec_entry(self.embed))


def loss_layout(batch: int, seq: int, vocab: int, d_model: int, chunk: int) -> LossLayout:
  """The ``LossLayout`` of a ``[batch, seq]`` loss in chunks of ``chunk`` positions on the mesh
  in context (nothing sharded outside one).

  The batch is split as the "batch" rule gives, the unembedding as ``UNEMBED_AXES`` give. A
  remaining axis of size > 1 (it shards neither) splits the rows further: the batch if it
  divides, else the sequence, whose per-device chunk is then the largest divisor of both
  ``chunk`` and the device's positions (smaller chunks, the same memory bound).

  Raises:
    ValueError: the rules put the vocabulary on a batch axis, or an axis that shards neither
      divides neither the batch nor the sequence; the message names the fix.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return LossLayout(chunk)
  rows = _spec_axes(spec_in_context(("batch",), (batch,)), 0)
  unembed = spec_in_context(UNEMBED_AXES, (vocab, d_model))
  vocab_axes, embed_axes = _spec_axes(unembed, 0), _spec_axes(unembed, 1)
  if set(vocab_axes) & set(rows):
    raise ValueError(
        f"LOGICAL_AXIS_RULES shard the vocabulary over {vocab_axes} and the batch over {rows}: "
        "the fused loss needs them on different mesh axes; change the 'vocab' or 'batch' rule "
        "in softmax_one_jax/sharding.py.")
  seq_axes: tuple[str, ...] = ()
  for axis in mesh.axis_names:
    n = mesh.shape[axis]
    if n == 1 or axis in rows or axis in vocab_axes:
      continue
    if batch % (_size(mesh, rows) * n) == 0:
      rows += (axis,)
    elif seq % (_size(mesh, seq_axes) * n) == 0:
      seq_axes += (axis,)
    else:
      raise ValueError(
          f"The fused loss cannot split its {batch} x {seq} tokens over mesh axis {axis!r} ({n} "
          f"devices), which shards neither the batch nor the vocabulary ({vocab} words), so its "
          f"devices would repeat each other's LM head: pad the vocabulary to a multiple of {n} "
          f"(config.model.vocab_multiple), or make the batch or the sequence a multiple of {n}.")
  local_seq = seq // _size(mesh, seq_axes)
  return LossLayout(math.gcd(chunk, local_seq), rows, seq_axes, vocab_axes, embed_axes)


# ------------------------------------------------------------------------------ the chunk rule

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


def shards_per_row_and_word(batch: int, vocab: int) -> tuple[int, int]:
  """``(devices sharding the batch, shards of the vocabulary)`` on the mesh in context.

  What ``sequence_chunk`` divides by: a device holds ``batch / first`` rows of a chunk and
  ``vocab / second`` of its words. Both are 1 outside a mesh.

  Example:
    >>> with jax.set_mesh(make_mesh(2, 2, 2)):
    ...   shards_per_row_and_word(8, 512)
    (4, 2)
  """
  mesh = current_mesh()
  if mesh is None:
    return 1, 1
  rows = _spec_axes(spec_in_context(("batch",), (batch,)), 0)
  words = _spec_axes(spec_in_context(UNEMBED_AXES[:1], (vocab,)), 0)
  return _size(mesh, rows), _size(mesh, [a for a in words if a not in rows])


def sequence_chunk(batch: int, seq: int, vocab: int, logits_per_device: int | None = None) -> int:
  """The largest divisor ``c`` of ``seq`` whose chunk of ``batch * c`` rows fits (at least 1).

  Fits: at most 512 rows and ``logits_per_device`` logits per device. A device's rows are the
  chunk's over the devices that shard the batch (its "batch" rule on the mesh in context; one
  device outside a mesh), its logits those rows times its share of the vocabulary (split over
  the tensor axis by the "vocab" rule). The defaults are the same on every platform: enough rows
  for the head's matmuls to be compute-bound rather than re-reading the unembedding at memory
  speed, and no more, with memory bounded by 2^24 logits (64 MiB of float32) for any vocabulary.
  A smaller logit budget (training's ``config.loss_chunk_logits``) makes smaller chunks at large
  vocabularies, fewer rows each; ``bench/train.py --loss_chunk_logits`` measures its speed.

  Example:
    >>> sequence_chunk(4, 256, 50257)   # outside a mesh: 256 rows, 12.9M logits
    64
    >>> sequence_chunk(16, 128, 4096)   # 512 rows
    32
  """
  if logits_per_device is None:
    logits_per_device = _CHUNK_LOGITS_PER_DEVICE
  if logits_per_device <= 0:
    raise ValueError(f"logits_per_device must be positive; got {logits_per_device}.")
  row_shards, word_shards = shards_per_row_and_word(batch, vocab)
  max_rows = _CHUNK_ROWS_PER_DEVICE * row_shards
  max_logits = logits_per_device * row_shards * word_shards
  best = 1
  for c in range(1, seq + 1):
    if seq % c == 0 and batch * c <= max_rows and batch * c * vocab <= max_logits:
      best = c
  return best


# ------------------------------------------------------------------- one device's part of the loss

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


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``x`` summed over the mesh axes ``axes`` (as is for none: no collective at all)."""
  return jax.lax.psum(x, axes) if axes else x


def _lse_and_target(logits_bcv: jax.Array, t_bc: jax.Array, vocab_axes: tuple[str, ...],
                    offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The logsumexp over the whole vocabulary and each token's target logit, both ``[B, c]``.

  ``logits_bcv`` holds words ``offset .. offset + V_local - 1`` of a vocabulary split over
  ``vocab_axes`` (all of it when there are none). Across shards: the largest logit by a
  ``pmax``, the exponentials' sum shifted by it and the target logit (zero on every shard but
  the one that owns the target) by one ``psum``.
  """
  if not vocab_axes:
    return jax.nn.logsumexp(logits_bcv, axis=-1), _target_logit(logits_bcv, t_bc)
  v_local = logits_bcv.shape[-1]
  local_t_bc = t_bc.astype(jnp.int32) - offset
  owned_bc = (local_t_bc >= 0) & (local_t_bc < v_local)
  target_bc = jnp.where(owned_bc, _target_logit(logits_bcv, jnp.clip(local_t_bc, 0, v_local - 1)),
                        0.0)
  # Any shift gives the same logsumexp; the largest logit keeps every exponential <= 1. Its
  # derivative is zero, so none is taken through the pmax.
  max_bc = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits_bcv, axis=-1)), vocab_axes)
  sum_exp_bc, target_bc = jax.lax.psum(
      (jnp.sum(jnp.exp(logits_bcv - max_bc[..., None]), axis=-1), target_bc), vocab_axes)
  return max_bc + jnp.log(sum_exp_bc), target_bc


def _vocab_offset(vocab_axes: tuple[str, ...], v_local: int) -> jax.Array:
  """The first word this device holds of a vocabulary split over ``vocab_axes``."""
  if not vocab_axes:
    return jnp.zeros((), jnp.int32)
  return (jax.lax.axis_index(vocab_axes) * v_local).astype(jnp.int32)


def _loss_sum(x_btd, unembed_vd, targets_bt, w_bt, chunk, vocab_axes, offset):
  """Evaluation: the weighted sum of negative log-likelihoods, one chunk of logits at a time."""
  def body(loss_sum, xs):
    x_bcd, t_bc, w_bc = xs
    lse_bc, target_bc = _lse_and_target(_chunk_logits(x_bcd, unembed_vd), t_bc, vocab_axes,
                                        offset)
    return loss_sum + jnp.sum((lse_bc - target_bc) * w_bc), None

  loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                             _chunked_inputs(x_btd, targets_bt, w_bt, chunk))
  return loss_sum


def _chunk_loss_and_grads(x_bcd, unembed_vd, t_bc, w_bc, offset, vocab_axes):
  """One chunk's loss sum and its gradients, from one ``[B, c, V_local]`` chunk of logits.

  Returns ``(loss_sum, d/dx [B, c, D] in x's dtype, d/dunembed as [D, V_local] float32,
  nll [B, c])``; the per-token negative log-likelihoods ``nll`` are the gradient with respect to
  the weights. Over a split vocabulary d/dx is this shard's part of it (summed across shards by
  the caller) and d/dunembed that of this shard's words.
  """
  logits_bcv = _chunk_logits(x_bcd, unembed_vd)
  # d nll / d logits = exp(l - lse) - onehot(target). The exponentials are taken twice, inside
  # the row sum and inside the gradient, so that neither writes a [B, c, V] array of them to
  # memory: the logits are read again instead, and the only [B, c, V] written after them is the
  # gradient itself.
  lse_bc, target_bc = _lse_and_target(logits_bcv, t_bc, vocab_axes, offset)
  nll_bc = lse_bc - target_bc
  onehot_bcv = (jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32)
                == (t_bc.astype(jnp.int32) - offset)[..., None])
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
_remat_chunk_loss_and_grads = jax.checkpoint(_chunk_loss_and_grads, prevent_cse=False,
                                             static_argnums=(5,))


def _loss_sum_and_grads(x_btd, unembed_vd, targets_bt, w_bt, chunk, vocab_axes, offset):
  """The loss sum and its gradients ``(d/dx [B, T, D], d/dunembed as [D, V] float32, d/dweights
  [B, T])`` of this device's rows and words.

  One pass over the sequence chunks; ``d/dunembed`` is accumulated over them in the scan's carry.
  """
  def body(carry, xs):
    loss_sum, g_unembed_dv = carry
    x_bcd, t_bc, w_bc = xs
    loss_c, g_x_bcd, g_unembed_c, nll_bc = _remat_chunk_loss_and_grads(
        x_bcd, unembed_vd, t_bc, w_bc, offset, vocab_axes)
    return (loss_sum + loss_c, g_unembed_dv + g_unembed_c), (g_x_bcd, nll_bc)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(unembed_vd.shape[::-1], jnp.float32))
  (loss_sum, g_unembed_dv), (g_x, nll) = jax.lax.scan(
      body, init, _chunked_inputs(x_btd, targets_bt, w_bt, chunk))
  return loss_sum, (_unchunk(g_x), g_unembed_dv, _unchunk(nll))


def _gathered_unembedding(unembed_vd: jax.Array, layout: LossLayout) -> jax.Array:
  """This device's words of the unembedding with the whole model width, ``[V_local, D]``."""
  if not layout.embed:
    return unembed_vd
  return jax.lax.all_gather(unembed_vd, layout.embed, axis=1, tiled=True)


def _local_loss(x_btd, unembed_vd, targets_bt, w_bt, layout):
  """One device's forward-only loss, summed over every device's rows."""
  unembed_vd = _gathered_unembedding(unembed_vd, layout)
  offset = _vocab_offset(layout.vocab, unembed_vd.shape[0])
  return _psum(_loss_sum(x_btd, unembed_vd, targets_bt, w_bt, layout.chunk, layout.vocab, offset),
               layout.row_axes)


def _local_loss_and_grads(x_btd, unembed_vd, targets_bt, w_bt, layout):
  """One device's loss (summed over all rows) and gradients, each in its operand's sharding.

  d/dx is summed over the vocabulary's shards; d/dunembed over the rows' devices: reduce-scattered
  over the ``embed`` axes, which the unembedding was gathered over, and summed over the other
  row axes (a data axis holds replicas of the parameter), in float32 then cast.
  """
  dtype = unembed_vd.dtype
  unembed_vd = _gathered_unembedding(unembed_vd, layout)
  offset = _vocab_offset(layout.vocab, unembed_vd.shape[0])
  loss_sum, (g_x, g_unembed_dv, nll) = _loss_sum_and_grads(
      x_btd, unembed_vd, targets_bt, w_bt, layout.chunk, layout.vocab, offset)
  if layout.embed:
    g_unembed_dv = jax.lax.psum_scatter(g_unembed_dv, layout.embed, scatter_dimension=0,
                                        tiled=True)
  g_unembed_dv = _psum(g_unembed_dv, tuple(a for a in layout.row_axes if a not in layout.embed))
  return _psum(loss_sum, layout.row_axes), (_psum(g_x, layout.vocab),
                                            g_unembed_dv.T.astype(dtype), nll)


def _on_mesh(local_fn, layout: LossLayout, out_specs):
  """``local_fn`` once per device under the mesh in context (as is when nothing is sharded)."""
  if not layout.sharded:
    return local_fn
  rows = layout.rows_spec()
  # Every collective is written out in the local functions, so the varying-value checks have
  # nothing to add (and would ask for casts on the scans' carries).
  return jax.shard_map(local_fn, mesh=current_mesh(),
                       in_specs=(rows, layout.unembed_spec(), rows, rows),
                       out_specs=out_specs, check_vma=False)


# ------------------------------------------------------------------------------- the custom JVP

def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``<a, b>``, the sum of the elementwise product, in float32."""
  return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _fused_loss_sum(x_btd, unembed_vd, targets_bt, w_bt, layout):
  # Undifferentiated, JAX runs only this forward-only scan; the rule below (and its gradient
  # work) is traced only under jvp, grad, linearize and the like.
  local = functools.partial(_local_loss, layout=layout)
  return _on_mesh(local, layout, PartitionSpec())(x_btd, unembed_vd, targets_bt, w_bt)


@_fused_loss_sum.defjvp
def _fused_loss_sum_jvp(layout, primals, tangents):
  # The loss and its gradient g come from one pass over the chunks; the tangent is then
  # <g, (dx, dunembed, dweights)>, linear in the tangents with coefficients from that pass. Reverse
  # mode transposes this linear map, so its backward pass is g times the cotangent: no logits
  # recomputed, and only g ([B, T, D] + [V, D] + [B, T]) kept for it. Under a mesh g leaves the
  # per-device pass in the operands' own shardings, so the products and their transposes are
  # elementwise there and move nothing. The targets are integers (no tangent).
  x_btd, unembed_vd, targets_bt, w_bt = primals
  dx_btd, dunembed_vd, _, dw_bt = tangents
  rows = layout.rows_spec()
  local = functools.partial(_local_loss_and_grads, layout=layout)
  loss_sum, (g_x, g_unembed, nll) = _on_mesh(
      local, layout, (PartitionSpec(), (rows, layout.unembed_spec(), rows)))(
          x_btd, unembed_vd, targets_bt, w_bt)
  return loss_sum, _dot(g_x, dx_btd) + _dot(g_unembed, dunembed_vd) + _dot(nll, dw_bt)


def _linear_ce(x_btd, unembed_vd, targets_bt, weights_bt, layout):
  """The loss sums ``(loss_sum, weight_sum)``, a scan over sequence chunks on each device."""
  w_bt = weights_bt.astype(jnp.float32)
  return _fused_loss_sum(x_btd, unembed_vd, targets_bt, w_bt, layout), jnp.sum(w_bt)


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
  work as for any JAX function (outside a mesh: under one, jax 0.10.2's XLA:CPU cannot compile
  second-order derivatives of its ``shard_map``, lacking Shardy's ``GlobalToLocalShape``).
  Matmuls run in the inputs' dtype with float32 accumulation.

  Under a mesh (``loss_layout``) each device runs the scan on its rows of the batch and its
  words of the vocabulary: the unembedding enters in its parameter sharding (``UNEMBED_AXES``
  through the rules: words over tensor, width over fsdp) and is gathered over its width once;
  the logsumexp is combined across the vocabulary's shards at every chunk; the gradient of the
  unembedding is accumulated locally and reduce-scattered once into the parameter's sharding.

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
  return _linear_ce(x_btd, unembed_vd, targets_bt, weights_bt,
                    loss_layout(b, t, unembed_vd.shape[0], d, chunk))
