"""Fixed random orthogonal rotations for OrthoAdam, one per parameter, stored as plain arrays.

OrthoAdam (Kaul et al., ICLR 2025, Algorithm 1) runs Adam in a rotated basis ``g~ = Q vec(g)``
with one fixed Haar-random orthogonal ``Q`` per parameter. A dense ``Q`` costs ``n^2`` numbers
for an ``n``-element parameter, so this module offers five families, each an orthogonal map
``R^n -> R^n`` (``Q^T Q = I`` exactly, in exact arithmetic) that keeps the parameter's shape:

==============  ===========================================================  ==================
family          Q (x: the parameter's array, n = x.size, d_i = x.shape[i])     state / compute
==============  ===========================================================  ==================
``"dense"``     the paper's Haar ``Q`` over ``vec(x)``                         n^2 / n^2
``"kronecker"`` ``Q_0 (x) Q_1 (x) ...``: one Haar matrix per axis              sum d_i^2 / n sum d_i
``"block"``     block-diagonal Haar over ``vec(x)``, blocks of ``size``       n b / n b
``"hadamard"``  ``Q_0 (x) Q_1 (x) ...``, per axis of length ``d_i = m_i 2^k``   sum d_i + m_i^2 /
                (``m_i`` odd): ``Q_i = (R_i (x) H_{2^k}) D_i``, random signs   n log n + n m_i
                ``D_i``, a normalised Walsh-Hadamard ``H_{2^k}`` and a small
                Haar ``R_i`` (none when ``m_i = 1``)
``"identity"``  ``I``: plain Adam(W)                                           0 / 0
==============  ===========================================================  ==================

Haar matrices follow Mezzadri (2007): ``Q, R = qr(G)`` for a standard Gaussian ``G``, then
the columns of ``Q`` are multiplied by ``sign(diag(R))``.

"hadamard" is a Kronecker product of per-axis randomized Hadamard matrices: like "kronecker", every
entry of ``Q`` is nonzero (``+-1/sqrt(n)`` on power-of-two shapes), so no rotated coordinate lines
up with a coordinate of the parameter, but its state is ``sum d_i`` int8 signs plus an
``m_i x m_i`` float32 ``R_i`` per axis whose length is not a power of two (``m_i`` = 3 for 768 and
3072, 43 for 11008, 393 for 50304) instead of ``sum d_i^2`` floats, and it costs at most two
small Hadamard matmuls per axis (``hadamard.py``) plus ``2 m_i`` multiply-adds per element. An axis whose odd part ``m_i`` exceeds
``hadamard_rotation.MAX_MIX_DIM`` (1024; e.g. 50257) gets a random permutation and a
block-diagonal Hadamard instead (blocks: the binary digits of ``d_i``), which is *not* dense. The
family and its state live in ``hadamard_rotation.py``, the Hadamard transform in ``hadamard.py``.

"kronecker" and "hadamard" take per-axis block counts, ``Hadamard(blocks=(4, 1))``: axis ``i`` is
cut into ``blocks[i]`` equal contiguous blocks and ``Q_i`` is block-diagonal, an independent
rotation per block (``axis_blocks.py``): a fixed, weaker mixing, the same on every mesh. ``Q``
never depends on the mesh: on sharded parameters ``layout.py`` only chooses where each factor
is computed.

Each family is a frozen dataclass with ``init(key, shape) -> state``; each state is a NamedTuple
of arrays with ``rotate(x)`` (``Q vec(x)``) and ``unrotate(y)`` (``Q^T vec(y)``), both
shape-preserving. Matmuls use ``Precision.HIGHEST`` so that ``Q`` stays orthogonal on GPU/TPU.

Example:
  >>> rot = Hadamard().init(jax.random.key(0), (4, 6))
  >>> x = jnp.ones((4, 6))
  >>> bool(jnp.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from softmax_one_jax.optim import axis_blocks
from softmax_one_jax.optim.axis_blocks import Shape
from softmax_one_jax.optim.hadamard_rotation import Hadamard, HadamardRotation
# The names of the families below whose init draws Haar matrices by QR (Dense, Kronecker, Block),
# kept in the bottom layer, whose CPU workaround keys on them.
from softmax_one_jax.runtime import HAAR_FAMILIES  # noqa: F401  (exported)

_HIGHEST = jax.lax.Precision.HIGHEST


def haar_orthogonal(key: jax.Array, dim: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """A Haar-distributed orthogonal ``[dim, dim]`` matrix (QR of a Gaussian, sign-corrected).

  Example:
    >>> q_dd = haar_orthogonal(jax.random.key(0), 3)
    >>> bool(jnp.allclose(q_dd.T @ q_dd, jnp.eye(3), atol=1e-5))
    True
  """
  g_dd = jax.random.normal(key, (dim, dim), dtype=jnp.float32)
  q_dd, r_dd = jnp.linalg.qr(g_dd)
  d = jnp.sign(jnp.diagonal(r_dd))
  d = jnp.where(d == 0, 1.0, d)
  return (q_dd * d[None, :]).astype(dtype)


# ----------------------------------------------------------------------------- rotation states


class IdentityRotation(NamedTuple):
  """``Q = I``: no arrays."""

  def rotate(self, x: jax.Array) -> jax.Array:
    return x

  def unrotate(self, y: jax.Array) -> jax.Array:
    return y

  def rotate_axes(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    del axes
    return x

  def unrotate_axes(self, y: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    del axes
    return y


class DenseRotation(NamedTuple):
  """The paper's ``Q``: ``q_nn`` float32 ``[n, n]`` acting on ``vec(x)`` (row-major)."""

  q_nn: jax.Array

  def rotate(self, x: jax.Array) -> jax.Array:
    y_n = jnp.matmul(self.q_nn, x.reshape(-1).astype(self.q_nn.dtype), precision=_HIGHEST)
    return y_n.reshape(x.shape).astype(x.dtype)

  def unrotate(self, y: jax.Array) -> jax.Array:
    x_n = jnp.matmul(y.reshape(-1).astype(self.q_nn.dtype), self.q_nn, precision=_HIGHEST)
    return x_n.reshape(y.shape).astype(y.dtype)


