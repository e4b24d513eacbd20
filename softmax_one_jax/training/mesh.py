"""Device mesh and the one table that maps logical axis names to mesh axes.

The models name every parameter dimension with a logical axis ("vocab", "embed", "heads",
"kv_heads", "mlp"); the batch dimension is "batch". ``LOGICAL_AXIS_RULES`` maps those names to
the mesh axes ``("data", "fsdp", "tensor")``. A rule whose mesh axes have size 1, or that does not
divide the dimension, or that reuses a mesh axis already taken by an earlier dimension of the same
array, falls back to replication for that dimension, so every model runs on every mesh.

Example:
  >>> mesh = make_mesh(data=1, fsdp=-1, tensor=1)            # all devices on fsdp
  >>> logical_to_mesh_spec(("embed", "mlp"), (512, 2048), mesh)
  PartitionSpec('fsdp',)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated). The ONE rules table.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("seq", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one ``-1`` entry to fill ``num_devices``; checks the product.

  Args:
    data, fsdp, tensor: mesh axis sizes; at most one may be -1 ("all remaining devices").
    num_devices: number of devices the mesh must cover exactly.

  Returns:
    ``(data, fsdp, tensor)`` with ``data * fsdp * tensor == num_devices``.

  Example:
    >>> resolve_mesh_shape(2, -1, 1, 8)
    (2, 4, 1)
  """
  sizes = [int(data), int(fsdp), int(tensor)]
  names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
  free = [i for i, s in enumerate(sizes) if s == -1]
  for name, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"{name}={s} is invalid: use a positive size or -1 (all remaining devices).")
  if len(free) > 1:
    raise ValueError(
        f"At most one mesh axis may be -1, got {dict(zip(names, sizes))}; give explicit sizes.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(
          f"Cannot fill the mesh: {num_devices} devices are not a multiple of the fixed axes' "
          f"product {known} ({dict(zip(names, sizes))}).")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} covers {math.prod(sizes)} devices but {num_devices} are "
        "available; make data * fsdp * tensor equal the device count or set one axis to -1.")
  return sizes[0], sizes[1], sizes[2]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh with ``jax.make_mesh`` (Auto axis types).

  Args:
    data, fsdp, tensor: axis sizes; one may be -1 (see ``resolve_mesh_shape``).
    devices: devices to use (default: all global devices).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.

  Example:
    >>> make_mesh(1, -1, 1).axis_names
    ('data', 'fsdp', 'tensor')
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rule_for(name: str | None, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise ValueError(
      f"Logical axis {name!r} has no entry in LOGICAL_AXIS_RULES "
      f"(known: {[r[0] for r in rules]}); add it to softmax_one_jax/training/mesh.py.")


def logical_to_mesh_spec(
    logical: Sequence[str | None] | PartitionSpec,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """Maps logical axis names of an array to a mesh ``PartitionSpec``.

  Per dimension, the mesh axes of its rule are kept only if their size is > 1, not yet used by
  an earlier dimension, and their product divides the dimension; otherwise that dimension is
  replicated. Trailing replicated dimensions are dropped.

  Args:
    logical: one logical name (or None) per dimension; may be shorter than ``shape``.
    shape: the array's shape.
    mesh: the device mesh.
    rules: the logical -> mesh table (default ``LOGICAL_AXIS_RULES``).

  Returns:
    A ``PartitionSpec`` over ``mesh``'s axis names.

  Example:
    >>> logical_to_mesh_spec(("vocab", "embed"), (4096, 128), make_mesh(1, 4, 2))
    PartitionSpec('tensor', 'fsdp')
  """
  used: set[str] = set()
  out: list[Any] = []
  for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))):
    axes = []
    size = 1
    for axis in _rule_for(name, rules):
      n = mesh.shape[axis]
      if n == 1 or axis in used or dim % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_sharding(logical: Sequence[str | None] | PartitionSpec, shape: Sequence[int],
                     mesh: Mesh) -> NamedSharding:
  """``NamedSharding`` for an array with logical axis names (see ``logical_to_mesh_spec``)."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical, shape, mesh))


def tree_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree of ``ShapeDtypeStruct`` given a matching pytree of logical specs.

  Args:
    abstract_tree: pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. an abstract ``nnx.State``).
    logical_specs: same structure, ``PartitionSpec`` of logical names per leaf (as returned by
      ``nnx.get_partition_spec``).
    mesh: the device mesh.

  Returns:
    Same structure, ``NamedSharding`` per leaf.
  """
  return jax.tree.map(
      lambda x, spec: logical_sharding(tuple(spec), x.shape, mesh), abstract_tree, logical_specs)


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, global_batch_size: int | None = None) -> NamedSharding:
  """Sharding of a ``[B, T]`` batch: B over the mesh axes of the "batch" rule (data, fsdp).

  Args:
    mesh: the device mesh.
    global_batch_size: B, to check divisibility; None assumes it divides.
  """
  shape = (global_batch_size if global_batch_size is not None else
           math.prod(mesh.shape[a] for a in _rule_for("batch", LOGICAL_AXIS_RULES)), 1)
  return logical_sharding(("batch", None), shape, mesh)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles this process's rows of a batch into global ``jax.Array`` s (multi-host safe).

  Args:
    local_batch: dict of numpy arrays ``[b, T]`` holding this process's ``b = B / process_count``
      rows (as yielded by ``softmax_one_jax.data.build_train_iterator``).
    sharding: the batch sharding (``batch_sharding(mesh, B)``).

  Returns:
    dict of global arrays ``[B, T]``.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
