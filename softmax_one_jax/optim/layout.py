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

A parameter of three or more axes is rotated, and its moments kept, as the matrix
``[d_0, d_1 * ... * d_{n-1}]`` (``matrix_view``: the same coordinates, row-major, and the same
``Q``). A shard's minor dimension then stays long: the fused q/k/v kernel ``[512, 8, 3, 64]``
with its ``fsdp`` axis moved off axis 0 would be ``[512, 8, 3, 4]`` per device, which a TPU's
(8, 128) tiles pad 32-fold; as ``[512, 1536]`` it is ``[512, 96]``.

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
    steps: ``(layout, axes)`` in order, on the parameter's ``matrix_view``: reshard to
      ``layout``, then apply the factors of ``axes`` (``None``: the whole rotation at once, for
      rotations that are not per-axis products).
    moments: the layout of the rotated gradient and of the moments (on the ``matrix_view``).
    shape: the parameter's shape.
    start: ``param`` on the ``matrix_view`` (where the first step starts and the last unrotate
      ends).
  """

  param: P
  steps: tuple[tuple[P, tuple[int, ...] | None], ...]
  moments: P
  shape: tuple[int, ...]
  start: P


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


def matrix_view(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape OrthoAdam's moments take, and its rotation runs in: ``[d_0, d_1 * ... * d_{n-1}]``
  for three or more axes (row-major: the same coordinates), the shape itself otherwise.

  Example:
    >>> matrix_view((512, 8, 3, 64)), matrix_view((768, 3072)), matrix_view(())
    ((512, 1536), (768, 3072), ())
  """
  shape = tuple(shape)
  return shape if len(shape) < 3 else (shape[0], math.prod(shape[1:]))


def _view_entries(entries: Entries) -> Entries:
  """A parameter's mesh axes on its ``matrix_view``: the merged axis keeps axis 1's (a shard of
  axis 1 is a contiguous range of it) when axes 2.. are unsharded; otherwise it is whole (the
  reshape gathers it; no parameter of the models is sharded there)."""
  if len(entries) < 3:
    return entries
  merged = entries[1] if not any(entries[2:]) else ()
  return (entries[0], merged)


def mixing_plan(original: tuple[int, ...], spec: P, mesh_shape: Mapping[str, int],
                separable: bool) -> MixingPlan:
  """The layouts in which each factor of a parameter's rotation runs locally.

  Greedy, on the ``matrix_view``: rotate every axis that is whole in the current layout; then
  move the mesh axes of one remaining (sharded) axis onto another dimension they divide,
  preferring one already rotated, or, where none fits, gather that axis. Repeat until every
  axis is rotated.

  Args:
    original: the parameter's shape.
    spec: its ``PartitionSpec`` (mesh axis names).
    mesh_shape: mesh axis name -> size.
    separable: the rotation is a product of per-axis factors (``rotations.axis_separable``).

  Returns:
    A ``MixingPlan``; on an unsharded parameter one step in its own layout.

  Example:
    >>> mixing_plan((3072,), P("fsdp"), {"fsdp": 4}, separable=True).steps
    ((PartitionSpec(), (0,)),)
  """
  param = _spec(_entries(spec, len(original)))
  entries = _view_entries(_entries(spec, len(original)))
  shape, start = matrix_view(original), _spec(entries)
  ndim = len(shape)
  if not separable:
    return MixingPlan(param, ((P(), None),), start, tuple(original), start)
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
  return MixingPlan(param, tuple(steps), _spec(last) if kept else start, tuple(original), start)


def plan_for(rotation: Any, shape: tuple[int, ...], sharding: Any) -> MixingPlan | None:
  """``mixing_plan`` for a parameter with this ``NamedSharding`` (None for any other sharding:
  the compiler then places the rotation)."""
  if not isinstance(sharding, NamedSharding):
    return None
  return mixing_plan(tuple(shape), sharding.spec, dict(sharding.mesh.shape),
                     axis_separable(rotation))


def _constrain(x: jax.Array, mesh: Any, spec: P) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _apply(rotation: Any, x: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...] | None,
           inverse: bool) -> jax.Array:
  """The factors of ``matrix_view`` axes ``axes`` (None: all of ``Q``) on ``x`` in the view.

  View axis 0 is the parameter's axis 0, applied in the view; the merged axis is whole wherever
  it is rotated, so the reshape to the parameter's axes there is local.
  """
  if axes is None:
    y = x.reshape(shape)
    return (rotation.unrotate(y) if inverse else rotation.rotate(y)).reshape(x.shape)
  if len(shape) < 3 or axes == (0,):
    return rotation.unrotate_axes(x, axes) if inverse else rotation.rotate_axes(x, axes)
  param_axes = (0,) * (0 in axes) + tuple(range(1, len(shape)))
  y = x.reshape(shape)
  y = rotation.unrotate_axes(y, param_axes) if inverse else rotation.rotate_axes(y, param_axes)
  return y.reshape(x.shape)


def rotate(rotation: Any, x: jax.Array, plan: MixingPlan | None, mesh: Any = None) -> jax.Array:
  """``Q vec(x)`` computed in ``plan``'s layouts; returned in ``plan.moments``, shaped
  ``matrix_view(x.shape)``.

  Example:
    >>> g_rot = rotate(rot, g, plan_for(rot, g.shape, sharding), sharding.mesh)
  """
  if plan is None:
    return rotation.rotate(x).reshape(matrix_view(x.shape))
  x = x.reshape(matrix_view(x.shape))
  for spec, axes in plan.steps:
    # Pinned on both sides, so that the compiler moves data only between steps.
    x = _constrain(x, mesh, spec)
    x = _constrain(_apply(rotation, x, plan.shape, axes, inverse=False), mesh, spec)
  return _constrain(x, mesh, plan.moments)


def unrotate(rotation: Any, y: jax.Array, shape: tuple[int, ...], plan: MixingPlan | None,
             mesh: Any = None) -> jax.Array:
  """``Q^T vec(y)`` for ``y`` in ``plan.moments`` (shaped ``matrix_view(shape)``), the plan
  walked backwards; returned shaped ``shape``, in ``plan.param``."""
  if plan is None:
    return rotation.unrotate(y.reshape(shape))
  for spec, axes in reversed(plan.steps):
    y = _constrain(y, mesh, spec)
    y = _constrain(_apply(rotation, y, plan.shape, axes, inverse=True), mesh, spec)
  y = _constrain(y, mesh, plan.start).reshape(shape)
  return _constrain(y, mesh, plan.param)
