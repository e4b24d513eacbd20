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
``"hadamard"``  ``(H_0 P_0 (x) H_1 P_1 (x) ...) D``: random signs ``D`` (one  n/8 bytes + sum d_i
                per element, bit-packed), a random permutation ``P_i`` and a  / n log n
                normalised Walsh-Hadamard ``H_i`` per axis
``"identity"``  ``I``: plain Adam(W)                                           0 / 0
==============  ===========================================================  ==================

Haar matrices follow Mezzadri (2007): ``Q, R = qr(G)`` for a standard Gaussian ``G``, then
the columns of ``Q`` are multiplied by ``sign(diag(R))``.

Hadamard on any axis length: an axis of length ``d`` is split into consecutive blocks whose sizes
are the binary digits of ``d`` (``11008 = 8192 + 2048 + 512 + 256``) and each block gets a
normalised Sylvester Hadamard matrix ``H_{2^k} / sqrt(2^k)``. The result is block-diagonal, hence
square and exactly orthogonal on the parameter's own space (no padding, so moments keep the
parameter's shape). The random permutation before it decides which coordinates share a block.
A power-of-two block is applied as a product of small Hadamard matmuls (<= 128, or <= 16 on
CPU), which is ``H_{2^a} (x) H_{2^b} = H_{2^(a+b)}``: ``O(n log n)`` work on matrix units.

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
import functools
import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]
_HIGHEST = jax.lax.Precision.HIGHEST
# A power-of-two Hadamard is applied as a product of small ones: <= 128 x 128 feeds matrix units
# (GPU/TPU); on CPU, where each factor is a pass over memory, <= 16 x 16 measured fastest
# (bench/optimizer.py). The result is the same Sylvester matrix either way.
_MAX_HADAMARD_FACTOR_LOG2 = {"cpu": 4}
_DEFAULT_HADAMARD_FACTOR_LOG2 = 7


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
  """``Q = Q_0 (x) Q_1 (x) ...``; ``factors[i]`` float32 ``[d_i, d_i]`` rotates axis ``i``.

  For a matrix ``G``: ``rotate(G) = Q_0 @ G @ Q_1^T``.
  """

  factors: tuple[jax.Array, ...]

  def rotate(self, x: jax.Array) -> jax.Array:
    for axis, q_dd in enumerate(self.factors):
      x = jnp.moveaxis(jnp.tensordot(q_dd, x, axes=([1], [axis]), precision=_HIGHEST), 0, axis)
    return x

  def unrotate(self, y: jax.Array) -> jax.Array:
    for axis, q_dd in enumerate(self.factors):
      y = jnp.moveaxis(jnp.tensordot(q_dd, y, axes=([0], [axis]), precision=_HIGHEST), 0, axis)
    return y


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


class HadamardRotation(NamedTuple):
  """``Q = (H_0 P_0 (x) H_1 P_1 (x) ...) D``, a randomized Hadamard transform per axis.

  ``sign_bits``: uint8, the parameter's shape with the last axis bit-packed (``ceil(d/8)``);
  bit 1 means sign -1. ``perms[i]`` / ``inv_perms[i]``: int32 ``[d_i]``, ``(P_i x)[j] =
  x[perm[j]]``. ``H_i``: block-diagonal normalised Sylvester Hadamard (binary digits of ``d_i``).
  Scalars have no axes and use ``sign_bits`` of shape ``[1]``.
  """

  sign_bits: jax.Array
  perms: tuple[jax.Array, ...]
  inv_perms: tuple[jax.Array, ...]

  def _signs(self, shape: Shape, dtype: jnp.dtype) -> jax.Array:
    last = shape[-1] if shape else 1
    bits = jnp.unpackbits(self.sign_bits, axis=-1, count=last)
    return (1 - 2 * bits.astype(dtype)).reshape(shape)

  def rotate(self, x: jax.Array) -> jax.Array:
    x = x * self._signs(x.shape, x.dtype)
    for axis, perm in enumerate(self.perms):
      x = _block_hadamard(jnp.take(x, perm, axis=axis), axis)
    return x

  def unrotate(self, y: jax.Array) -> jax.Array:
    for axis, inv_perm in enumerate(self.inv_perms):
      y = jnp.take(_block_hadamard(y, axis), inv_perm, axis=axis)
    return y * self._signs(y.shape, y.dtype)


RotationState = Union[IdentityRotation, DenseRotation, KroneckerRotation, BlockRotation,
                      HadamardRotation]
ROTATION_STATE_TYPES = (IdentityRotation, DenseRotation, KroneckerRotation, BlockRotation,
                        HadamardRotation)


# ----------------------------------------------------------------------------- Walsh-Hadamard


