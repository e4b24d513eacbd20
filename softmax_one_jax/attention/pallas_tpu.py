"""softmax-1 attention on TPU: JAX's Pallas splash attention with zero attention sinks.

Splash attention starts each query row from the running state ``m = sink, l = 1``; with a sink of
``0`` for every head this is exactly the virtual zero logit of softmax-1 (the sink is a logit whose
probability is dropped), and ``softmax="learned_sink"`` passes the caller's per-head sinks, whose
gradient splash returns. Plain softmax uses a sink of ``-1e30``: it contributes ``exp(-1e30 - m)
= 0`` to every row that sees a key, and makes a row that sees no key output zeros instead of the
average of masked values, as the reference does. Splash has Pallas TPU kernels for the forward
and both backward passes (dQ and dK/dV), skips key blocks above the causal diagonal, and takes
grouped-query attention natively (``N % K == 0``).

This module only adapts layouts: ``[B, T, N, H]`` to splash's per-example ``[N, T, H]``, the scale
(splash does not scale; ``q`` is pre-multiplied), padding of sequences to the 128-lane tiles
(padded keys get a segment id no query has), and segment ids.

Example:
  >>> from jax.experimental.pallas import tpu as pltpu
  >>> q = k = v = jnp.ones((1, 128, 2, 64))
  >>> flash_attention(q, k, v, interpret=pltpu.InterpretParams()).shape  # doctest: +SKIP
  (1, 128, 2, 64)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from softmax_one_jax.attention import _padding
from softmax_one_jax.attention.reference import SegmentIds
from softmax_one_jax.softmax import resolve_sinks

_SOFTMAX_SINK = -1e30  # "no sink": exp(-1e30 - m) == 0 for any reachable m
_LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Splash tile sizes (multiples of 128); each is shrunk to divide the padded sequence.

  Attributes:
    block_q, block_kv: forward tiles.
    block_q_bwd, block_kv_bwd: tiles of the dQ and dK/dV kernels.
  """

  block_q: int = 512
  block_kv: int = 512
  block_q_bwd: int = 512
  block_kv_bwd: int = 512

  def __post_init__(self):
    for field in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
      if getattr(self, field) % _LANES:
        raise ValueError(f"BlockSizes.{field}={getattr(self, field)} must be a multiple of 128.")


def _fit(block: int, length: int) -> int:
  """Largest multiple of 128 that is ``<= block`` and divides ``length`` (a multiple of 128)."""
  b = min(block, length)
  while length % b:
    b -= _LANES
  return b


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, t_pad: int, s_pad: int, causal: bool, bs: BlockSizes,
            interpret: Any) -> Any:
  """Builds (and caches: mask processing is numpy work) a splash kernel for one configuration."""
  head_mask = (splash.CausalMask((t_pad, s_pad)) if causal else splash.FullMask((t_pad, s_pad)))
  mask = splash.MultiHeadMask([head_mask] * num_heads)
  bq, bkv = _fit(bs.block_q, t_pad), _fit(bs.block_kv, s_pad)
  bq_b, bkv_b = _fit(bs.block_q_bwd, t_pad), _fit(bs.block_kv_bwd, s_pad)
  sizes = splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq_b, block_kv_dkv=bkv_b, block_kv_dkv_compute=bkv_b,
      block_q_dq=bq_b, block_kv_dq=bkv_b,
  )
  with jax.ensure_compile_time_eval():  # concrete mask arrays: safe to cache across traces
    return splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _segment_ids(segment_ids, batch, t, s, t_pad, s_pad):
  """Per-example splash segment ids ``(q [B, T_pad], kv [B, S_pad])``, or None if not needed.

  Without segment ids but with padded keys, every real token gets id 0 and padding a lower id.
  """
  if segment_ids is None:
    if s_pad == s:
      return None
    segment_ids = (jnp.zeros((batch, t), jnp.int32), jnp.zeros((batch, s), jnp.int32))
  return _padding.padded_segment_ids(segment_ids, batch, t, s, t_pad, s_pad)


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
    interpret: Any = False,
    sinks: jax.Array | None = None,
) -> jax.Array:
  """softmax-1 / softmax / learned-sink attention through splash attention (Pallas TPU).

  Args:
    query: ``[B, T, N, H]`` float32 / bfloat16.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, H]``.
    softmax: "softmax1" (zero sinks), "softmax" or "learned_sink" (needs ``sinks``).
    is_causal: query ``t`` sees keys ``<= t``.
    segment_ids: ``[B, T]`` or ``(q [B, T], kv [B, S])``.
    scale: logit scale, ``1/sqrt(H)`` by default.
    block_sizes: splash tiles.
    interpret: False on TPU; ``pltpu.InterpretParams()`` runs the TPU kernels on CPU.
    sinks: ``[N]`` sink logits for ``softmax="learned_sink"`` (one per query head, in the units
      of the scaled logits); differentiable (splash's backward returns their gradient).

  Returns:
    ``[B, T, N, H]`` in the query's dtype.
  """
  _padding.check_kernel_args(query, key, value, softmax, None)
  b, t, n, h = query.shape
  sinks_n = resolve_sinks(softmax, sinks, (n,))
  # No sink (softmax): a constant far below every logit, so empty rows still output zeros.
  sinks_n = (jnp.full((n,), _SOFTMAX_SINK, jnp.float32) if sinks_n is None else
             sinks_n.astype(jnp.float32))
  s = key.shape[1]
  t_pad, s_pad = _padding.round_up(t, _LANES), _padding.round_up(s, _LANES)
  scale = _padding.resolve_scale(scale, h)
  q = (query.astype(jnp.float32) * scale).astype(query.dtype)
  q_bnth = jnp.swapaxes(_padding.pad_axis(q, 1, t_pad), 1, 2)
  k_bksh = jnp.swapaxes(_padding.pad_axis(key, 1, s_pad), 1, 2)
  v_bksh = jnp.swapaxes(_padding.pad_axis(value, 1, s_pad), 1, 2)
  ids = _segment_ids(segment_ids, b, t, s, t_pad, s_pad)
  bs = block_sizes or BlockSizes()
  if ids is None:  # fold the batch into the heads: one kernel, b*n query heads, b*k kv heads
    kernel = _kernel(b * n, t_pad, s_pad, bool(is_causal), bs, interpret)
    fold = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    # Folded head bi * n + ni is head ni of example bi; tiling makes the sinks' gradient the sum
    # over the batch.
    out = kernel(fold(q_bnth), fold(k_bksh), fold(v_bksh), sinks=jnp.tile(sinks_n, b))
    out_bnth = out.reshape(b, n, t_pad, -1)
  else:  # segment ids differ per example: map the kernel over the batch
    kernel = _kernel(n, t_pad, s_pad, bool(is_causal), bs, interpret)
    # The sinks are closed over: autodiff sums their gradient over the examples.
    one = lambda x: kernel(x[0], x[1], x[2], splash.SegmentIds(q=x[3], kv=x[4]),  # noqa: E731
                           sinks=sinks_n)
    xs = (q_bnth, k_bksh, v_bksh, *ids)
    # The Pallas TPU interpreter cannot vmap a gridded kernel; on TPU vmap adds a grid axis.
    out_bnth = jax.lax.map(one, xs) if interpret else jax.vmap(one)(xs)
  return jnp.swapaxes(out_bnth, 1, 2)[:, :t].astype(query.dtype)
