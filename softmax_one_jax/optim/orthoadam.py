"""OrthoAdam (Kaul et al., ICLR 2025, Algorithm 1) as an optax ``GradientTransformation``.

Adam run in a fixed, randomly rotated basis, one orthogonal ``Q`` per parameter::

    g~ = Q vec(g)
    m  = b1 m + (1 - b1) g~          v = b2 v + (1 - b2) g~^2
    u  = Q^T ( m / (1 - b1^t) / (sqrt(v / (1 - b2^t) + eps_root) + eps) )

The moments ``m, v`` live in the rotated basis but keep the parameter's shape (so they shard like
the parameter); ``Q`` is drawn once in ``init`` from ``seed`` and the parameter's path and stored
in the state as plain arrays (see ``rotations.py`` for the families). ``orthoadam`` chains it with
decoupled weight decay in the original basis, like ``optax.adamw``.

Every update checks that the rotations still hold an orthogonal ``Q`` and raises an error naming
the parameter where one does not: a reset such as ``jax.tree.map(jnp.zeros_like, opt_state)``
zeroes them too, after which every update would be 0. ``reset_moments`` is the reset that keeps
them.

Reference: Kaul et al., "From Attention to Activation: Unravelling the Enigmas of Large Language
Models", ICLR 2025 (arXiv:2410.17174).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softmax_one_jax.optim import layout as layout_lib
from softmax_one_jax.optim import rotations as rot_lib
from softmax_one_jax.sharding import platform_family, target_platform

Params = Any


class ScaleByOrthoAdamState(NamedTuple):
  """State of ``scale_by_orthoadam``: plain arrays only.

  Attributes:
    count: int32 ``[]``, the number of updates so far.
    mu: first moments in the rotated basis, the params' structure, each shaped
      ``layout.matrix_view(param.shape)`` (the param's shape up to two axes; ``[d_0, rest]``
      from three on), dtype ``mu_dtype`` or the param's.
    nu: second moments in the rotated basis, shaped as ``mu``, the params' dtypes.
    rotations: the params' structure with one rotation state (a NamedTuple of arrays from
      ``rotations.py``, e.g. ``HadamardRotation``) in place of each parameter.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  rotations: Any


def path_name(path: tuple[Any, ...]) -> str:
  """``'blocks.0.attn.qkv_proj.kernel'`` for a jax key path (a trailing nnx ``.value`` dropped).

  ``jax.tree_util.keystr(path, simple=True, separator=".")`` less the ``.value`` that nnx
  variables add; the names ``rotation_policy`` and ``optim.sharding`` match against.

  Example:
    >>> path_name((jax.tree_util.DictKey("w"), jax.tree_util.GetAttrKey("value")))
    'w'
  """
  name = jax.tree_util.keystr(tuple(path), simple=True, separator=".")
  return name.removesuffix(".value") if len(path) > 1 else name


def _is_family(x: Any) -> bool:
  return isinstance(x, (str, rot_lib.Identity, rot_lib.Dense, rot_lib.Kronecker, rot_lib.Block,
                        rot_lib.Hadamard))


def rotation_policy(rotation: Any) -> Callable[[str, rot_lib.Shape], rot_lib.RotationFamily]:
  """Turns ``scale_by_orthoadam``'s ``rotation`` argument into ``(path, shape) -> family``.

  Args:
    rotation: a family name, a family instance, a ``(path, shape) -> name | family`` callable, or
      a pytree of names / instances with the params' structure (or a prefix of it).

  Returns:
    A function of a parameter's path (``"blocks.0.attn.qkv_proj.kernel"``) and shape that returns
    its family instance; it raises ``ValueError`` for an unknown name or a path not in the pytree.

  Example:
    >>> rotation_policy({"w": "kronecker", "b": "identity"})("w", (4, 6))
    Kronecker(max_dim=8192, blocks=())
  """
  if _is_family(rotation):
    return lambda path, shape: rot_lib.get_family(rotation, path)
  if callable(rotation):
    return lambda path, shape: rot_lib.get_family(rotation(path, shape), path)
  by_path = {
      path_name(p): f
      for p, f in jax.tree_util.tree_flatten_with_path(rotation, is_leaf=_is_family)[0]
  }

  def lookup(path: str, shape: rot_lib.Shape) -> rot_lib.RotationFamily:
    del shape
    parts = path.split(".")
    for i in range(len(parts), -1, -1):  # Longest prefix wins; "" matches a single-leaf policy.
      prefix = ".".join(parts[:i])
      if prefix in by_path:
        return rot_lib.get_family(by_path[prefix], path)
    raise ValueError(
        f"the rotation pytree has no entry for parameter {path!r}; give it the params' structure "
        f"(or a prefix of it) with family names as leaves. Known paths: {sorted(by_path)[:8]}..."
    )

  return lookup