@functools.cache
def sylvester_hadamard(log2_dim: int) -> np.ndarray:
  """Normalised Sylvester Hadamard ``H_{2^k} / sqrt(2^k)``, float32 numpy ``[2^k, 2^k]``."""
  h = np.ones((1, 1), np.float64)
  for _ in range(log2_dim):
    h = np.block([[h, h], [h, -h]])
  return (h / math.sqrt(h.shape[0])).astype(np.float32)


def _pow2_chunks(log2_dim: int) -> list[int]:
  """Splits ``k`` into near-equal parts of at most 7 (4 on CPU): ``13 -> [7, 6]``."""
  max_log2 = _MAX_HADAMARD_FACTOR_LOG2.get(jax.default_backend(), _DEFAULT_HADAMARD_FACTOR_LOG2)
  num = max(1, -(-log2_dim // max_log2))
  base, extra = divmod(log2_dim, num)
  return [base + (1 if i < extra else 0) for i in range(num)]


def _pow2_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Applies ``H_{2^k}/sqrt(2^k)`` along ``axis`` (length ``2^k``) as small Hadamard matmuls."""
  dim = x.shape[axis]
  log2_dim = dim.bit_length() - 1
  if log2_dim == 0:
    return x
  chunks = _pow2_chunks(log2_dim)
  shape = x.shape
  y = x.reshape(shape[:axis] + tuple(2**c for c in chunks) + shape[axis + 1:])
  # Contract sub-axis `axis` and append the result last; after len(chunks) steps the sub-axes are
  # back in order (a cyclic shift), so (H_a (x) H_b ...) is applied in Sylvester order.
  for c in chunks:
    h = jnp.asarray(sylvester_hadamard(c), dtype=y.dtype)
    y = jnp.tensordot(y, h, axes=([axis], [0]), precision=_HIGHEST)
    y = jnp.moveaxis(y, -1, axis + len(chunks) - 1)
  return y.reshape(shape)


def hadamard_block_sizes(dim: int) -> list[int]:
  """Block sizes of the per-axis Hadamard: the binary digits of ``dim``, largest first."""
  return [1 << b for b in reversed(range(dim.bit_length())) if dim >> b & 1]


def _block_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Block-diagonal normalised Hadamard along ``axis`` (blocks: binary digits of its length)."""
  sizes = hadamard_block_sizes(x.shape[axis])
  if len(sizes) == 1:
    return _pow2_hadamard(x, axis)
  splits = np.cumsum(sizes)[:-1].tolist()
  parts = jnp.split(x, splits, axis=axis)
  return jnp.concatenate([_pow2_hadamard(p, axis) for p in parts], axis=axis)


# ----------------------------------------------------------------------------- families


def _random_permutation(key: jax.Array, dim: int) -> jax.Array:
  """int32 ``[dim]`` permutation: argsort of random 32-bit keys (one sort, cheap to compile).

  Ties (probability ~``dim^2 / 2^33``) are broken by index, so it is always a permutation.
  """
  return jnp.argsort(jax.random.bits(key, (dim,), jnp.uint32), stable=True).astype(jnp.int32)


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
    max_dim: the longest axis accepted (``None``: no limit); each factor is ``d_i^2`` numbers.
  """

  max_dim: int | None = 8192
  name = "kronecker"

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> KroneckerRotation:
    if self.max_dim is not None and any(d > self.max_dim for d in shape):
      raise ValueError(
          f"rotation 'kronecker' for parameter {path or '<param>'} of shape {shape} has an axis "
          f"longer than Kronecker(max_dim={self.max_dim}); a {max(shape)}^2 factor is "
          f"{4 * max(shape)**2 / 2**20:.0f} MiB. Use 'hadamard' for it or raise max_dim."
      )
    keys = jax.random.split(key, max(len(shape), 1))
    return KroneckerRotation(tuple(haar_orthogonal(k, d) for k, d in zip(keys, shape)))


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


@dataclasses.dataclass(frozen=True)
class Hadamard:
  """Randomized Hadamard: per-element random signs, per-axis random permutation and Hadamard."""

  name = "hadamard"

  def init(self, key: jax.Array, shape: Shape, path: str = "") -> HadamardRotation:
    del path
    key_signs, key_perm = jax.random.split(key)
    bits_shape = shape if shape else (1,)
    bits = jax.random.bernoulli(key_signs, 0.5, bits_shape).astype(jnp.uint8)
    sign_bits = jnp.packbits(bits, axis=-1)
    keys = jax.random.split(key_perm, max(len(shape), 1))
    perms = tuple(_random_permutation(k, d) for k, d in zip(keys, shape))
    inv_perms = tuple(
        jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype)) for p in perms
    )
    return HadamardRotation(sign_bits, perms, inv_perms)


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
    >>> rotation_state_bytes((4096, 11008), "hadamard")
    5756928
  """
  fam = get_family(family)
  abstract = jax.eval_shape(lambda: fam.init(jax.random.key(0), tuple(shape)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