class KroneckerRotation(NamedTuple):
  """``Q = Q_0 (x) Q_1 (x) ...``; ``factors[i]`` rotates axis ``i``.

  ``factors[i]``: float32 ``[d_i, d_i]``, or ``[k_i, b_i, b_i]`` when axis ``i`` is cut into
  ``k_i > 1`` blocks of length ``b_i`` (``Q_i`` block-diagonal, one Haar matrix per block; see
  ``axis_blocks.py``). For a matrix ``G`` and one block per axis: ``rotate(G) = Q_0 @ G @ Q_1^T``.
  """

  factors: tuple[jax.Array, ...]

  def block_counts(self) -> tuple[int, ...]:
    """Blocks per axis: ``k_i``, 1 for an unblocked axis."""
    return tuple(f.shape[0] if f.ndim == 3 else 1 for f in self.factors)

  def leaf_axes(self) -> "KroneckerRotation":
    """The parameter axis of each state array."""
    return KroneckerRotation(tuple(range(len(self.factors))))

  def _apply_one_block(self, x: jax.Array, transpose: bool,
                       axes: tuple[int, ...] | None = None) -> jax.Array:
    contract = 0 if transpose else 1
    for axis, q_dd in enumerate(self.factors):
      if axes is None or axis in axes:
        x = jnp.moveaxis(
            jnp.tensordot(q_dd, x, axes=([contract], [axis]), precision=_HIGHEST), 0, axis)
    return x

  def rotate_axes(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The factors ``Q_i`` of ``axes`` only, each along its own axis (one-block rotations)."""
    return self._apply_one_block(x, transpose=False, axes=tuple(axes))

  def unrotate_axes(self, y: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``Q_i^T`` of ``axes`` only."""
    return self._apply_one_block(y, transpose=True, axes=tuple(axes))

  def rotate(self, x: jax.Array) -> jax.Array:
    fn = lambda rot, x: rot._apply_one_block(x, transpose=False)
    return axis_blocks.apply_in_blocks(fn, self, self.leaf_axes(), self.block_counts(), x)

  def unrotate(self, y: jax.Array) -> jax.Array:
    fn = lambda rot, y: rot._apply_one_block(y, transpose=True)
    return axis_blocks.apply_in_blocks(fn, self, self.leaf_axes(), self.block_counts(), y)


class BlockRotation(NamedTuple):
  """Block-diagonal Haar ``Q`` over ``vec(x)``.

  ``full`` is ``()`` or ``(blocks_kbb,)`` (``k = n // b`` blocks of size ``b``); ``tail`` is
  ``()`` or ``(q_rr,)`` for the last ``r = n % b`` elements.
  """

  full: tuple[jax.Array, ...]
  tail: tuple[jax.Array, ...]

  def _apply(self, x: jax.Array, transpose: bool) -> jax.Array:
    x_n = x.reshape(-1)
    parts = []
    start = 0
    if self.full:
      (blocks_kbb,) = self.full
      k, b, _ = blocks_kbb.shape
      eq = "kji,kj->ki" if transpose else "kij,kj->ki"
      parts.append(
          jnp.einsum(eq, blocks_kbb, x_n[: k * b].reshape(k, b), precision=_HIGHEST).reshape(-1)
      )
      start = k * b
    if self.tail:
      (q_rr,) = self.tail
      q_rr = q_rr.T if transpose else q_rr
      parts.append(jnp.matmul(q_rr, x_n[start:], precision=_HIGHEST))
    y_n = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return y_n.reshape(x.shape)

  def rotate(self, x: jax.Array) -> jax.Array:
    return self._apply(x, transpose=False)

  def unrotate(self, y: jax.Array) -> jax.Array:
    return self._apply(y, transpose=True)


def axis_separable(rotation: object) -> bool:
  """``rotation`` is a product of per-axis factors applied one axis at a time
  (``rotate_axes``): identity, and one-block "kronecker" and "hadamard" rotations. "dense" and
  "block" act on the flattened parameter, and blocked axes (``blocks``) on blocks of an axis.

  Example:
    >>> axis_separable(Hadamard().init(jax.random.key(0), (4, 6)))
    True
  """
  if isinstance(rotation, IdentityRotation):
    return True
  if isinstance(rotation, (KroneckerRotation, HadamardRotation)):
    return all(k == 1 for k in rotation.block_counts())
  return False


def rotated_shape(rotation: object) -> tuple[int, ...] | None:
  """The parameter shape a rotation state was drawn for (None: any shape, or flattened only).

  Example:
    >>> rotated_shape(Hadamard(blocks=(2, 1)).init(jax.random.key(0), (4, 6)))
    (4, 6)
  """
  if isinstance(rotation, HadamardRotation):
    return tuple(math.prod(s.shape) for s in rotation.signs)
  if isinstance(rotation, KroneckerRotation):
    return tuple(f.shape[0] * f.shape[1] if f.ndim == 3 else f.shape[0] for f in rotation.factors)
  return None


def rotated_size(rotation: object) -> int | None:
  """The number of elements a rotation state acts on (None for the identity)."""
  if isinstance(rotation, DenseRotation):
    return rotation.q_nn.shape[0]
  if isinstance(rotation, BlockRotation):
    full = math.prod(rotation.full[0].shape[:2]) if rotation.full else 0
    return full + (rotation.tail[0].shape[0] if rotation.tail else 0)
  shape = rotated_shape(rotation)
  return None if shape is None else math.prod(shape)


def _unit_rows(q: jax.Array) -> jax.Array:
  """Every row of the trailing ``[d, d]`` matrices has norm 1 (to 1e-3): bool ``[]``."""
  norms = jnp.sum(jnp.square(q.astype(jnp.float32)), axis=-1)
  return jnp.all(jnp.abs(norms - 1) < 1e-3)


def _inverse_permutations(perm: jax.Array, inv_perm: jax.Array) -> jax.Array:
  """``perm[inv_perm[j]] == j`` for every ``j`` (per block): bool ``[]``."""
  return jnp.all(jnp.take_along_axis(perm, inv_perm, axis=-1)
                 == jnp.arange(perm.shape[-1], dtype=perm.dtype))


def rotation_intact(rotation: object) -> jax.Array:
  """Whether a rotation state still holds an orthogonal ``Q``: bool ``[]``, traceable.

  Checks what a reset or an overwrite destroys, in about one read of the state: signs are
  +-1, each row of a Haar matrix has unit norm, permutations invert each other. A state
  zeroed by ``jax.tree.map(jnp.zeros_like, opt_state)`` fails every check.

  Example:
    >>> rot = Hadamard().init(jax.random.key(0), (6, 4))
    >>> bool(rotation_intact(rot)), bool(rotation_intact(jax.tree.map(jnp.zeros_like, rot)))
    (True, False)
  """
  checks = [jnp.array(True)]
  if isinstance(rotation, DenseRotation):
    checks.append(_unit_rows(rotation.q_nn))
  elif isinstance(rotation, KroneckerRotation):
    checks += [_unit_rows(f) for f in rotation.factors]
  elif isinstance(rotation, BlockRotation):
    checks += [_unit_rows(q) for q in (*rotation.full, *rotation.tail)]
  elif isinstance(rotation, HadamardRotation):
    checks += [jnp.all(jnp.abs(s.astype(jnp.int32)) == 1) for s in rotation.signs]
    checks += [_unit_rows(r) for r in rotation.mixes]
    checks += [_inverse_permutations(p, q) for p, q in zip(rotation.perms, rotation.inv_perms)]
  return jnp.all(jnp.stack(checks))


RotationState = Union[IdentityRotation, DenseRotation, KroneckerRotation, BlockRotation,
                      HadamardRotation]
ROTATION_STATE_TYPES = (IdentityRotation, DenseRotation, KroneckerRotation, BlockRotation,
                        HadamardRotation)


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Identity:
  """No rotation: OrthoAdam becomes Adam(W)."""

  name = "identity"

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> IdentityRotation:
    del key, shape, path
    return IdentityRotation()


@dataclasses.dataclass(frozen=True)
class Dense:
  """The paper's exact Haar ``Q`` over the flattened parameter; refused above ``max_size``.

  Attributes:
    max_size: the largest parameter (in elements) accepted; ``Q`` has ``max_size^2`` entries.
  """

  max_size: int = 4096
  name = "dense"

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> DenseRotation:
    n = math.prod(shape)
    if n > self.max_size:
      raise ValueError(
          f"rotation 'dense' for parameter {path or '<param>'} of shape {shape} needs a {n}x{n} "
          f"matrix ({4 * n * n / 2**20:.0f} MiB), above Dense(max_size={self.max_size}) elements. "
          "Use a scalable family for large parameters, e.g. rotation=lambda path, shape: "
          "'dense' if math.prod(shape) <= 4096 else 'hadamard', or raise the limit with "
          "rotation=Dense(max_size=...)."
      )
    return DenseRotation(haar_orthogonal(key, n))


@dataclasses.dataclass(frozen=True)
class Kronecker:
  """One Haar matrix per axis, ``Q = Q_0 (x) Q_1 (x) ...``; refused if an axis > ``max_dim``.

  Attributes:
    max_dim: the longest axis (block, when ``blocks`` cuts it) accepted (``None``: no limit);
      each factor is ``d_i^2`` numbers (``d_i b_i`` when cut into blocks of length ``b_i``).
    blocks: block count per axis (``()``: one per axis; shorter: padded with 1s). Axis ``i`` is
      cut into ``blocks[i]`` equal contiguous blocks, each with its own Haar matrix (a
      block-diagonal ``Q_i``, factor ``[blocks[i], b_i, b_i]``). Each must divide its axis.
  """

  max_dim: int | None = 8192
  blocks: tuple[int, ...] = ()
  name = "kronecker"

  def __post_init__(self):
    object.__setattr__(self, "blocks", axis_blocks.check_blocks(self.blocks, self.name))

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> KroneckerRotation:
    counts = axis_blocks.resolve_blocks(self.blocks, shape, self.name, path)
    longest = max((d // k for d, k in zip(shape, counts)), default=0)
    if self.max_dim is not None and longest > self.max_dim:
      raise ValueError(
          f"rotation 'kronecker' for parameter {path or '<param>'} of shape {shape} has an axis "
          f"(or block) longer than Kronecker(max_dim={self.max_dim}); a {longest}^2 factor is "
          f"{4 * longest**2 / 2**20:.0f} MiB. Use 'hadamard' for it, raise max_dim, or cut the "
          "axis into shorter blocks with Kronecker(blocks=...)."
      )
    keys = jax.random.split(key, max(len(shape), 1))
    return KroneckerRotation(tuple(_haar_blocks(k, d, c) for k, d, c in zip(keys, shape, counts)))


def _haar_blocks(key: jax.Array, dim: int, count: int) -> jax.Array:
  """``[dim, dim]`` Haar matrix, or ``[count, dim / count, dim / count]`` independent ones."""
  if count == 1:
    return haar_orthogonal(key, dim)
  return jax.vmap(lambda k: haar_orthogonal(k, dim // count))(jax.random.split(key, count))


@dataclasses.dataclass(frozen=True)
class Block:
  """Block-diagonal Haar over the flattened parameter, blocks of ``size`` (last one smaller).

  Attributes:
    size: block size ``b``; the state holds about ``n * b`` numbers.
  """

  size: int = 64
  name = "block"

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"Block(size={self.size}) must be a positive block size, e.g. 64.")

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> BlockRotation:
    del path
    n = math.prod(shape)
    k, r = divmod(n, self.size)
    key_full, key_tail = jax.random.split(key)
    full = ()
    if k:
      full = (jax.vmap(lambda kk: haar_orthogonal(kk, self.size))(jax.random.split(key_full, k)),)
    tail = (haar_orthogonal(key_tail, r),) if r else ()
    return BlockRotation(full, tail)


RotationFamily = Union[Identity, Dense, Kronecker, Block, Hadamard]
FAMILIES: dict[str, RotationFamily] = {
    "identity": Identity(),
    "dense": Dense(),
    "kronecker": Kronecker(),
    "block": Block(),
    "hadamard": Hadamard(),
}
DEFAULT_ROTATION = "hadamard"
RotationPolicy = Union[str, RotationFamily, Callable[[str, Shape], Union[str, RotationFamily]]]


def get_family(spec: str | RotationFamily, path: str = "") -> RotationFamily:
  """Resolves a family name (``"dense"``, ...) or instance; raises a clear error otherwise."""
  if isinstance(spec, str):
    if spec not in FAMILIES:
      raise ValueError(
          f"unknown rotation {spec!r} for parameter {path or '<param>'}; expected one of "
          f"{sorted(FAMILIES)} or an instance such as Block(size=128)."
      )
    return FAMILIES[spec]
  if isinstance(spec, (Identity, Dense, Kronecker, Block, Hadamard)):
    return spec
  raise TypeError(
      f"rotation for parameter {path or '<param>'} is {spec!r}; expected a name in "
      f"{sorted(FAMILIES)} or a family instance (Dense(), Kronecker(), Block(size), Hadamard())."
  )


def rotation_state_bytes(shape: Shape, family: str | RotationFamily) -> int:
  """Bytes of the rotation state for one parameter, computed without building it.

  Example:
    >>> rotation_state_bytes((4096, 11008), "hadamard")   # int8 signs 4096 + 11008, R 43 x 43
    22500
  """
  fam = get_family(family)
  abstract = jax.eval_shape(lambda: fam.init(jax.random.key(0), tuple(shape)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
