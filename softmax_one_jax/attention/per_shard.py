"""Running a Pallas attention kernel once per shard of a device mesh (``jax.shard_map``).

XLA cannot partition a Pallas (Mosaic or Triton) kernel: called on arrays sharded over a mesh it
fails ("Mosaic kernels cannot be automatically partitioned"). Attention is independent across
examples and heads, so the kernel runs per shard: ``jax.shard_map`` over the mesh axes of the
batch and head dimensions hands each device its ``[B / batch_shards, T, N / head_shards, H]``
block, with no communication. The sequence stays whole on every device. Per-head operands (the
``[N]`` sink logits of learned-sink attention) are split like the heads.

Example:
  >>> sharding = AttentionSharding(batch=("data", "fsdp"), heads="tensor")
  >>> with jax.set_mesh(mesh):
  ...   out = dot_product_attention(q, k, v, is_causal=True, sharding=sharding)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax.sharding import PartitionSpec

MeshAxes = str | tuple[str, ...] | None


class AttentionSharding(NamedTuple):
  """Mesh axes that the batch and the head dimension of attention's inputs are split over.

  Attributes:
    batch: mesh axis (or axes) of ``B``; None keeps the batch whole on every device.
    heads: mesh axis (or axes) of the query heads ``N`` and the key/value heads ``K`` (both
      must divide by its size; grouped-query groups then stay on one device); None keeps
      every head on every device.
  """

  batch: MeshAxes = None
  heads: MeshAxes = None

  def btnh(self) -> PartitionSpec:
    """Spec of ``[B, T, N, H]`` queries, keys, values and outputs."""
    return PartitionSpec(self.batch, None, self.heads, None)

  def bnt(self) -> PartitionSpec:
    """Spec of ``[B, N, T]`` per-query statistics."""
    return PartitionSpec(self.batch, self.heads, None)

  def bt(self) -> PartitionSpec:
    """Spec of ``[B, T]`` segment ids."""
    return PartitionSpec(self.batch, None)

  def n(self) -> PartitionSpec:
    """Spec of ``[N]`` per-query-head operands (sink logits): split like the heads.

    Replicated over the batch axes; ``shard_map``'s transpose sums their gradient over them.
    """
    return PartitionSpec(self.heads)


def split_segment_arrays(segment_ids: Any) -> tuple[tuple[jax.Array, ...], tuple[str, ...],
                                                   Callable[[tuple[jax.Array, ...]], Any]]:
  """Segment ids (None, ``[B, T]`` or a ``(q, kv)`` pair) as arrays for ``run_per_shard``.

  Returns:
    ``(arrays, kinds, rebuild)``: the ``[B, *]`` arrays, their layouts ("bt" each), and the
    function that turns the per-shard arrays back into the caller's form.

  Example:
    >>> arrays, kinds, rebuild = split_segment_arrays((q_ids_bt, kv_ids_bs))
    >>> rebuild(arrays) == (q_ids_bt, kv_ids_bs)
  """
  if segment_ids is None:
    return (), (), lambda arrays: None
  if isinstance(segment_ids, (tuple, list)):
    return tuple(segment_ids), ("bt",) * len(segment_ids), tuple
  return (segment_ids,), ("bt",), lambda arrays: arrays[0]


def _is_trivial(sharding: AttentionSharding | None, mesh: Any) -> bool:
  return sharding is None or mesh.empty or (sharding.batch is None and sharding.heads is None
                                            and mesh.size == 1)


def run_per_shard(
    kernel: Callable[..., Any],
    sharding: AttentionSharding | None,
    arrays: tuple[jax.Array, ...],
    in_kinds: tuple[str, ...],
    out_kinds: Any,
) -> Any:
  """``kernel(*arrays)``, run once per shard when a mesh is in context and ``sharding`` is set.

  Args:
    kernel: a function of local arrays (the Pallas kernel call).
    sharding: the batch and head mesh axes; None calls ``kernel`` directly.
    arrays: its array arguments.
    in_kinds: per argument, its layout: "btnh" (``[B, T, N, H]``), "bt" (``[B, T]``) or "n"
      (``[N]``, per query head).
    out_kinds: the same for the outputs (a pytree of kinds, "bnt" allowed).

  Returns:
    ``kernel``'s outputs as global arrays.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if _is_trivial(sharding, mesh):
    return kernel(*arrays)
  spec = lambda kind: getattr(sharding, kind)()  # noqa: E731
  in_specs = tuple(spec(kind) for kind in in_kinds)
  out_specs = jax.tree.map(spec, out_kinds)
  # check_vma=False: a pallas_call does not declare how its outputs vary over the mesh axes.
  return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*arrays)
