"""Shardings for optimizer states of any optax chain, OrthoAdam's included.

``flax.nnx.Optimizer`` stamps the parameter's sharding onto every state leaf, which is wrong for
arrays that are not parameter-shaped (rotation matrices) and for OrthoAdam's moments, which live
in the layout their rotation ends in. Here:

- a param-structured subtree whose leaves have their param's shape (Adam moments, MultiSteps'
  accumulated gradients, masked variants) takes the params' shardings;
- OrthoAdam's moments take their ``layout.MixingPlan``'s ``moments`` layout (the same bytes per
  device as the parameter, a sharded axis moved to where the rotation leaves it);
- an OrthoAdam rotation is replicated (small for "hadamard"; a one-block Kronecker factor is
  applied where its axis is whole), except arrays of blocked axes and "block" rotations:

  ==================  ======================================================================
  ``KroneckerRotation`` blocked factor ``[k_i, b_i, b_i]``: leading axis sharded like param
                       axis ``i`` (each device holds its blocks)
  ``BlockRotation``    the block axis sharded over all the param's mesh axes when divisible
  ``HadamardRotation`` blocked ``[k_i, b_i]`` / ``[k_i, m_i, m_i]`` arrays: leading axis sharded
                       like param axis ``i``
  ==================  ======================================================================

  and a mesh axis is dropped from a dimension it does not divide;
- everything else (counts, injected hyper-parameters, scalars) is replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from softmax_one_jax.optim import layout as layout_lib
from softmax_one_jax.optim import rotations as rot_lib
from softmax_one_jax.optim.orthoadam import ScaleByOrthoAdamState

_EMPTY = (optax.MaskedNode, type(None))


def _axis_size(mesh: jax.sharding.Mesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def _fit(mesh, spec_entries: tuple, shape: tuple[int, ...]) -> PartitionSpec:
  """``spec_entries`` padded to ``shape``'s rank, a mesh axis dropped where it does not divide."""
  entries = list(spec_entries) + [None] * (len(shape) - len(spec_entries))
  return PartitionSpec(
      *[e if d % _axis_size(mesh, e) == 0 else None for e, d in zip(entries, shape)]
  )


def rotation_shardings(rotation: Any, param_sharding: jax.sharding.Sharding) -> Any:
  """Shardings (the rotation's own pytree) for one parameter's rotation state."""
  if not isinstance(param_sharding, NamedSharding):
    return jax.tree.map(lambda _: param_sharding, rotation)
  mesh = param_sharding.mesh
  spec = tuple(param_sharding.spec)
  spec = spec + (None,) * 16  # Axes past the spec's length are unsharded.
  named = lambda s: NamedSharding(mesh, s)
  replicated = named(PartitionSpec())
  if isinstance(rotation, rot_lib.KroneckerRotation):
    # A one-block factor is applied where its axis is whole (layout.py): replicated. A blocked
    # axis's factor [k_i, b_i, b_i]: block j on the device holding block j of the param.
    return rot_lib.KroneckerRotation(
        tuple(named(_fit(mesh, (spec[i],), f.shape)) if f.ndim == 3 else replicated
              for i, f in enumerate(rotation.factors))
    )
  if isinstance(rotation, rot_lib.HadamardRotation):
    # A blocked axis's arrays ([k_i, b_i] signs / permutations, [k_i, m_i, m_i] mixes) lead with
    # the block axis: block j on the device holding block j of the param.
    counts = rotation.block_counts()
    return jax.tree.map(
        lambda x, axis: (named(_fit(mesh, (spec[axis],), x.shape)) if counts[axis] > 1
                         else replicated),
        rotation, rotation.leaf_axes(),
    )
  if isinstance(rotation, rot_lib.BlockRotation):
    mesh_axes = tuple(
        n for e in spec if e is not None for n in (e if isinstance(e, tuple) else (e,))
    )
    full = tuple(
        named(_fit(mesh, (mesh_axes or None, None, None), b.shape)) for b in rotation.full
    )
    return rot_lib.BlockRotation(full, tuple(replicated for _ in rotation.tail))
  return jax.tree.map(lambda _: replicated, rotation)


