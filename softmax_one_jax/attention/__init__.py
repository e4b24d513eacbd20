"""softmax-1 attention: one entry point that dispatches on ``implementation``.

Three normalisers (``softmax=``): "softmax1" (a virtual key of logit 0 and value 0), "softmax",
and "learned_sink" (a virtual key of logit ``sinks[n]`` per query head, differentiable), the same
on every path.

Paths: "xla" (``xla.py``: the attention of ``reference.py``, which materialises ``[B, N, T, S]``
and is the ground truth, without the blocks a causal mask hides; the CPU default), "cudnn"
(``cudnn.py``: cuDNN's fused flash attention over one extra zero key; GPU default where cuDNN
takes the call, else "xla"), "pallas_gpu" (``pallas_gpu.py``, our Triton flash kernel, forward
and backward; by name only until ``bench/gpu_check.sh`` has passed on a GPU) and "pallas_tpu"
(``pallas_tpu.py``, splash attention with zero sinks; TPU default). The
first-token statistics of the paper come from ``stats.py`` in O(seq) memory.

Example:
  >>> import jax.numpy as jnp
  >>> from softmax_one_jax.attention import dot_product_attention
  >>> q = k = v = jnp.ones((2, 16, 4, 64))
  >>> dot_product_attention(q, k, v, is_causal=True).shape
  (2, 16, 4, 64)
"""

from __future__ import annotations

import functools
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
from softmax_one_jax.attention import cudnn
from softmax_one_jax.attention._padding import KERNEL_DTYPES
from softmax_one_jax.attention.per_shard import (AttentionSharding, run_per_shard,
                                                 split_segment_arrays)
from softmax_one_jax.attention.stats import attention_stats, first_token_stats
from softmax_one_jax.attention.xla import xla_attention
from softmax_one_jax.sharding import target_platform
from softmax_one_jax.softmax import SOFTMAX_KINDS, resolve_sinks

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu")


def resolve_implementation(
    implementation: str | None,
    *,
    dtype: Any = jnp.float32,
    mask: jax.Array | None = None,
    interpret: bool = False,
    backend: str | None = None,
    softmax: str = "softmax1",
    head_dim: int | None = None,
    q_len: int | None = None,
    kv_len: int | None = None,
    is_causal: bool = True,
) -> str:
  """The concrete path ("xla", "cudnn", "pallas_gpu" or "pallas_tpu") that a call would take.

  None picks, on GPUs, "cudnn" where cuDNN is present and takes the call
  (``cudnn.unsupported_reason``: float16/bfloat16, head dim a multiple of 8 within cuDNN's
  limit, no dense mask, causal only over ``T == S``; segment ids are taken), else "xla"; on TPUs the
  splash kernel (zero sinks) unless a dense ``mask`` or a dtype it lacks is given; "xla" on
  CPU. The shape arguments (``softmax``, ``head_dim``, ...) feed the cuDNN rule; left out,
  they are not checked. ``"cudnn"`` by name is refused, with the reason, where the rule says no. The platform is ``backend`` if given, else that of the mesh in context, else JAX's
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
  if implementation == "cudnn" or (implementation is None and backend == "gpu"):
    reason = cudnn.unsupported_reason(
        softmax=softmax, dtype=dtype, head_dim=head_dim, q_len=q_len, kv_len=kv_len,
        is_causal=is_causal, mask=mask is not None)
    if implementation is None:
      return "cudnn" if reason is None and cudnn.cudnn_available() else "xla"
    if reason is not None:
      raise ValueError(f"implementation='cudnn' does not take {reason}; pass "
                       "implementation=None (which falls back to 'xla') or 'xla'.")
  if implementation is None:
    if mask is not None or jnp.dtype(dtype) not in KERNEL_DTYPES:
      return "xla"
    return "pallas_tpu" if backend == "tpu" else "xla"
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
    implementation: None (the platform's validated fast path: cuDNN on GPU where it takes the
      call, splash attention on TPU, XLA on CPU, with a dense ``mask`` and otherwise; see
      ``resolve_implementation``), "xla", "cudnn" (cuDNN flash attention over a zero key),
      "pallas" (the platform's Pallas kernel), "pallas_gpu" (our Triton flash kernel) or
      "pallas_tpu" (splash attention, zero sinks).
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
  impl = resolve_implementation(
      implementation, dtype=query.dtype, mask=mask, interpret=interpret, softmax=softmax,
      head_dim=query.shape[-1], q_len=query.shape[1], kv_len=key.shape[1], is_causal=is_causal)
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
  kwargs = dict(softmax=softmax, is_causal=is_causal, scale=scale)
  if impl == "cudnn":
    kernel = functools.partial(cudnn.null_key_attention, implementation="cudnn")
  elif impl == "pallas_gpu":
    from softmax_one_jax.attention import pallas_gpu  # pylint: disable=g-import-not-at-top
    kernel, kwargs["interpret"] = pallas_gpu.flash_attention, interpret
    kwargs["block_sizes"] = block_sizes
  else:
    from softmax_one_jax.attention import pallas_tpu  # pylint: disable=g-import-not-at-top
    if interpret is True:
      from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
      interpret = pltpu.InterpretParams()
    kernel, kwargs["interpret"] = pallas_tpu.flash_attention, interpret
    kwargs["block_sizes"] = block_sizes

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