def param_key(seed: int | jax.Array, path: str) -> jax.Array:
  """The PRNG key of one parameter's rotation: ``fold_in(key(seed), crc32(path))``."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _init_rotations(params: Params, rotation: Any, seed: int | jax.Array) -> Any:
  """One rotation per parameter; parameters with the same (family, shape) are drawn in one vmap
  (far fewer ops to compile than one draw per parameter; the same values either way)."""
  policy = rotation_policy(rotation)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
  groups: dict[tuple[Any, rot_lib.Shape], list[int]] = {}
  names = []
  for i, (path, p) in enumerate(leaves):
    names.append(path_name(path))
    if p is not None:
      shape = tuple(p.shape)
      groups.setdefault((policy(names[i], shape), shape), []).append(i)
  out: list[Any] = [None] * len(leaves)
  for (family, shape), idx in groups.items():
    keys = jnp.stack([param_key(seed, names[i]) for i in idx])
    init = lambda k, family=family, shape=shape, name=names[idx[0]]: family.init(k, shape, name)
    stacked = jax.vmap(init)(keys)
    for j, i in enumerate(idx):
      out[i] = jax.tree.map(lambda x, j=j: x[j], stacked)
  return treedef.unflatten(out)


def scale_by_orthoadam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    rotation: Any = rot_lib.DEFAULT_ROTATION,
    seed: int | jax.Array = 0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    shardings: Any = None,
    check_rotations: bool = True,
) -> optax.GradientTransformation:
  """Rescales updates by Adam in a fixed random orthogonal basis (OrthoAdam, Algorithm 1).

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v_hat)``.
    eps_root: added to ``v_hat`` inside the square root.
    rotation: the family per parameter: a name (``"hadamard"`` (default), ``"dense"``,
      ``"kronecker"``, ``"block"``, ``"identity"``), a family instance (``Block(size=128)``), a
      callable ``(path: str, shape: tuple) -> name | family`` or a pytree of those with the params'
      structure (or a prefix of it). Paths look like ``"blocks.0.attn.qkv_proj.kernel"``.
    seed: the rotations are drawn from ``fold_in(key(seed), crc32(path))`` in ``init``.
    mu_dtype: dtype of the first moment (default: the parameter's).
    shardings: optional, the params' ``NamedSharding``s (the params' structure). They change
      where the rotation is computed, never ``Q``: each axis is rotated in a layout where it is
      whole (``layout.py``: an all-to-all per sharded matrix, not an all-gather), and the
      moments live in that layout (``optimizer_state_shardings`` gives the same). Without
      them the compiler places the rotation, which on a sharded axis gathers the parameter.
    check_rotations: every update checks, in about one read of the rotation state, that each
      rotation is still orthogonal (``rotations.rotation_intact``) and, where one is not
      (zeroed by a reset, overwritten), raises an error naming its parameters from a host
      callback that runs only then (``jax.debug.callback`` under ``lax.cond``). Left out of
      programs compiled for a platform this process has no backend for (ahead-of-time
      compilation for absent TPUs and GPUs), where no callback can be lowered.

  Returns:
    An ``optax.GradientTransformation`` whose state is a ``ScaleByOrthoAdamState``. The numeric
    arguments may be arrays (``optax.inject_hyperparams``); rotations are applied in float32 (or
    wider) and updates are returned in the gradient's dtype.

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), scale_by_orthoadam(),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full((4, 3), 0.1)}, state, params)
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  if _is_family(rotation):
    rot_lib.get_family(rotation)  # Fail early (at construction) on an unknown name.

  def init_fn(params: Params) -> ScaleByOrthoAdamState:
    mu = _zero_moments(params, mu_dtype)
    nu = _zero_moments(params)
    rotations = _init_rotations(params, rotation, seed)
    return ScaleByOrthoAdamState(jnp.zeros([], jnp.int32), mu, nu, rotations)

  sharding_of = _shardings_by_path(shardings)

  def update_fn(updates, state, params=None):
    del params
    count_inc = optax.safe_increment(state.count)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=lambda x: x is None)
    rots = _rotations_for(treedef, state.rotations, with_paths)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    first = next((path_name(p) for p, g in with_paths if g is not None), None)
    check_here = check_rotations and first is not None and _runs_here(sharding_of, first)
    out_u, out_m, out_v = [], [], []
    checked: list[tuple[str, jax.Array]] = []
    for (path, g), m, v, rot in zip(with_paths, mus, nus, rots):
      if g is None:
        out_u.append(None)
        out_m.append(m)
        out_v.append(v)
        continue
      name = path_name(path)
      _check_rotation(rot, g.shape, name)
      if check_here and not isinstance(rot, rot_lib.IdentityRotation):
        checked.append((name, rot_lib.rotation_intact(rot)))
      sharding = sharding_of(name)
      plan = None if sharding is None else layout_lib.plan_for(rot, g.shape, sharding)
      mesh = None if plan is None else sharding.mesh
      u, m_new, v_new = _leaf_update_any_mesh(g, m, v, rot, count_inc, b1, b2, eps, eps_root,
                                              plan, mesh)
      out_u.append(u)
      out_m.append(m_new.astype(mu_dtype if mu_dtype is not None else m.dtype))
      out_v.append(v_new.astype(v.dtype))
    if checked:
      _raise_if_lost(jnp.stack([ok for _, ok in checked]), tuple(n for n, _ in checked))
    return treedef.unflatten(out_u), ScaleByOrthoAdamState(
        count_inc, treedef.unflatten(out_m), treedef.unflatten(out_v), state.rotations
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _zero_moments(params: Params, dtype: Any = None) -> Params:
  """Zeros shaped ``layout.matrix_view`` of each param, in ``dtype`` (default: the param's)."""
  return jax.tree.map(
      lambda p: jnp.zeros(layout_lib.matrix_view(p.shape), p.dtype if dtype is None else dtype),
      params)


def _rotations_for(treedef: Any, rotations: Any, with_paths: Sequence[Any]) -> list[Any]:
  """The rotation state of each update leaf; a clear error when the trees differ (a renamed
  or added parameter: the state was built for other params)."""
  try:
    return treedef.flatten_up_to(rotations)
  except (ValueError, TypeError) as e:
    is_rotation = lambda x: x is None or isinstance(x, rot_lib.ROTATION_STATE_TYPES)
    have = {path_name(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(rotations, is_leaf=is_rotation)[0]}
    want = {path_name(p) for p, _ in with_paths}
    raise ValueError(
        f"OrthoAdam's state has no rotation for parameters {sorted(want - have)[:4]} (it has "
        f"rotations for {sorted(have - want)[:4]} instead): the parameters were renamed or "
        "changed after tx.init. Build the state again with tx.init(params); Q is keyed on each "
        "parameter's path, so a renamed parameter gets a new Q.") from e


def _runs_here(sharding_of: Callable[[str], Any], path: str) -> bool:
  """Whether this process has a backend for the platform the update is built for: a host
  callback lowers only there (a program compiled ahead of time for absent GPUs has none)."""
  sharding = sharding_of(path)
  devices = getattr(getattr(sharding, "mesh", None), "devices", None)
  has_devices = devices is not None and getattr(devices, "size", 0)
  platform = platform_family(devices.flat[0].platform) if has_devices else target_platform()
  try:
    return bool(jax.devices(platform))
  except RuntimeError:
    return False


def _raise_if_lost(intact_p: jax.Array, names: tuple[str, ...]) -> None:
  """Raises, from the host, an error naming the parameters whose rotation is not intact.

  ``intact_p``: bool ``[P]``, one flag per name. The callback runs only when a rotation fails
  (``lax.cond``); under ``vmap`` the cond becomes a select that runs it every step, so it reads
  the flags itself.
  """

  def report(intact: np.ndarray) -> None:
    ok_p = np.asarray(intact).reshape(-1, len(names)).all(0)
    lost = [n for n, ok in zip(names, ok_p) if not ok]
    if lost:
      raise ValueError(
          f"OrthoAdam's rotation for parameter(s) {lost[:4]} is no longer orthogonal: the "
          "optimizer state was zeroed or overwritten (jax.tree.map(jnp.zeros_like, opt_state) "
          "zeroes the rotations too, and every update would then be 0). Reset only the moments "
          "with softmax_one_jax.optim.reset_moments(opt_state), or build the state again with "
          "tx.init(params).")

  jax.lax.cond(jnp.all(intact_p), lambda: None, lambda: jax.debug.callback(report, intact_p))


def reset_moments(opt_state: Any) -> Any:
  """The optimizer state with every array zeroed except OrthoAdam's rotations.

  The reset ``jax.tree.map(jnp.zeros_like, opt_state)`` for states that hold OrthoAdam: counts
  and moments restart, each ``Q`` stays (``scale_by_orthoadam`` refuses a zeroed ``Q``).

  Example:
    >>> tx = orthoadam(1e-3)
    >>> state = reset_moments(tx.init({"w": jnp.ones((4, 3))}))
  """
  is_rotation = lambda x: isinstance(x, rot_lib.ROTATION_STATE_TYPES)
  return jax.tree.map(lambda x: x if is_rotation(x) else jnp.zeros_like(x), opt_state,
                      is_leaf=is_rotation)


def _check_rotation(rot: Any, shape: tuple[int, ...], path: str) -> None:
  """Refuses, at trace time, a rotation state drawn for another shape than the gradient's."""
  want = rot_lib.rotated_shape(rot)
  size = rot_lib.rotated_size(rot)   # Known for "dense" and "block", which have no shape.
  if (tuple(want) != tuple(shape)) if want is not None else (
      size is not None and size != math.prod(shape)):
    raise ValueError(
        f"OrthoAdam's rotation for parameter {path!r} was drawn for shape {want or size}, but its "
        f"gradient has shape {tuple(shape)}: the parameter was reshaped, or the state belongs to "
        "other params. Build the state again with tx.init(params) (Q is derived from the seed, "
        "the path, the shape and the family, so the new Q is the one a fresh run would use).")


def _shardings_by_path(shardings: Any) -> Callable[[str], Any]:
  """``path -> sharding`` for ``scale_by_orthoadam(shardings=...)`` (None: no shardings).

  Matched by path, so the updates may hold fewer leaves (``optax.masked``) than the params.
  """
  if shardings is None:
    return lambda path: None
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding))[0]
  by_path = {path_name(p): s for p, s in flat}

  def lookup(path: str) -> Any:
    if path not in by_path:
      raise ValueError(
          f"scale_by_orthoadam(shardings=...) has no sharding for parameter {path!r}; give one "
          f"per parameter, in the params' structure. Known paths: {sorted(by_path)[:8]}...")
    return by_path[path]

  return lookup


