"""OrthoAdam's default rotation: a randomized Hadamard matrix per axis, stored as small arrays.

``Q = Q_0 (x) Q_1 (x) ...``, one factor per axis ``i`` of length ``d_i = m_i 2^(k_i)`` (``m_i``
odd), each with random signs ``D_i`` (a diagonal of +-1):

- ``m_i = 1`` (a power of two): ``Q_i = H_i D_i``, ``H_i`` the normalised Walsh-Hadamard
  ``H_{2^k} / sqrt(2^k)`` of ``softmax_one_jax.optim.hadamard``; every entry is ``+-1/sqrt(d_i)``.
- ``1 < m_i <= MAX_MIX_DIM`` (768 = 3 * 256, 11008 = 43 * 256, 50304 = 393 * 128):
  ``Q_i = (R_i (x) H_{2^k} / sqrt(2^k)) D_i`` with ``R_i`` a Haar-random orthogonal ``[m_i, m_i]``
  matrix drawn per parameter. The axis is viewed as ``[m_i, 2^k]`` (row-major): a Hadamard on the
  minor part, a dense ``m_i x m_i`` matmul on the major part. Entry ``((a, i), (b, j))`` is
  ``R_i[a, b] H[i, j] D_i[(b, j)] / sqrt(2^k)``: nonzero wherever ``R_i`` is, i.e. everywhere
  (with probability 1), so ``Q_i`` is dense.
- ``m_i > MAX_MIX_DIM`` (e.g. GPT-2's unpadded 50257 vocabulary, a large ``R_i`` would cost
  ``m_i^2`` state): ``Q_i = H_i P_i D_i`` with a random permutation ``P_i`` and ``H_i``
  block-diagonal, its blocks the binary digits of ``d_i`` (50257 = 32768 + 16384 + ...). This
  ``Q_i`` is *not* dense: it mixes coordinates only within a block.

The state is ``sum d_i`` int8 signs plus ``m_i^2`` float32 per mixed axis (int32 permutations
per permuted axis); the transform is at most two small Hadamard matmuls per axis up to ``2^14``
(factors of at most 128 x 128, ``hadamard.py``) plus ``2 m_i`` multiply-adds per element on a
mixed axis. With per-axis ``blocks`` (``axis_blocks.py``), each factor is
block-diagonal, one independent ``Q_i`` per block of length ``d_i / k_i`` (the rules above apply
to the block length).

Example:
  >>> rot = Hadamard().init(jax.random.key(0), (4, 6))
  >>> x = jnp.ones((4, 6))
  >>> bool(jnp.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softmax_one_jax.optim import axis_blocks
from softmax_one_jax.optim.axis_blocks import Shape
from softmax_one_jax.optim.hadamard import block_hadamard

_HIGHEST = jax.lax.Precision.HIGHEST

# The largest odd part ``m`` of an axis (block) length that gets a dense ``R`` (``m^2`` float32 of
# state, 4 MiB at the limit; ``2 m`` multiply-adds per element). Every axis of the training
# configs is below it (the largest: GPT-2's vocabulary padded to 50304 = 393 * 128); the unpadded
# 50257 of the gpt2-* presets (Hugging Face checkpoints) is above it.
MAX_MIX_DIM = 1024


def odd_part(dim: int) -> int:
  """``m`` in ``dim = m * 2^k`` with ``m`` odd.

  Example:
    >>> odd_part(768), odd_part(11008), odd_part(50304), odd_part(512)
    (3, 43, 393, 1)
  """
  return dim // (dim & -dim)


def is_mixed(dim: int) -> bool:
  """An axis (block) of this length gets ``Q = (R (x) H) D``: odd part in ``(1, MAX_MIX_DIM]``."""
  return 1 < odd_part(dim) <= MAX_MIX_DIM


def is_permuted(dim: int) -> bool:
  """An axis (block) of this length gets ``Q = H P D``, ``H`` block-diagonal: odd part too large."""
  return odd_part(dim) > MAX_MIX_DIM


class HadamardRotation(NamedTuple):
  """``Q = Q_0 (x) Q_1 (x) ...``: a randomized Hadamard matrix per axis (module docstring).

  ``signs[i]``: int8 ``[d_i]`` of +-1, the diagonal of ``D_i``. ``mixes``: float32
  ``[m_i, m_i]``, the Haar ``R_i`` of ``Q_i = (R_i (x) H_{2^k}) D_i``, one per axis whose odd
  part ``m_i`` is in ``(1, MAX_MIX_DIM]``, in axis order. ``perms`` / ``inv_perms``: int32
  ``[d_i]``, ``(P_i x)[j] = x[perm[j]]`` of ``Q_i = H_i P_i D_i`` (``H_i`` block-diagonal), one per
  axis whose odd part exceeds ``MAX_MIX_DIM``. A power-of-two axis has neither: ``Q_i = H_i D_i``.
  Scalars have no axes: ``Q = 1``.

  An axis cut into ``k_i > 1`` blocks of length ``b_i`` (``axis_blocks.py``) has a
  block-diagonal ``Q_i``, one independent randomized Hadamard per block, chosen by the rules above
  for ``b_i``: its ``signs[i]`` is ``[k_i, b_i]``, its ``mixes`` entry ``[k_i, m_i, m_i]`` and its
  ``perms`` / ``inv_perms`` entries ``[k_i, b_i]`` permutations within each block.

  Example:
    >>> rot = Hadamard().init(jax.random.key(0), (768, 512))
    >>> [x.shape for x in jax.tree.leaves(rot)]   # signs [768], [512]; R [3, 3]
    [(768,), (512,), (3, 3)]
  """

  signs: tuple[jax.Array, ...]
  perms: tuple[jax.Array, ...]
  inv_perms: tuple[jax.Array, ...]
  mixes: tuple[jax.Array, ...] = ()

  def block_counts(self) -> tuple[int, ...]:
    """Blocks per axis: ``k_i``, 1 for an unblocked axis."""
    return tuple(s.shape[0] if s.ndim == 2 else 1 for s in self.signs)

  def leaf_axes(self) -> "HadamardRotation":
    """The parameter axis of each state array."""
    lengths = [s.shape[-1] for s in self.signs]
    permuted = tuple(i for i, b in enumerate(lengths) if is_permuted(b))
    mixed = tuple(i for i, b in enumerate(lengths) if is_mixed(b))
    return HadamardRotation(tuple(range(len(self.signs))), permuted, permuted, mixed)

  def _axis_parts(self) -> list[tuple[jax.Array | None, jax.Array | None, jax.Array | None]]:
    """Per axis: its ``(perm, inv_perm, mix)``, each None where the axis has none."""
    perms, inv_perms, mixes = iter(self.perms), iter(self.inv_perms), iter(self.mixes)
    parts = []
    for s in self.signs:
      b = s.shape[-1]
      if is_mixed(b):
        parts.append((None, None, next(mixes)))
      elif is_permuted(b):
        parts.append((next(perms), next(inv_perms), None))
      else:
        parts.append((None, None, None))
    return parts

  def _rotate_one_block(self, x: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    for axis, (perm, _, mix) in enumerate(self._axis_parts()):
      if axes is not None and axis not in axes:
        continue
      x = _scale_along(x, self.signs[axis], axis)
      if mix is not None:
        x = _mixed_hadamard(x, axis, mix, transpose=False)
        continue
      if perm is not None:
        x = jnp.take(x, perm, axis=axis)
      x = block_hadamard(x, axis)
    return x

  def _unrotate_one_block(self, y: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    for axis, (_, inv_perm, mix) in enumerate(self._axis_parts()):
      if axes is not None and axis not in axes:
        continue
      if mix is not None:
        y = _mixed_hadamard(y, axis, mix, transpose=True)
      else:
        y = block_hadamard(y, axis)
        if inv_perm is not None:
          y = jnp.take(y, inv_perm, axis=axis)
      y = _scale_along(y, self.signs[axis], axis)
    return y

  def rotate_axes(self, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """The factors ``Q_i`` of ``axes`` only, each along its own axis (no other axis is read).

    ``Q`` is their product over all axes in any order (the factors act on different axes and
    commute), so ``rotate`` is ``rotate_axes`` over every axis, in any grouping. One-block
    rotations only.
    """
    return self._rotate_one_block(x, tuple(axes))

  def unrotate_axes(self, y: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``Q_i^T`` of ``axes`` only (``rotate_axes``'s inverse on those axes)."""
    return self._unrotate_one_block(y, tuple(axes))

  def rotate(self, x: jax.Array) -> jax.Array:
    return axis_blocks.apply_in_blocks(HadamardRotation._rotate_one_block, self,
                                       self.leaf_axes(), self.block_counts(), x)

  def unrotate(self, y: jax.Array) -> jax.Array:
    return axis_blocks.apply_in_blocks(HadamardRotation._unrotate_one_block, self,
                                       self.leaf_axes(), self.block_counts(), y)


