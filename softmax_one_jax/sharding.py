"""Logical axis names, the one table that maps them to mesh axes, and the mesh in context.

Every parameter dimension of the models carries a logical name ("vocab", "embed", "heads",
"kv_heads", "mlp"), and so does every activation the model constrains ("batch", "seq",
"heads", ...). ``LOGICAL_AXIS_RULES`` maps those names to the mesh axes ``("data", "fsdp",
"tensor")``. A rule whose mesh axes have size 1, are missing from the mesh, do not divide the
dimension or are already taken by an earlier dimension of the same array falls back to
replication for that dimension, so every model runs on every mesh.

This module sits below ``models``, ``attention`` users and ``training``: the training step traces
the model under its mesh (``jax.sharding.use_abstract_mesh``), and the model asks here for the
mesh in context to constrain activations and to run Pallas kernels per shard. Outside a mesh
(plain ``jax.jit`` or eager calls) every helper is a no-op.

Example:
  >>> mesh = jax.make_mesh((1, 4, 2), MESH_AXES)
  >>> logical_to_mesh_spec(("batch", "seq", "heads"), (8, 128, 6), mesh)
  PartitionSpec('fsdp', None, 'tensor')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated). The ONE rules table.
# Parameters: "embed" over fsdp (FSDP shards weights), "heads"/"kv_heads"/"mlp"/"vocab" over
# tensor. Activations: "batch" over data and fsdp; their model width ("act_embed") is never
# sharded, so FSDP gathers weights, not activations.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("seq", None),
    ("act_embed", None),
)

AnyMesh = Mesh | AbstractMesh


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
      f"(known: {[r[0] for r in rules]}); add it to softmax_one_jax/sharding.py.")


def logical_to_mesh_spec(
    logical: Sequence[str | None] | PartitionSpec,
    shape: Sequence[int],
    mesh: AnyMesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
  """Maps logical axis names of an array to a mesh ``PartitionSpec``.

  Per dimension, the mesh axes of its rule are kept only if the mesh has them with size > 1,
  they are not yet used by an earlier dimension, and their product divides the dimension;
  otherwise that dimension is replicated. Trailing replicated dimensions are dropped.

  Args:
    logical: one logical name (or None) per dimension; may be shorter than ``shape``.
    shape: the array's shape.
    mesh: the device mesh (concrete or abstract).
    rules: the logical -> mesh table (default ``LOGICAL_AXIS_RULES``).

  Returns:
    A ``PartitionSpec`` over ``mesh``'s axis names.

  Example:
    >>> logical_to_mesh_spec(("vocab", "embed"), (4096, 128), jax.make_mesh((1, 4, 2), MESH_AXES))
    PartitionSpec('tensor', 'fsdp')
  """
  used: set[str] = set()
  out: list[Any] = []
  names = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
  for dim, name in zip(shape, names):
    axes: list[str] = []
    size = 1
    for axis in _rule_for(name, rules):
      n = mesh.shape.get(axis, 1)
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


def current_mesh() -> AbstractMesh | None:
  """The mesh in context (``jax.set_mesh`` or ``jax.sharding.use_abstract_mesh``), else None.

  Example:
    >>> with jax.set_mesh(mesh):
    ...   current_mesh().shape
  """
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def target_platform() -> str:
  """The platform the code is being built for: the context mesh's devices', else the default
  backend's ("cpu", "gpu" or "tpu").

  A program compiled ahead of time for a TPU slice on a CPU host runs under a mesh of TPU
  devices, so it takes the TPU paths although ``jax.default_backend()`` is "cpu" there.

  Example:
    >>> target_platform()
    'cpu'
  """
  mesh = current_mesh()
  device = getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return jax.default_backend() if platform is None else platform_family(platform)


def platform_family(platform: str) -> str:
  """A device's platform as jax's backends name it: "cuda" and "rocm" devices are "gpu".

  Example:
    >>> platform_family("cuda"), platform_family("tpu")
    ('gpu', 'tpu')
  """
  return "gpu" if platform in ("cuda", "rocm") else platform


def spec_in_context(logical: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
  """``logical_to_mesh_spec`` on the mesh in context; None outside a mesh."""
  mesh = current_mesh()
  return None if mesh is None else logical_to_mesh_spec(logical, shape, mesh)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """``x`` constrained to the sharding of its logical axis names on the mesh in context.

  A no-op outside a mesh, and on a mesh whose axes are all of size 1. Inside ``jax.jit`` this
  pins activations (e.g. ``("batch", "seq", "act_embed")``: batch over data and fsdp, width
  whole), so that XLA's propagation gathers the FSDP-sharded weights rather than the activations.

  Example:
    >>> x_btd = constrain(x_btd, ("batch", "seq", "act_embed"))
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, x.shape, mesh))
