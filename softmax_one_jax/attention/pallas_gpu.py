"""Flash attention with softmax-1 for GPUs: Pallas (Triton back end) forward and backward kernels.

softmax-1 enters through the running state of the online softmax: the virtual zero logit is the
initial state ``m = 0, l = 1`` (running max, running sum), so the kernel never adds a column and
the logsumexp residual ``lse = log(1 + sum_j exp(s_j))`` already includes the null key. With it the
usual flash backward holds unchanged: ``P = exp(S - lse)``, ``dS = P * (dP - rowsum(dO * O))``.
A learned sink ``c_n`` per query head (``softmax="learned_sink"``) starts from ``m = c_n, l = 1``
instead; its gradient ``dc_n = -sum_{b,t} exp(c_n - lse) * rowsum(dO * O)`` is computed outside
the kernels from the same residuals. Plain softmax starts from ``m = -inf, l = 0``; a query that
may attend to nothing outputs zeros (``l = 0``), matching
:func:`~softmax_one_jax.attention.reference.reference_attention`.

Why Triton rather than Mosaic GPU: the Triton lowering runs on every CUDA GPU JAX supports
(A100, H100/H200, consumer cards) and the very same kernel code runs on CPU with
``interpret=True``, so CI tests the code that ships. Mosaic GPU reaches higher Hopper
utilisation through warpgroup MMA and TMA pipelining, but only on sm90+, with a separate
programming model and no CPU interpreter for its warpgroup semantics; it is the next step if the
H200 figures in bench/RESULTS.md fall short of cuDNN.

Memory is linear in sequence length: per (batch, head, query block) program the kernel keeps one
``[block_q, head_dim]`` accumulator and two ``[block_q]`` vectors; no ``[T, S]`` buffer exists in
the forward or backward pass. The residuals are ``O`` and ``lse`` (``[B, N, T]``).

The file holds one concept at about 580 lines: the forward kernel, the two backward kernels (dq;
dk and dv) and the ``custom_vjp`` that joins them share one block layout, one masking rule and
the running-state convention above, and read as a unit against the reference in
``attention/reference.py``.

Example:
  >>> q = k = v = jnp.ones((1, 16, 2, 64))
  >>> flash_attention(q, k, v, is_causal=True, interpret=True).shape
  (1, 16, 2, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from softmax_one_jax.attention import _padding
from softmax_one_jax.attention.reference import SegmentIds
from softmax_one_jax.softmax import resolve_sinks

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels (powers of two, >= 16); shrunk to the padded sequence.

  Attributes:
    block_q, block_k: query / key tile of the forward kernel (one program per query tile).
    block_q_dkv, block_k_dkv: tiles of the dK/dV kernel (one program per key tile).
    block_q_dq, block_k_dq: tiles of the dQ kernel (one program per query tile).
    num_warps: Triton warps per program; None = 4 for head_dim <= 64, else 8.
    num_stages: Triton software-pipelining stages.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
      b = getattr(self, field)
      if b < 16 or b & (b - 1):
        raise ValueError(f"BlockSizes.{field}={b} must be a power of two >= 16 (Triton tiles).")


FLOAT32_BLOCK_SIZES = BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64,
                                 block_q_dq=64, block_k_dq=32)
# Tiles for 256-wide heads: a [block, 256] tile is twice a 128-wide one, so each block halves
# again (A100: 164 KiB of shared memory per SM).
WIDE_HEAD_BLOCK_SIZES = {2: BlockSizes(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=64,
                                       block_q_dq=64, block_k_dq=32),
                         4: BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                                       block_q_dq=32, block_k_dq=16)}


def default_block_sizes(head_dim: int, dtype: jax.typing.DTypeLike) -> BlockSizes:
  """The tiles for a head dim and input dtype: ``BlockSizes()`` for 16-bit inputs up to 128-wide
  heads, halved for float32 (``FLOAT32_BLOCK_SIZES``), halved again above 128
  (``WIDE_HEAD_BLOCK_SIZES``), so that a program's tiles fit an A100's shared memory.

  Triton tiles are powers of two, so a head dim of 80 or 96 runs in a 128-wide tile (its
  padding is zeros; the cuDNN path, the GPU default, takes them unpadded).

  Example:
    >>> default_block_sizes(256, jnp.bfloat16).block_q
    64
  """
  itemsize = jnp.dtype(dtype).itemsize
  if _padding.next_power_of_2(head_dim) > 128:
    return WIDE_HEAD_BLOCK_SIZES[min(itemsize, 4)]
  return FLOAT32_BLOCK_SIZES if itemsize >= 4 else BlockSizes()


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels specialise on (hashable: a static argument of jit/custom_vjp)."""

  sink: bool  # rows start from a sink logit (softmax-1: 0, learned sinks) rather than empty
  causal: bool
  scale: float
  kv_len: int  # true number of keys; keys at or beyond it are padding
  kv_pad: int  # padded number of keys (a multiple of every key tile)
  group: int  # query heads per key/value head
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int
  num_warps: int
  num_stages: int
  interpret: bool


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """float32-accumulated tile product at ``jax.default_matmul_precision``, as XLA's matmuls:
  float32 inputs use TF32 by default and exact float32 under "highest" (or "float32")."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b)


def _logits2(q, k, st: _Static, q_start, k_start, q_ids, kv_ids, masked: bool,
             scores: bool = False):
  """``[bq, bk]`` logits in log2 units (``s * log2(e)``), masked entries ``-inf``.

  ``masked`` (static) adds the causal mask; segment ids and key padding are always applied when
  present, as they may cut any tile. With ``scores`` (static) it returns ``(s, d, k_pos)``:
  ``d`` is the same tile's dot products ``q.k`` times the sign of the scale (exact, so their
  order is the logits' order and no rounding of the scaling can merge two of them), masked
  ``-inf``, and ``k_pos`` the ``[bq, bk]`` key index of each entry.
  """
  dots = _dot(q, k, trans_b=True)
  s = dots * (st.scale * _LOG2E)
  bq, bk = s.shape
  keep = None
  if q_ids is not None:
    keep = q_ids[:, None] == kv_ids[None, :]
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  if st.kv_len < st.kv_pad:  # padded keys exist (in the last tiles; checking all is cheap)
    ok = k_pos < st.kv_len
    keep = ok if keep is None else keep & ok
  if masked:
    ok = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0) >= k_pos
    keep = ok if keep is None else keep & ok
  s = s if keep is None else jnp.where(keep, s, -jnp.inf)
  if not scores:
    return s
  sign = _padding.scale_sign(st.scale)
  d = dots if sign == 1.0 else dots * sign
  return s, (d if keep is None else jnp.where(keep, d, -jnp.inf)), k_pos


def _causal_ranges(q_start, block_q: int, block_k: int, num_k_blocks: int):
  """Key tiles ``[0, n_full)`` fully visible to a query tile, ``[n_full, n_end)`` diagonal-cut."""
  n_full = jnp.minimum(lax.div(q_start + 1, jnp.int32(block_k)), num_k_blocks)
  n_end = jnp.minimum(lax.div(q_start + (block_q + block_k - 1), jnp.int32(block_k)), num_k_blocks)
  return n_full, n_end


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, sinks_ref, *out_refs, st: _Static,
                stats: bool):
  """One program: a query tile of one (batch, head); loops over key tiles.

  ``sinks_ref`` holds the head's sink logit repeated ``block_q`` times (None without a sink).
  Writes the output and the logsumexp. With ``stats`` it skips the output and writes, per query,
  the largest score over the visible keys and the score of the first visible key (smallest index
  the query may see), both from the same tile products in the same units (see ``_logits2``'s
  ``d``), so that comparing them decides whether the first visible key is the argmax exactly.
  """
  bq, bk = st.block_q, st.block_k
  q_start = pl.program_id(0) * bq
  num_k_blocks = k_ref.shape[0] // bk
  q = q_ref[...]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  # The sink is a key seen before all others: running max = its logit (log2 units), sum = 1.
  if st.sink:
    m0 = sinks_ref[...].astype(jnp.float32) * _LOG2E
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  neg_inf = jnp.full((bq,), -jnp.inf, jnp.float32)
  # With stats: (largest score, first visible key's score) per query, in _logits2's d units.
  scores0 = (neg_inf, neg_inf) if stats else ()

  def body(j, carry, masked):
    acc, m, l, scores = carry
    sl = pl.ds(j * bk, bk)
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[sl]
    tile = _logits2(q, k_ref[sl, :], st, q_start, j * bk, q_ids, kv_ids, masked,
                    scores=stats)
    s = tile[0] if stats else tile
    s_max = jnp.max(s, axis=-1)
    m_new = jnp.maximum(m, s_max)
    # A finite sink keeps m finite; rows with nothing seen yet (no sink, or a sink of -inf) shift
    # by 0, not -inf.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = alpha * l + jnp.sum(p, axis=-1)
    if not stats:
      v = v_ref[sl, :]
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    else:
      _, d, k_pos = tile
      top, first = scores
      tile_top, tile_first = _padding.max_and_first(d, k_pos, st.kv_pad)
      # Tiles come in ascending key order: the first tile in which a row sees any key gives its
      # first visible key; until then first is -inf (a visible score is finite), then it stays.
      scores = (jnp.maximum(top, tile_top),
                jnp.where(first == -jnp.inf, tile_first, first))
    return acc, m_new, l, scores

  carry = (acc0, m0, l0, scores0)
  if st.causal:
    n_full, n_end = _causal_ranges(q_start, bq, bk, num_k_blocks)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
  else:
    carry = lax.fori_loop(0, num_k_blocks, functools.partial(body, masked=False), carry)
  acc, m, l, scores = carry

  refs = list(out_refs)
  if not stats:
    o_ref = refs.pop(0)
    safe_l = jnp.where(l == 0.0, 1.0, l)  # a row with no key and no sink outputs zeros
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref = refs.pop(0)
  lse_ref[...] = (m + jnp.log2(l)) * _LN2  # -inf for an all-masked row without a sink
  if stats:
    refs.pop(0)[...] = scores[0]
    refs.pop(0)[...] = scores[1]


def _forward_call(q, k, v, ids, sinks, st: _Static, stats: bool = False):
  """pallas_call of the forward kernel on padded inputs.

  Returns ``(o, lse [B,N,T])``, or with ``stats`` ``(lse, top [B,N,T], first [B,N,T])``: the
  largest score and the first visible key's score in the units of ``_logits2``'s ``d``.

  ``sinks`` is ``[N]`` float32 when ``st.sink``, else None.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  g = st.group
  in_specs = [
      pl.BlockSpec((None, st.block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
      pl.BlockSpec((None, s, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0)),
      pl.BlockSpec((None, s, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0)),
  ]
  if ids is None:
    in_specs += [None, None]
    q_ids = kv_ids = None
  else:
    q_ids, kv_ids = ids
    in_specs += [pl.BlockSpec((None, st.block_q), lambda i, bi, ni: (bi, i)),
                 pl.BlockSpec((None, s), lambda i, bi, ni: (bi, 0))]
  # Each head's sink as a [block_q] row (a vector load, like the segment ids), not a scalar.
  sinks_nq = None if sinks is None else jnp.broadcast_to(sinks[:, None], (n, st.block_q))
  in_specs.append(None if sinks is None else
                  pl.BlockSpec((None, st.block_q), lambda i, bi, ni: (ni, 0)))
  row_spec = pl.BlockSpec((None, None, st.block_q), lambda i, bi, ni: (bi, ni, i))
  row_shape = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  out_shape, out_specs = [], []
  if not stats:
    out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
    out_specs.append(pl.BlockSpec((None, st.block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)))
  out_shape.append(row_shape)
  out_specs.append(row_spec)
  if stats:
    out_shape += [row_shape, row_shape]
    out_specs += [row_spec, row_spec]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, stats=stats),
      grid=(t // st.block_q, b, n),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
      interpret=st.interpret,
      name="sink_flash_fwd" if st.sink else "softmax_flash_fwd",
  )(q, k, v, q_ids, kv_ids, sinks_nq)


# ----------------------------------------------------------------------------------- backward


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, st: _Static):
  """One program: a key tile of one (batch, key/value head); loops over query tiles and, in
  each, over the ``group`` query heads that read this key/value head, so that dk and dv are
  summed over the group in registers and written once, in K's dtype.

  ``q_ref``/``do_ref``: ``[T, group, H]``; ``lse_ref``/``delta_ref``: ``[group, T]``.
  """
  bq, bk = st.block_q_dkv, st.block_k_dkv
  k_start = pl.program_id(0) * bk
  num_q_blocks = q_ref.shape[0] // bq
  k, v = k_ref[...], v_ref[...]
  kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]
  zeros = jnp.zeros(k.shape, jnp.float32)

  def body(i, carry, masked):
    dk, dv = carry
    sl = pl.ds(i * bq, bq)
    q_ids = None if q_ids_ref is None else q_ids_ref[sl]
    for head in range(st.group):  # static: the group's query heads, one after another
      q = q_ref[sl, head, :]
      s = _logits2(q, k, st, i * bq, k_start, q_ids, kv_ids, masked)
      p = jnp.exp2(s - lse_ref[head, sl][:, None])  # lse in log2 units; masked entries give 0
      do = do_ref[sl, head, :]
      dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
      dp = _dot(do, v, trans_b=True)
      ds = p * (dp - delta_ref[head, sl][:, None])
      dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  carry = (zeros, zeros)
  if st.causal:
    # Query tiles before first_q see none of these keys; those from n_full on see all of them.
    first_q = jnp.minimum(lax.div(k_start, jnp.int32(bq)), num_q_blocks)
    n_full = jnp.clip(lax.div(k_start + (bk + bq - 2), jnp.int32(bq)), first_q, num_q_blocks)
    carry = lax.fori_loop(first_q, n_full, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(n_full, num_q_blocks, functools.partial(body, masked=False), carry)
  else:
    carry = lax.fori_loop(0, num_q_blocks, functools.partial(body, masked=False), carry)
  dk, dv = carry
  dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, st: _Static):
  """One program: a query tile of one (batch, head); loops over key tiles."""
  bq, bk = st.block_q_dq, st.block_k_dq
  q_start = pl.program_id(0) * bq
  num_k_blocks = k_ref.shape[0] // bk
  q, do = q_ref[...], do_ref[...]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq, masked):
    sl = pl.ds(j * bk, bk)
    k = k_ref[sl, :]
    kv_ids = None if kv_ids_ref is None else kv_ids_ref[sl]
    s = _logits2(q, k, st, q_start, j * bk, q_ids, kv_ids, masked)
    p = jnp.exp2(s - lse[:, None])
    dp = _dot(do, v_ref[sl, :], trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  if st.causal:
    n_full, n_end = _causal_ranges(q_start, bq, bk, num_k_blocks)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
  else:
    dq = lax.fori_loop(0, num_k_blocks, functools.partial(body, masked=False), dq)
  dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _backward_calls(q, k, v, ids, lse, do, delta, st: _Static):
  """dq, dk, dv on padded inputs; dk/dv per key/value head, summed over its query heads inside
  the kernel.

  ``lse`` includes the sink, so ``P = exp(S - lse)`` are the real keys' probabilities and the
  softmax backward ``dS = P * (dP - delta)`` holds for every kind.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = st.group
  # Residual rows in log2 units; an all-masked softmax row (lse = -inf) gets 0 so that
  # exp2(-inf - 0) = 0 rather than NaN.
  lse2 = jnp.where(jnp.isneginf(lse), 0.0, lse * _LOG2E)
  if ids is None:
    q_ids = kv_ids = None
  else:
    q_ids, kv_ids = ids
  params = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)

  # dq: grid (query tiles, B, N), query rows tiled, keys whole.
  qmap = lambda i, bi, ni: (bi, i, ni, 0)  # noqa: E731
  kmap_dq = lambda i, bi, ni: (bi, 0, ni // g, 0)  # noqa: E731
  rmap = lambda i, bi, ni: (bi, ni, i)  # noqa: E731
  bq = st.block_q_dq
  dq_id_specs = ([None, None] if ids is None else
                 [pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
                  pl.BlockSpec((None, s), lambda i, bi, ni: (bi, 0))])
  dq_specs = [pl.BlockSpec((None, bq, None, h), qmap), pl.BlockSpec((None, s, None, h), kmap_dq),
              pl.BlockSpec((None, s, None, h), kmap_dq), *dq_id_specs,
              pl.BlockSpec((None, bq, None, h), qmap), pl.BlockSpec((None, None, bq), rmap),
              pl.BlockSpec((None, None, bq), rmap)]

  args = (q, k, v, q_ids, kv_ids, do, lse2, delta)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(t // st.block_q_dq, b, n),
      in_specs=dq_specs,
      out_specs=pl.BlockSpec((None, st.block_q_dq, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=st.interpret, name="flash_bwd_dq",
  )(*args)
  # Grid over key/value heads: each program reads the ``g`` query heads of its group (block
  # ``g`` of the head axis) and writes its key tile's dk, dv once.
  bk = st.block_k_dkv
  kmap = lambda j, bi, ki: (bi, j, ki, 0)  # noqa: E731
  group_q = pl.BlockSpec((None, t, g, h), lambda j, bi, ki: (bi, 0, ki, 0))
  group_rows = pl.BlockSpec((None, g, t), lambda j, bi, ki: (bi, ki, 0))
  id_specs = ([None, None] if ids is None else
              [pl.BlockSpec((None, t), lambda j, bi, ki: (bi, 0)),
               pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j))])
  kv_tile = pl.BlockSpec((None, bk, None, h), kmap)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(s // bk, b, kh),
      in_specs=[group_q, kv_tile, kv_tile, *id_specs, group_q, group_rows, group_rows],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=st.interpret, name="flash_bwd_dkv",
  )(*args)
  return dq, dk, dv


def _sink_grad(sinks: jax.Array, lse: jax.Array, delta: jax.Array) -> jax.Array:
  """``dc_n = -sum_{b,t} exp(c_n - lse[b,n,t]) * delta[b,n,t]``: ``[N]``.

  The sink's probability is ``exp(c - lse)`` and ``d lse / dc`` equals it, so the output
  ``o = sum_j p_j v_j`` moves by ``do/dc = -exp(c - lse) * o``; with ``delta = rowsum(dO * O)``
  that is the sum above. Padded and key-less rows have ``dO = 0`` or ``O = 0``: no contribution.
  """
  share = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(sinks[None, :, None] - lse))
  return -jnp.sum(share * delta, axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, ids, sinks, st: _Static):
  return _forward_call(q, k, v, ids, sinks, st)[0]


def _flash_fwd(q, k, v, ids, sinks, st: _Static):
  o, lse = _forward_call(q, k, v, ids, sinks, st)
  return o, (q, k, v, ids, sinks, o, lse)


def _flash_bwd(st: _Static, res, do):
  q, k, v, ids, sinks, o, lse = res
  delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _backward_calls(q, k, v, ids, lse, do, delta, st)
  dsinks = None if sinks is None else _sink_grad(sinks, lse, delta)
  return dq, dk, dv, None, dsinks


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------ wrapper


def _tile(block: int, length: int) -> int:
  """The block size actually used: at most the padded length (power of two, >= 16)."""
  return min(block, max(16, _padding.next_power_of_2(length)))


def _prepare(query, key, value, softmax, sinks, is_causal, segment_ids, scale, block_sizes,
             interpret):
  """Checks and pads the inputs to tiles; returns padded (q, k, v, ids), the ``[N]`` float32
  sinks (None for softmax) and the static configuration."""
  _padding.check_kernel_args(query, key, value, softmax, None)
  sinks = resolve_sinks(softmax, sinks, (query.shape[2],))
  sinks = None if sinks is None else sinks.astype(jnp.float32)
  b, t, n, h = query.shape
  s, kh = key.shape[1], key.shape[2]
  bs = default_block_sizes(h, query.dtype) if block_sizes is None else block_sizes
  fields = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
  tiles = {f: _tile(getattr(bs, f), t if f.split("_")[1] == "q" else s) for f in fields}
  t_pad = _padding.round_up(t, max(tiles["block_q"], tiles["block_q_dkv"], tiles["block_q_dq"]))
  s_pad = _padding.round_up(s, max(tiles["block_k"], tiles["block_k_dkv"], tiles["block_k_dq"]))
  h_pad = max(16, _padding.next_power_of_2(h))
  st = _Static(
      sink=sinks is not None, causal=bool(is_causal),
      scale=_padding.resolve_scale(scale, h), kv_len=s, kv_pad=s_pad, group=n // kh, **tiles,
      num_warps=bs.num_warps or (4 if h_pad <= 64 else 8), num_stages=bs.num_stages,
      interpret=bool(interpret),
  )
  q = _padding.pad_axis(_padding.pad_axis(query, 1, t_pad), 3, h_pad)
  k = _padding.pad_axis(_padding.pad_axis(key, 1, s_pad), 3, h_pad)
  v = _padding.pad_axis(_padding.pad_axis(value, 1, s_pad), 3, h_pad)
  ids = _padding.padded_segment_ids(segment_ids, b, t, s, t_pad, s_pad)
  return q, k, v, ids, sinks, st


def flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    sinks: jax.Array | None = None,
) -> jax.Array:
  """Fused softmax-1 / softmax / learned-sink attention (Pallas Triton), differentiable.

  Args:
    query: ``[B, T, N, H]`` float32 / bfloat16 / float16.
    key: ``[B, S, K, H]`` with ``N % K == 0`` (grouped-query attention).
    value: ``[B, S, K, H]``.
    softmax: "softmax1" (default), "softmax" or "learned_sink" (needs ``sinks``).
    is_causal: query ``t`` sees keys ``<= t``; key tiles above the diagonal are skipped.
    segment_ids: ``[B, T]`` or ``(q [B, T], kv [B, S])``; no attention across segments.
    scale: logit scale, ``1/sqrt(H)`` of the unpadded ``H`` by default.
    block_sizes: tile sizes; None = ``default_block_sizes(H, dtype)`` (per head dim and dtype,
      sized for shared memory). Not yet tuned on a GPU.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
    sinks: ``[N]`` sink logits for ``softmax="learned_sink"`` (one per query head, in the units
      of the scaled logits); differentiable.

  Returns:
    ``[B, T, N, H]`` in the query's dtype; a query that may attend to nothing gives zeros.

  Example:
    >>> q = k = v = jnp.ones((1, 20, 2, 64))
    >>> flash_attention(q, k, v, softmax="softmax", interpret=True).shape
    (1, 20, 2, 64)
  """
  t, h = query.shape[1], query.shape[3]
  q, k, v, ids, sinks, st = _prepare(query, key, value, softmax, sinks, is_causal, segment_ids,
                                     scale, block_sizes, interpret)
  return _flash(q, k, v, ids, sinks, st)[:, :t, :, :h]


def _row_stats(top, first, st: _Static, t: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(row_max, first_logit, argmax_first)`` ``[B, N, T]`` from the kernel's ``top`` / ``first``.

  Tie rule: the query's first visible key is the argmax iff its score is >= the score of every
  other key the query may see (ties go to it, as ``argmax``'s first index). Decided here by
  ``first >= top``: both come from the same tile products in the same units, no constant
  between them. The logits are those products times ``|scale|``; ``-inf`` (nothing visible)
  stays ``-inf``.
  """
  top, first = top[:, :, :t], first[:, :, :t]
  size = abs(st.scale)
  to_logit = lambda d: jnp.where(jnp.isneginf(d), -jnp.inf, d * size)  # noqa: E731
  argmax_first = ~jnp.isneginf(first) & (first >= top)
  return to_logit(top), to_logit(first), argmax_first


def flash_stats(
    query: jax.Array,
    key: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    sinks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(lse, row_max, first_logit, argmax_first)``, each ``[B, N, T]``, from the forward kernel
  without the value product.

  ``lse`` is the log-normaliser (it includes the sink, so the sink's share is ``exp(c - lse)``,
  ``exp(-lse)`` for softmax-1); ``row_max`` is the largest real logit (``-inf`` for a query that
  sees no key); ``first_logit`` is the logit on the query's first visible key (the first token
  of its document under causal attention with ``segment_ids``, key 0 without them; ``-inf`` if
  it sees none); ``argmax_first`` (bool) says that key's score is >= every visible key's (ties
  go to it), decided from two outputs of the kernel's tile computation, the largest dot product
  ``q.k`` of the row and the first visible key's (times the sign of the scale), with no
  constant between them. Arguments as :func:`flash_attention`. Not differentiable (monitoring
  only).

  Example:
    >>> lse, row_max, first, hit = flash_stats(jnp.ones((1, 16, 2, 64)), jnp.ones((1, 16, 2, 64)),
    ...                                        interpret=True)
    >>> bool(hit.all())  # every score ties: key 0 wins
    True
  """
  t = query.shape[1]
  q, k, v, ids, sinks, st = _prepare(query, key, key, softmax, sinks, is_causal, segment_ids,
                                     scale, block_sizes, interpret)
  lse, top, first = _forward_call(q, k, v, ids, sinks, st, stats=True)
  return (lax.stop_gradient(lse[:, :, :t]),) + _row_stats(lax.stop_gradient(top),
                                                          lax.stop_gradient(first), st, t)