def _flatten_with_keys(rot: HadamardRotation) -> tuple[list[tuple[Any, Any]], bool]:
  """Children of a ``HadamardRotation`` pytree node: ``mixes`` only when it is not empty.

  A rotation without mixed axes (every power-of-two shape) so keeps the three-field structure
  (``signs``, ``perms``, ``inv_perms``) that checkpoints of such rotations hold: they restore.
  """
  names = ("signs", "perms", "inv_perms") + (("mixes",) if rot.mixes else ())
  return [(jax.tree_util.GetAttrKey(n), getattr(rot, n)) for n in names], bool(rot.mixes)


def _unflatten(has_mixes: bool, children: Any) -> HadamardRotation:
  del has_mixes  # The children say it: three or four.
  return HadamardRotation(*children)


jax.tree_util.register_pytree_with_keys(HadamardRotation, _flatten_with_keys, _unflatten)


def _mixed_hadamard(x: jax.Array, axis: int, r_mm: jax.Array, transpose: bool) -> jax.Array:
  """``(R (x) H_{2^k}/sqrt(2^k))`` along ``axis`` (length ``m 2^k``), or its transpose.

  The axis is viewed as ``[m, 2^k]``: the normalised Hadamard on the minor part (symmetric, so
  the same both ways), then ``R`` (or ``R^T``) on the major part. The two act on different parts,
  so their order does not change the result.
  """
  shape = x.shape
  m = r_mm.shape[0]
  y = x.reshape(shape[:axis] + (m, shape[axis] // m) + shape[axis + 1:])
  y = block_hadamard(y, axis + 1)
  contract = 0 if transpose else 1
  y = jnp.tensordot(r_mm.astype(y.dtype), y, axes=([contract], [axis]), precision=_HIGHEST)
  return jnp.moveaxis(y, 0, axis).reshape(shape)


def _scale_along(x: jax.Array, s_d: jax.Array, axis: int) -> jax.Array:
  """``x`` times the sign vector ``s_d`` (``[d]``) along ``axis``: one factor of ``D``."""
  return x * s_d.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))