def optimizer_state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any
) -> Any:
  """Shardings for ``tx.init(params)``, without building the state.

  Args:
    tx: any optax transformation (a chain, ``inject_hyperparams``, ``MultiSteps``, masked, ...).
    abstract_params: params or their ``jax.ShapeDtypeStruct``s.
    param_shardings: a ``jax.sharding.Sharding`` per parameter (same structure as the params).

  Returns:
    A pytree of shardings matching ``jax.eval_shape(tx.init, abstract_params)``.

  Example:
    >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
    >>> p = {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
    >>> s = {"w": NamedSharding(mesh, PartitionSpec("data", "model"))}
    >>> tx = softmax_one_jax.optim.orthoadam(1e-3)
    >>> shardings = optimizer_state_shardings(tx, p, s)
    >>> state = jax.jit(tx.init, out_shardings=shardings)({"w": jnp.zeros((8, 16))})
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  params_def = jax.tree.structure(abstract_params)
  flat_shardings = params_def.flatten_up_to(param_shardings)
  flat_params = params_def.flatten_up_to(abstract_params)
  first = next((s for s in flat_shardings if s is not None), None)
  if isinstance(first, NamedSharding):
    replicated = NamedSharding(first.mesh, PartitionSpec())
  else:
    replicated = first

  def param_like(x: Any) -> list | None:
    """The flattened subtree if it has the params' structure and shapes, else None."""
    try:
      flat = params_def.flatten_up_to(x)
    except (ValueError, TypeError):
      return None
    for leaf, p in zip(flat, flat_params):
      if isinstance(leaf, _EMPTY) or (isinstance(leaf, tuple) and not leaf):
        continue
      if not hasattr(leaf, "shape") or tuple(leaf.shape) != tuple(p.shape):
        return None
    return flat

  def param_shaped(x: Any) -> Any:
    flat = param_like(x)
    out = [
        leaf if isinstance(leaf, _EMPTY) else s for leaf, s in zip(flat, flat_shardings)
    ]
    return params_def.unflatten(out)

  def moment_shaped(x: Any, rots: list) -> Any:
    """OrthoAdam's moments: in the layout their rotation ends in (``layout.MixingPlan``)."""
    out = []
    for leaf, s, r, p in zip(params_def.flatten_up_to(x), flat_shardings, rots, flat_params):
      plan = None if isinstance(leaf, _EMPTY) else layout_lib.plan_for(r, p.shape, s)
      out.append(leaf if isinstance(leaf, _EMPTY) else
                 s if plan is None else NamedSharding(s.mesh, plan.moments))
    return params_def.unflatten(out)

  def is_node(x: Any) -> bool:
    if isinstance(x, ScaleByOrthoAdamState):
      return True
    if isinstance(x, (jax.ShapeDtypeStruct, *_EMPTY)):
      return False
    return param_like(x) is not None

  def assign(x: Any) -> Any:
    if isinstance(x, ScaleByOrthoAdamState):
      rots = params_def.flatten_up_to(x.rotations)
      rot_shardings = [
          r if isinstance(r, _EMPTY) else rotation_shardings(r, s)
          for r, s in zip(rots, flat_shardings)
      ]
      return ScaleByOrthoAdamState(
          replicated, moment_shaped(x.mu, rots), moment_shaped(x.nu, rots),
          params_def.unflatten(rot_shardings)
      )
    if isinstance(x, jax.ShapeDtypeStruct):
      single = params_def.num_leaves == 1 and params_def.num_nodes == 1
      if single and x.shape and tuple(x.shape) == tuple(flat_params[0].shape):
        return flat_shardings[0]  # A bare-array "params": its moments are bare arrays too.
      return replicated
    return param_shaped(x)

  return jax.tree.map(assign, abstract_state, is_leaf=is_node)
