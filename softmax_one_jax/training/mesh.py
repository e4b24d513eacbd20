"""The device mesh of a run and the shardings of its parameters, state and batches.

Logical axis names map to mesh axes through the one rules table of ``softmax_one_jax.sharding``
(``LOGICAL_AXIS_RULES``, re-exported here); a rule that cannot apply to a dimension replicates it.

Devices of several TPU slices (each with its ``slice_index``, e.g. from ``--topology=2xv5e:4x4``)
get a hybrid mesh: the ``data`` axis is split over the data-centre network (DCN), one factor per
slice, and ``fsdp`` and ``tensor`` stay inside a slice, on its ICI links: only the reductions
over the batch (the gradient's, the loss's) cross slices.

Example:
  >>> mesh = make_mesh(data=1, fsdp=-1, tensor=1)            # all devices on fsdp
  >>> logical_to_mesh_spec(("embed", "mlp"), (512, 2048), mesh)
  PartitionSpec('fsdp',)
  >>> dcn_axes(make_mesh(data=2, fsdp=-1, devices=two_slices))  # data=2: one row per slice
  {'data': 2, 'fsdp': 1, 'tensor': 1}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from softmax_one_jax.errors import ConfigError
from softmax_one_jax.sharding import (LOGICAL_AXIS_RULES, MESH_AXES, logical_sharding,
                                      logical_to_mesh_spec, tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "dcn_axes", "global_batch",
           "hybrid_device_grid", "logical_sharding", "logical_to_mesh_spec", "make_mesh",
           "num_slices", "replicated", "resolve_hybrid_shape", "resolve_mesh_shape",
           "tree_shardings"]

Shape = tuple[int, int, int]


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


def num_slices(devices: Sequence[Any]) -> int:
  """How many slices the devices span: distinct ``slice_index`` values, 1 for devices without one.

  Example:
    >>> num_slices(jax.devices("cpu")), num_slices(slice_devices("2xv5e:4x4"))
    (1, 2)
  """
  return len({getattr(d, "slice_index", 0) for d in devices}) or 1


def resolve_hybrid_shape(data: int, fsdp: int, tensor: int, dcn_data: int, num_devices: int,
                         slices: int) -> tuple[Shape, Shape]:
  """The mesh's shape inside one slice (ICI) and across slices (DCN), as ``(data, fsdp, tensor)``.

  ``data``, ``fsdp`` and ``tensor`` size the whole mesh (one may be -1, see
  ``resolve_mesh_shape``); the data axis is ``dcn_data`` (one factor per slice) times its part
  inside a slice, and fsdp and tensor lie inside a slice.

  Args:
    data, fsdp, tensor: the mesh's axis sizes over all devices (``config.mesh``).
    dcn_data: the data axis's factor across slices: 0 for the number of slices, else that number.
    num_devices: devices of all the slices together.
    slices: how many slices they form (``num_slices``).

  Returns:
    ``(ici_shape, dcn_shape)``, whose elementwise product is the mesh's shape; on one slice
    ``dcn_shape == (1, 1, 1)``.

  Raises:
    ConfigError: naming the field to change.

  Example:
    >>> resolve_hybrid_shape(2, -1, 1, 0, 32, 2)
    ((1, 16, 1), (2, 1, 1))
    >>> resolve_hybrid_shape(1, -1, 1, 0, 16, 1)
    ((1, 16, 1), (1, 1, 1))
  """
  if not isinstance(dcn_data, int) or isinstance(dcn_data, bool) or dcn_data < 0:
    raise ConfigError(
        f"mesh.dcn_data={dcn_data!r} is invalid: use 0 (the data axis takes one factor per slice) "
        "or the number of slices.")
  dcn = dcn_data or slices
  if dcn != slices:
    where = ("one slice: compile for several, e.g. --topology=2xv5e:4x4, or" if slices == 1
             else f"{slices} slices, and only the data axis crosses them (one factor per slice):")
    raise ConfigError(
        f"mesh.dcn_data={dcn_data} does not match the devices, which form {where} set "
        f"mesh.dcn_data=0 (the number of slices) or {slices}.")
  if num_devices % slices:
    raise ConfigError(f"{num_devices} devices do not split evenly into {slices} slices; give "
                      "slices of one topology (e.g. --topology=2xv5e:4x4).")
  data, fsdp, tensor = resolve_mesh_shape(data, fsdp, tensor, num_devices)
  if data % dcn:
    raise ConfigError(
        f"mesh.data={data} does not split over the {dcn} slices: data is the one axis across "
        f"slices, so it must be a multiple of {dcn}; set --config.mesh.data={dcn} (or a multiple; "
        "fsdp and tensor then stay inside a slice).")
  return (data // dcn, fsdp, tensor), (dcn, 1, 1)


def hybrid_device_grid(ici_shape: Sequence[int], dcn_shape: Sequence[int],
                       devices: Sequence[Any]) -> np.ndarray:
  """The devices of several slices as a ``ici_shape * dcn_shape`` array, slice by slice.

  Each slice's block is laid over its torus as ``jax.make_mesh`` lays one slice; the blocks are
  stacked along the axes of ``dcn_shape`` (``create_hybrid_device_mesh``), so on the data axis the
  slice index changes every ``ici_shape[0]`` rows.

  Example:
    >>> grid = hybrid_device_grid((1, 16, 1), (2, 1, 1), slice_devices("2xv5e:4x4"))
    >>> [{d.slice_index for d in row.flat} for row in grid]
    [{0}, {1}]
  """
  # Splitting a physical axis is allowed where needed (jax.make_mesh allows it on v5e).
  return mesh_utils.create_hybrid_device_mesh(
      tuple(ici_shape), tuple(dcn_shape), list(devices), allow_split_physical_axes=True)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, dcn_data: int = 0) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh (Auto axis types); hybrid over several slices.

  On one slice this is ``jax.make_mesh``. Devices of several slices get
  ``hybrid_device_grid``: the data axis spans the slices, fsdp and tensor stay inside one.

  Args:
    data, fsdp, tensor: axis sizes over all devices; one may be -1 (see ``resolve_mesh_shape``).
    devices: devices to use (default: all global devices).
    dcn_data: the data axis's factor across slices (see ``resolve_hybrid_shape``; 0: one per
      slice).

  Returns:
    A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.

  Example:
    >>> make_mesh(1, -1, 1).axis_names
    ('data', 'fsdp', 'tensor')
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices(devices)
  ici, dcn = resolve_hybrid_shape(data, fsdp, tensor, dcn_data, len(devices), slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(hybrid_device_grid(ici, dcn, devices), MESH_AXES, axis_types=axis_types)


def dcn_axes(mesh: Mesh) -> dict[str, int]:
  """How many slices each mesh axis spans (1: the axis lies inside a slice, on ICI).

  Example:
    >>> dcn_axes(make_mesh(2, -1, 1, devices=slice_devices("2xv5e:4x4")))
    {'data': 2, 'fsdp': 1, 'tensor': 1}
  """
  slice_of = np.vectorize(lambda d: getattr(d, "slice_index", 0), otypes=[int])(mesh.devices)
  spans = {}
  for i, name in enumerate(mesh.axis_names):
    lines = np.moveaxis(slice_of, i, 0).reshape(slice_of.shape[i], -1)
    spans[name] = max(len(set(lines[:, j])) for j in range(lines.shape[1]))
  return spans


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