@dataclasses.dataclass(frozen=True)
class Hadamard:
  """Randomized Hadamard per axis: random signs and a Hadamard transform; on an axis whose length
  ``m 2^k`` is not a power of two, also a Haar-random dense ``m x m`` mix across its ``m``
  Hadamard blocks (or, when ``m > MAX_MIX_DIM``, a random permutation before a block-diagonal
  Hadamard instead). See the module docstring for ``Q``.

  Attributes:
    blocks: block count per axis (``()``: one per axis; shorter: padded with 1s). Axis ``i`` is
      cut into ``blocks[i]`` equal contiguous blocks, each an independent randomized Hadamard
      (own signs; own ``R`` or permutation if the block length is not a power of two), so ``Q``
      mixes coordinates only within a block. Each must divide its axis. The default, one block
      per axis, mixes every axis whole on every mesh.

  Example:
    >>> rot = Hadamard(blocks=(4, 1)).init(jax.random.key(0), (768, 3072))
    >>> rot.signs[0].shape, rot.signs[1].shape
    ((4, 192), (3072,))
  """

  blocks: tuple[int, ...] = ()
  name = "hadamard"

  def __post_init__(self):
    object.__setattr__(self, "blocks", axis_blocks.check_blocks(self.blocks, self.name))

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> HadamardRotation:
    counts = axis_blocks.resolve_blocks(self.blocks, shape, self.name, path)
    keys = jax.random.split(key, 2 * max(len(shape), 1))
    signs = tuple(
        jnp.where(jax.random.bernoulli(k, 0.5, _state_shape(d, c)), -1, 1).astype(jnp.int8)
        for k, d, c in zip(keys[0::2], shape, counts)
    )
    # A non-power-of-two axis draws its R or its permutation from the same key; power-of-two
    # axes draw only their signs, so their rotation does not depend on the other axes' kind.
    perms = tuple(
        _block_permutations(k, d, c)
        for k, d, c in zip(keys[1::2], shape, counts) if is_permuted(d // c)
    )
    mixes = tuple(
        _block_mixes(k, d, c) for k, d, c in zip(keys[1::2], shape, counts) if is_mixed(d // c)
    )
    return HadamardRotation(signs, perms, tuple(_inverse_permutation(p) for p in perms), mixes)


def _state_shape(dim: int, count: int) -> Shape:
  """``(dim,)`` for one block, ``(count, dim / count)`` for ``count > 1`` blocks."""
  return (dim,) if count == 1 else (count, dim // count)


def _block_mixes(key: jax.Array, dim: int, count: int) -> jax.Array:
  """float32 ``[m, m]`` Haar matrix (``m``: odd part of ``dim``), or ``[count, m, m]`` (of the
  block length ``dim / count``): one independent draw per block."""
  m = odd_part(dim // count)
  if count == 1:
    return haar_by_reflections(key, m)
  return jax.vmap(lambda k: haar_by_reflections(k, m))(jax.random.split(key, count))


def haar_by_reflections(key: jax.Array, dim: int) -> jax.Array:
  """A Haar-distributed orthogonal float32 ``[dim, dim]`` matrix from Householder reflections.

  The Householder QR of a Gaussian matrix, with ``R``'s diagonal made positive, has a Haar ``Q``
  (Stewart 1980; Mezzadri 2007). Step ``k`` reflects a vector that is a fresh standard Gaussian
  on coordinates ``k..dim-1``, so row ``k`` of one Gaussian ``G`` stands in for it:
  ``Q = H_0 H_1 ... H_{dim-2} S``, ``H_k = I - 2 v v^T / |v|^2``,
  ``v = x + sign(x_k) |x| e_k`` with ``x = G[k, k:]`` (zeros before ``k``), and ``S`` the signs that
  make ``R``'s diagonal positive (``-sign(x_k)``; the last one ``sign(G[-1, -1])``). Only matmuls
  and a loop: no LAPACK QR, which on jax 0.10's CPU runtime can deadlock when several are in one
  program (``softmax_one_jax/runtime.py``), so the default rotation needs no workaround.

  Example:
    >>> r = haar_by_reflections(jax.random.key(0), 3)
    >>> bool(jnp.allclose(r @ r.T, jnp.eye(3), atol=1e-6))
    True
  """
  g_dd = jax.random.normal(key, (dim, dim), jnp.float32)
  idx = jnp.arange(dim)

  def reflect(k, carry):
    q_dd, s_d = carry
    x_d = jnp.where(idx >= k, g_dd[k], 0.0)
    sign = jnp.where(x_d[k] >= 0, 1.0, -1.0)
    v_d = x_d + jnp.where(idx == k, sign * jnp.sqrt(jnp.sum(x_d * x_d)), 0.0)
    qv_d = jnp.matmul(q_dd, v_d, precision=_HIGHEST)
    q_dd = q_dd - jnp.outer(qv_d, v_d) * (2.0 / jnp.sum(v_d * v_d))
    return q_dd, s_d.at[k].set(-sign)

  init = (jnp.eye(dim, dtype=jnp.float32), jnp.ones((dim,), jnp.float32))
  q_dd, s_d = jax.lax.fori_loop(0, dim - 1, reflect, init)
  s_d = s_d.at[dim - 1].set(jnp.where(g_dd[dim - 1, dim - 1] >= 0, 1.0, -1.0))
  return q_dd * s_d[None, :]


def _block_permutations(key: jax.Array, dim: int, count: int) -> jax.Array:
  """int32 ``[dim]`` permutation, or ``[count, dim / count]``: one within each block."""
  if count == 1:
    return _random_permutation(key, dim)
  return jax.vmap(lambda k: _random_permutation(k, dim // count))(jax.random.split(key, count))


def _random_permutation(key: jax.Array, dim: int) -> jax.Array:
  """int32 ``[dim]`` permutation: argsort of random 32-bit keys (one sort, cheap to compile).

  Ties (probability ~``dim^2 / 2^33``) are broken by index, so it is always a permutation.
  """
  return jnp.argsort(jax.random.bits(key, (dim,), jnp.uint32), stable=True).astype(jnp.int32)


def _inverse_permutation(perm: jax.Array) -> jax.Array:
  """The inverse of each permutation along the last axis of ``perm`` (``[d]`` or ``[k, d]``)."""
  if perm.ndim > 1:
    return jax.vmap(_inverse_permutation)(perm)
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
