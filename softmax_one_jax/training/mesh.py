"""The device mesh of a run and the shardings of its parameters, state and batches.

Logical axis names map to mesh axes through the one rules table of ``softmax_one_jax.sharding``
(``LOGICAL_AXIS_RULES``, re-exported here); a rule that cannot apply to a dimension replicates it.

Example:
  >>> mesh = make_mesh(data=1, fsdp=-1, tensor=1)            # all devices on fsdp
  >>> logical_to_mesh_spec(("embed", "mlp"), (512, 2048), mesh)
  PartitionSpec('fsdp',)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from softmax_one_jax.errors import ConfigError
from softmax_one_jax.sharding import (LOGICAL_AXIS_RULES, MESH_AXES, logical_sharding,
                                      logical_to_mesh_spec, tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "global_batch", "logical_sharding",
           "logical_to_mesh_spec", "make_mesh", "replicated", "resolve_mesh_shape",
           "tree_shardings"]


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
      raise ConfigError(
          f"{name}={s} is invalid: use a positive size or -1 (all remaining devices).")
  if len(free) > 1:
    raise ConfigError(
        f"At most one mesh axis may be -1, got {dict(zip(names, sizes))}; give explicit sizes.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ConfigError(
          f"Cannot fill the mesh: {num_devices} devices are not a multiple of the fixed axes' "
          f"product {known} ({dict(zip(names, sizes))}).")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
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


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, global_batch_size: int | None = None) -> NamedSharding:
  """Sharding of a ``[B, T]`` batch: B over the mesh axes of the "batch" rule (data, fsdp).

  Args:
    mesh: the device mesh.
    global_batch_size: B, to check divisibility; None assumes it divides.
  """
  shape = (mesh.size if global_batch_size is None else global_batch_size, 1)
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