def _explicit_sharding(x: jax.Array) -> Any:
  """``x``'s sharding when it is typed on a mesh with Explicit axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return sharding if mesh is not None and getattr(mesh, "explicit_axes", ()) else None


def _leaf_update_any_mesh(g, m, v, rot, count, b1, b2, eps, eps_root, plan=None, mesh=None):
  """``_leaf_update``; on an Explicit-axes mesh the rotation runs in Auto mode (the compiler
  partitions its contractions) and the results keep the gradient's and moments' shardings."""
  g_sh, m_sh, v_sh = map(_explicit_sharding, (g, m, v))
  if g_sh is None and m_sh is None and v_sh is None:
    return _leaf_update(g, m, v, rot, count, b1, b2, eps, eps_root, plan, mesh)
  out = (g_sh or m_sh or v_sh, m_sh or g_sh or v_sh, v_sh or m_sh or g_sh)
  fn = lambda *a: _leaf_update(*a, b1, b2, eps, eps_root)
  return jax.sharding.auto_axes(fn, out_sharding=out)(g, m, v, rot, count)


def _leaf_update(g, m, v, rot, count, b1, b2, eps, eps_root, plan=None, mesh=None):
  """One parameter's OrthoAdam step; returns ``(update, m, v)`` (moments in compute dtype).

  With a ``layout.MixingPlan`` the rotation runs in its layouts (moments in ``plan.moments``).
  """
  dtype = jnp.promote_types(g.dtype, jnp.float32)
  g_rot = layout_lib.rotate(rot, g.astype(dtype), plan, mesh)
  m = (1 - b1) * g_rot + b1 * m.astype(dtype)
  v = (1 - b2) * jnp.square(g_rot) + b2 * v.astype(dtype)
  m_hat = m / (1 - jnp.asarray(b1, dtype) ** count.astype(dtype)).astype(dtype)
  v_hat = v / (1 - jnp.asarray(b2, dtype) ** count.astype(dtype)).astype(dtype)
  u_rot = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
  u = layout_lib.unrotate(rot, u_rot.astype(dtype), g.shape, plan, mesh)
  return u.astype(g.dtype), m, v


def orthoadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Optional[Any] = None,
    *,
    rotation: Any = rot_lib.DEFAULT_ROTATION,
    seed: int | jax.Array = 0,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    shardings: Any = None,
    check_rotations: bool = True,
) -> optax.GradientTransformation:
  """OrthoAdam with decoupled weight decay (in the original basis), built like ``optax.adamw``.

  ``chain(scale_by_orthoadam, add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``. With ``rotation="identity"`` it is ``optax.adamw``.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, rotation, seed, mu_dtype, shardings, check_rotations: see
      ``scale_by_orthoadam``.
    weight_decay: decoupled weight decay (default 0.0).
    mask: which params get weight decay (a pytree of bools or a callable), as in optax.adamw.

  Example:
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  orthoadam(optax.cosine_decay_schedule(3e-4, 1000), weight_decay=0.1))
  """
  return optax.chain(
      scale_by_orthoadam(b1, b2, eps, eps_root, rotation=rotation, seed=seed, mu_dtype=mu_dtype,
                         shardings=shardings, check_rotations=check_rotations),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
