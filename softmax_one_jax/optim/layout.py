"""Where OrthoAdam's rotation runs on a sharded parameter: one axis at a time, in its own layout.

The default rotations are Kronecker products, ``Q = Q_0 (x) Q_1 (x) ...``: factor ``Q_i`` mixes
axis ``i`` across its whole length and reads no other axis. It therefore runs without any
communication in a layout where axis ``i`` is whole on every device. A parameter sharded over
axis ``i`` (FSDP shards ``embed``) is moved to such a layout first, by moving the mesh axes of
dimension ``i`` onto another dimension: an all-to-all that sends about one shard's bytes per
device, far below the all-gather of the whole parameter that rotating a sharded axis in place
costs. ``Q`` itself is the same on every mesh (``rotations.py``); only where it is computed
changes.

A ``MixingPlan`` is that sequence of layouts, each with the axes rotated in it. The moments
live in the plan's last layout (as many bytes per device as the parameter's own layout), so one
step of OrthoAdam moves the gradient there (``rotate``) and the update back (``unrotate``): two
all-to-alls per sharded matrix per step. A dimension whose mesh axes fit on no other dimension
(a sharded vector, say a norm's gain) is gathered, rotated and sliced back (its moments keep the
parameter's layout); so is a rotation that is not a product of per-axis factors ("dense",
"block", blocked axes).

Example:
  >>> plan = mixing_plan((768, 3072), P("fsdp", None), {"fsdp": 4}, separable=True)
  >>> plan.steps
  ((PartitionSpec('fsdp',), (1,)), (PartitionSpec(None, 'fsdp'), (0,)))
  >>> plan.moments
  PartitionSpec(None, 'fsdp')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from softmax_one_jax.optim.rotations import axis_separable

Entries = tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class MixingPlan:
  """The layouts one parameter's rotation runs in.

  Attributes:
    param: the parameter's (and gradient's, and update's) ``PartitionSpec``.
    steps: ``(layout, axes)`` in order: reshard to ``layout``, then apply the factors of ``axes``
      (``None``: the whole rotation at once, for rotations that are not per-axis products).
    moments: the layout of the rotated gradient and of the moments.
  """

  param: P
  steps: tuple[tuple[P, tuple[int, ...] | None], ...]
  moments: P


def _entries(spec: P, ndim: int) -> Entries:
  out = []
  for e in tuple(spec) + (None,) * (ndim - len(tuple(spec))):
    out.append(() if e is None else (e,) if isinstance(e, str) else tuple(e))
  return tuple(out)


def _spec(entries: Entries) -> P:
  parts = [None if not e else e[0] if len(e) == 1 else e for e in entries]
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def _size(axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> int:
  return math.prod(mesh_shape[a] for a in axes)


def mixing_plan(shape: tuple[int, ...], spec: P, mesh_shape: Mapping[str, int],
                separable: bool) -> MixingPlan:
  """The layouts in which each factor of a parameter's rotation runs locally.

  Greedy: rotate every axis that is whole in the current layout; then move the mesh axes of one
  remaining (sharded) axis onto another dimension they divide, preferring one already rotated,
  or, where none fits, gather that axis. Repeat until every axis is rotated.

  Args:
    shape: the parameter's shape.
    spec: its ``PartitionSpec`` (mesh axis names).
    mesh_shape: mesh axis name -> size.
    separable: the rotation is a product of per-axis factors (``rotations.axis_separable``).

  Returns:
    A ``MixingPlan``; on an unsharded parameter one step in its own layout.

  Example:
    >>> mixing_plan((3072,), P("fsdp"), {"fsdp": 4}, separable=True).steps
    ((PartitionSpec(), (0,)),)
  """
  ndim = len(shape)
  entries = _entries(spec, ndim)
  param = _spec(entries)
  if not separable:
    return MixingPlan(param, ((P(), None),), param)
  steps: list[tuple[P, tuple[int, ...]]] = []
  remaining = list(range(ndim))
  current = list(entries)
  while remaining:
    local = tuple(i for i in remaining if not current[i])
    if local:
      steps.append((_spec(tuple(current)), local))
      remaining = [i for i in remaining if i not in local]
      continue
    i = remaining[0]
    moved = current[i]
    fits = [j for j in range(ndim) if j != i
            and shape[j] % (_size(current[j], mesh_shape) * _size(moved, mesh_shape)) == 0]
    fits.sort(key=lambda j: j in remaining)     # an axis already rotated first
    if fits:
      current[fits[0]] = current[fits[0]] + moved
    current[i] = ()
  last = tuple(current)
  kept = sorted(a for e in last for a in e) == sorted(a for e in entries for a in e)
  return MixingPlan(param, tuple(steps), _spec(last) if kept else param)


def plan_for(rotation: Any, shape: tuple[int, ...], sharding: Any) -> MixingPlan | None:
  """``mixing_plan`` for a parameter with this ``NamedSharding`` (None for any other sharding:
  the compiler then places the rotation)."""
  if not isinstance(sharding, NamedSharding):
    return None
  return mixing_plan(tuple(shape), sharding.spec, dict(sharding.mesh.shape),
                     axis_separable(rotation))


def _constrain(x: jax.Array, mesh: Any, spec: P) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def rotate(rotation: Any, x: jax.Array, plan: MixingPlan | None, mesh: Any = None) -> jax.Array:
  """``Q vec(x)`` computed in ``plan``'s layouts; returned in ``plan.moments``.

  Example:
    >>> g_rot = rotate(rot, g, plan_for(rot, g.shape, sharding), sharding.mesh)
  """
  if plan is None:
    return rotation.rotate(x)
  for spec, axes in plan.steps:
    # Pinned on both sides, so that the compiler moves data only between steps.
    x = _constrain(x, mesh, spec)
    x = _constrain(rotation.rotate(x) if axes is None else rotation.rotate_axes(x, axes),
                   mesh, spec)
  return _constrain(x, mesh, plan.moments)


def unrotate(rotation: Any, y: jax.Array, plan: MixingPlan | None, mesh: Any = None
             ) -> jax.Array:
  """``Q^T vec(y)`` for ``y`` in ``plan.moments``, the plan walked backwards; returned in
  ``plan.param``."""
  if plan is None:
    return rotation.unrotate(y)
  for spec, axes in reversed(plan.steps):
    y = _constrain(y, mesh, spec)
    y = _constrain(rotation.unrotate(y) if axes is None else rotation.unrotate_axes(y, axes),
                   mesh, spec)
  return _constrain(y, mesh, plan.param)
