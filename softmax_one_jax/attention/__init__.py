"""softmax-1 attention: one entry point that dispatches on ``implementation``.

Three normalisers (``softmax=``): "softmax1" (a virtual key of logit 0 and value 0), "softmax",
and "learned_sink" (a virtual key of logit ``sinks[n]`` per query head, differentiable), the same
on every path.

Paths: "xla" (``xla.py``: the attention of ``reference.py``, which materialises ``[B, N, T, S]``
and is the ground truth, without the blocks a causal mask hides; the CPU default),
"pallas_gpu" (``pallas_gpu.py``, Triton flash kernel, forward and backward; GPU default) and
"pallas_tpu" (``pallas_tpu.py``, splash attention with zero sinks; TPU default). The
first-token statistics of the paper come from ``stats.py`` in O(seq) memory.

Example:
  >>> import jax.numpy as jnp
  >>> from softmax_one_jax.attention import dot_product_attention
  >>> q = k = v = jnp.ones((2, 16, 4, 64))
  >>> dot_product_attention(q, k, v, is_causal=True).shape
  (2, 16, 4, 64)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softmax_one_jax.attention.reference import (
    SegmentIds,
    attention_logits,
    check_shapes,
    combine_masks,
    reference_attention,
)
from softmax_one_jax.attention._padding import KERNEL_DTYPES
from softmax_one_jax.attention.per_shard import (AttentionSharding, run_per_shard,
                                                 split_segment_arrays)
from softmax_one_jax.attention.stats import attention_stats, first_token_stats
from softmax_one_jax.attention.xla import xla_attention
from softmax_one_jax.sharding import target_platform
from softmax_one_jax.softmax import SOFTMAX_KINDS, resolve_sinks

IMPLEMENTATIONS = (None, "xla", "pallas", "pallas_gpu", "pallas_tpu")


def resolve_implementation(
    implementation: str | None,
    *,
    dtype: Any = jnp.float32,
    mask: jax.Array | None = None,
    interpret: bool = False,
    backend: str | None = None,
) -> str:
  """The concrete path ("xla", "pallas_gpu" or "pallas_tpu") that a call would take.

  None picks the Pallas kernel of the platform (GPU: Triton flash kernel, TPU: splash attention
  with zero sinks) and "xla" on CPU, or when a dense ``mask`` or a dtype the kernels lack is
  given. The platform is ``backend`` if given, else that of the mesh in context, else JAX's
  default backend (``softmax_one_jax.sharding.target_platform``). "pallas" picks the platform's kernel; on CPU it needs ``interpret=True`` (tests) and
  then runs the GPU kernel in the interpreter.

  Example:
    >>> resolve_implementation(None, backend="gpu")
    'pallas_gpu'
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is not known; expected one of {IMPLEMENTATIONS}."
    )
  backend = backend or target_platform()
  if implementation is None:
    if mask is not None or jnp.dtype(dtype) not in KERNEL_DTYPES:
      return "xla"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "xla")
  if implementation == "pallas":
    if backend in ("gpu", "tpu"):
      return f"pallas_{backend}"
    if not interpret:
      raise ValueError(
          f"implementation='pallas' has no compiled kernel for the {backend!r} backend; pass "
          "interpret=True (tests) or implementation='xla'."
      )
    return "pallas_gpu"
  return implementation


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    softmax: str = "softmax1",
    is_causal: bool = False,
    mask: jax.Array | None = None,
    segment_ids: SegmentIds | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    block_sizes: Any = None,
    interpret: bool = False,
    sharding: AttentionSharding | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
  """Scaled dot-product attention with softmax-1 (default), softmax or learned sinks.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]``; ``N`` must be a multiple of ``K`` (grouped-query attention).
    value: ``[B, S, K, H]``.
    softmax: "softmax1", "softmax" or "learned_sink" (needs ``sinks``).
    is_causal: query ``t`` attends only to keys ``<= t`` (top-left aligned).
    mask: boolean broadcastable to ``[B, N, T, S]``, True = may attend (XLA path only).
    segment_ids: ``[B, T]`` or ``(q [B, T], kv [B, S])``; no attention across segments.
    scale: logit scale, ``1/sqrt(H)`` by default.
    implementation: None (the fastest correct path for the platform: the Pallas kernel on GPU
      and TPU, XLA on CPU or with a dense ``mask``), "xla", "pallas" (the platform's kernel),
      "pallas_gpu" (Triton flash kernel) or "pallas_tpu" (splash attention, zero sinks).
    block_sizes: tile sizes of the chosen kernel (``pallas_gpu.BlockSizes`` or
      ``pallas_tpu.BlockSizes``); None = defaults.
    interpret: run the Pallas kernel in the interpreter on CPU (tests); for "pallas_tpu" True
      means ``pltpu.InterpretParams()``.
    sharding: the mesh axes of the batch and head dimensions; under a mesh (``jax.set_mesh``
      or inside a step traced with ``jax.sharding.use_abstract_mesh``) a Pallas kernel then runs
      once per shard (``jax.shard_map``), which XLA cannot do for it. The XLA path ignores it.
    sinks: ``[N]`` float sink logits, one per query head, for ``softmax="learned_sink"`` (in the
      units of the scaled logits ``scale * q.k``; 0 is softmax-1, a very negative value softmax);
      rejected by the other kinds. Differentiable on every path.

  Returns:
    ``[B, T, N, H]`` in the query's dtype.

  Example:
    >>> q = k = v = jnp.ones((1, 8, 2, 16))
    >>> out = dot_product_attention(q, k, v, softmax="learned_sink", sinks=jnp.zeros(2))
  """
  # The one rule for (softmax, sinks), checked at the edge; the paths get learned sinks as arrays.
  sinks_n = resolve_sinks(softmax, sinks, (query.shape[-2],))
  sinks = sinks_n if softmax == "learned_sink" else None
  impl = resolve_implementation(implementation, dtype=query.dtype, mask=mask,
                                interpret=interpret)
  if impl == "xla":
    return xla_attention(
        query,
        key,
        value,
        softmax=softmax,
        is_causal=is_causal,
        mask=mask,
        segment_ids=segment_ids,
        scale=scale,
        sinks=sinks,
    )
  if mask is not None:
    raise ValueError(
        f"implementation={impl!r} takes is_causal and segment_ids, not a dense mask; pass "
        "implementation='xla' (or None) to use mask."
    )
  ids, ids_kinds, rebuild_ids = split_segment_arrays(segment_ids)
  kwargs = dict(softmax=softmax, is_causal=is_causal, scale=scale, block_sizes=block_sizes)
  if impl == "pallas_gpu":
    from softmax_one_jax.attention import pallas_gpu  # pylint: disable=g-import-not-at-top
    kernel, kwargs["interpret"] = pallas_gpu.flash_attention, interpret
  else:
    from softmax_one_jax.attention import pallas_tpu  # pylint: disable=g-import-not-at-top
    if interpret is True:
      from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
      interpret = pltpu.InterpretParams()
    kernel, kwargs["interpret"] = pallas_tpu.flash_attention, interpret

  # The sinks travel as a per-head operand, split like the heads; softmax has none.
  sink_args, sink_kinds = ((), ()) if sinks is None else ((sinks,), ("n",))

  def local(q, k, v, *rest):
    local_sinks = rest[0] if sink_args else None
    return kernel(q, k, v, segment_ids=rebuild_ids(rest[len(sink_args):]), sinks=local_sinks,
                  **kwargs)

  return run_per_shard(local, sharding, (query, key, value, *sink_args, *ids),
                       ("btnh", "btnh", "btnh", *sink_kinds, *ids_kinds), "btnh")


__all__ = [
    "IMPLEMENTATIONS",
    "SOFTMAX_KINDS",
    "AttentionSharding",
    "SegmentIds",
    "attention_logits",
    "attention_stats",
    "check_shapes",
    "combine_masks",
    "dot_product_attention",
    "first_token_stats",
    "reference_attention",
    "resolve_implementation",
    "xla_attention",
]
