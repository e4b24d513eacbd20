"""OrthoAdam's default rotation: a randomized Hadamard matrix per axis, stored as small integers.

``Q = (H_0 P_0 D_0) (x) (H_1 P_1 D_1) (x) ...``: per axis ``i``, random signs ``D_i``, a random
permutation ``P_i`` (only where the length is not a power of two) and the normalised
Walsh-Hadamard ``H_i`` of ``softmax_one_jax.optim.hadamard``. Every entry of ``Q`` is nonzero on
power-of-two shapes (``+-1/sqrt(n)``), like a Haar ``Q``'s, but the state is ``sum d_i`` small
integers and the transform costs ``log2 n`` additions per element. With per-axis ``blocks``
(``axis_blocks.py``), ``Q`` is block-diagonal on each axis: shard-local on a sharded parameter.

Example:
  >>> rot = Hadamard().init(jax.random.key(0), (4, 6))
  >>> x = jnp.ones((4, 6))
  >>> bool(jnp.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softmax_one_jax.optim import axis_blocks
from softmax_one_jax.optim.axis_blocks import Shape
from softmax_one_jax.optim.hadamard import block_hadamard, is_power_of_two


class HadamardRotation(NamedTuple):
  """``Q = (H_0 P_0 D_0) (x) (H_1 P_1 D_1) (x) ...``: a randomized Hadamard matrix per axis.

  ``signs[i]``: int8 ``[d_i]`` of +-1, the diagonal of ``D_i``. ``perms`` / ``inv_perms``: int32
  ``[d_i]``, ``(P_i x)[j] = x[perm[j]]``, one per axis whose length is *not* a power of two, in
  axis order (on a power-of-two axis ``H_i`` mixes every coordinate with every other, so ``P_i``
  is the identity and costs nothing). ``H_i``: block-diagonal normalised Sylvester Hadamard
  (binary digits of ``d_i``). Scalars have no axes: ``Q = 1``.

  An axis cut into ``k_i > 1`` blocks of length ``b_i`` (``axis_blocks.py``) has a
  block-diagonal ``H_i P_i D_i``, one independent randomized Hadamard per block: its ``signs[i]``
  is ``[k_i, b_i]``, and its ``perms`` / ``inv_perms`` entries (if ``b_i`` is not a power of two)
  are ``[k_i, b_i]`` permutations within each block.
  """

  signs: tuple[jax.Array, ...]
  perms: tuple[jax.Array, ...]
  inv_perms: tuple[jax.Array, ...]

  def block_counts(self) -> tuple[int, ...]:
    """Blocks per axis: ``k_i``, 1 for an unblocked axis."""
    return tuple(s.shape[0] if s.ndim == 2 else 1 for s in self.signs)

  def leaf_axes(self) -> "HadamardRotation":
    """The parameter axis of each state array."""
    permuted = tuple(i for i, s in enumerate(self.signs) if not is_power_of_two(s.shape[-1]))
    return HadamardRotation(tuple(range(len(self.signs))), permuted, permuted)

  def _rotate_one_block(self, x: jax.Array) -> jax.Array:
    x = _scale_by_axis_signs(x, self.signs)
    perms = iter(self.perms)
    for axis in range(x.ndim):
      if not is_power_of_two(x.shape[axis]):
        x = jnp.take(x, next(perms), axis=axis)
      x = block_hadamard(x, axis)
    return x

  def _unrotate_one_block(self, y: jax.Array) -> jax.Array:
    inv_perms = iter(self.inv_perms)
    for axis in range(y.ndim):
      y = block_hadamard(y, axis)
      if not is_power_of_two(y.shape[axis]):
        y = jnp.take(y, next(inv_perms), axis=axis)
    return _scale_by_axis_signs(y, self.signs)

  def rotate(self, x: jax.Array) -> jax.Array:
    return axis_blocks.apply_in_blocks(HadamardRotation._rotate_one_block, self,
                                       self.leaf_axes(), self.block_counts(), x)

  def unrotate(self, y: jax.Array) -> jax.Array:
    return axis_blocks.apply_in_blocks(HadamardRotation._unrotate_one_block, self,
                                       self.leaf_axes(), self.block_counts(), y)


def _scale_by_axis_signs(x: jax.Array, signs: tuple[jax.Array, ...]) -> jax.Array:
  """``x * (D_0 (x) D_1 (x) ...)``: multiplies by the outer product of per-axis sign vectors."""
  for axis, s_d in enumerate(signs):
    x = x * s_d.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
  return x


@dataclasses.dataclass(frozen=True)
class Hadamard:
  """Randomized Hadamard per axis: random signs, a Hadamard transform and, on axes whose length
  is not a power of two, a random permutation (which coordinates share a Hadamard block).

  Attributes:
    blocks: block count per axis (``()``: one per axis; shorter: padded with 1s). Axis ``i`` is
      cut into ``blocks[i]`` equal contiguous blocks, each an independent randomized Hadamard
      (own signs; own permutation if the block length is not a power of two), so ``Q`` mixes
      coordinates only within a block: with ``blocks[i]`` = the shard count of a sharded axis,
      the rotation is shard-local (``shard_local_rotation`` sets this from the shardings). Each
      must divide its axis.

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
    perms = tuple(
        _block_permutations(k, d, c)
        for k, d, c in zip(keys[1::2], shape, counts) if not is_power_of_two(d // c)
    )
    return HadamardRotation(signs, perms, tuple(_inverse_permutation(p) for p in perms))


def _state_shape(dim: int, count: int) -> Shape:
  """``(dim,)`` for one block, ``(count, dim / count)`` for ``count > 1`` blocks."""
  return (dim,) if count == 1 else (count, dim // count)


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
