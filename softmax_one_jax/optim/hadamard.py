"""Walsh-Hadamard transforms along one axis of an array, for OrthoAdam's "hadamard" rotation.

An axis of any length ``d`` gets a block-diagonal normalised Hadamard matrix whose block sizes are
the binary digits of ``d`` (``11008 = 8192 + 2048 + 512 + 256``), each block a Sylvester matrix
``H_{2^k} / sqrt(2^k)``: square and exactly orthogonal, no padding. A power-of-two block is
computed in ``O(n log n)`` as a product of small Hadamard matmuls (``H_{2^a} (x) H_{2^b} =
H_{2^(a+b)}``), multiplied from the right or the left, or as radix-4 butterflies (additions only);
which one depends on the backend and the axis (``_HADAMARD_IMPL``), never the matrix.

Example:
  >>> x = jnp.eye(4)
  >>> bool(jnp.allclose(block_hadamard(block_hadamard(x, 0), 0), x, atol=1e-6))
  True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from softmax_one_jax.sharding import target_platform

_HIGHEST = jax.lax.Precision.HIGHEST


def is_power_of_two(dim: int) -> bool:
  """``dim`` is 1, 2, 4, 8, ...

  Example:
    >>> is_power_of_two(512), is_power_of_two(50304)
    (True, False)
  """
  return dim > 0 and dim & (dim - 1) == 0


@functools.cache
def sylvester_signs(log2_dim: int) -> np.ndarray:
  """Unnormalised Sylvester Hadamard ``H_{2^k}`` (entries exactly +-1), float32 ``[2^k, 2^k]``."""
  h = np.ones((1, 1), np.float32)
  for _ in range(log2_dim):
    h = np.block([[h, h], [h, -h]])
  return h


def _pow2_chunks(log2_dim: int, max_log2: int) -> list[int]:
  """Splits ``k`` into near-equal parts of at most ``max_log2``: ``(13, 7) -> [7, 6]``."""
  num = max(1, -(-log2_dim // max_log2))
  base, extra = divmod(log2_dim, num)
  return [base + (1 if i < extra else 0) for i in range(num)]


def _hadamard_by_matmuls(x: jax.Array, axis: int, max_log2: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis`` as a product of small Hadamard matmuls."""
  chunks = _pow2_chunks(x.shape[axis].bit_length() - 1, max_log2)
  shape = x.shape
  y = x.reshape(shape[:axis] + tuple(2**c for c in chunks) + shape[axis + 1:])
  # Contract sub-axis `axis` and append the result last; after len(chunks) steps the sub-axes are
  # back in order (a cyclic shift), so (H_a (x) H_b ...) is applied in Sylvester order.
  for c in chunks:
    h = jnp.asarray(sylvester_signs(c), dtype=y.dtype)
    y = jnp.tensordot(y, h, axes=([axis], [0]), precision=_HIGHEST)
    y = jnp.moveaxis(y, -1, axis + len(chunks) - 1)
  return y.reshape(shape)


def _hadamard_by_left_matmuls(x: jax.Array, axis: int, max_log2: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis`` as small Hadamard matrices multiplied from the left.

  With the axis split into factors ``[f_0, f_1, ...]``, factor ``i`` views the array as
  ``[pre, f_i, post]`` and computes ``H_{f_i} @ x[p]`` for every ``p``: a batched matmul in the
  array's own layout, no transposes (unlike ``_hadamard_by_matmuls`` off the last axis).
  """
  shape = x.shape
  y, pre = x, math.prod(shape[:axis])
  for c in _pow2_chunks(shape[axis].bit_length() - 1, max_log2):
    h = jnp.asarray(sylvester_signs(c), dtype=y.dtype)
    y = y.reshape(pre, 1 << c, -1)
    y = jnp.matmul(jnp.broadcast_to(h, (pre,) + h.shape), y, precision=_HIGHEST)
    pre <<= c
  return y.reshape(shape)


def _hadamard_by_right_and_left_matmuls(x: jax.Array, axis: int, max_log2: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis``: ``H_{2^c}`` on its minor ``2^c`` sub-axis from the
  right (``c = min(k, max_log2)``), then ``H_{2^(k-c)}`` on the rest from the left.

  Meant for the last axis, where the right factor reads memory in place and the left factors
  need no transposes; ``_hadamard_by_matmuls`` would transpose for all but its minor factor.
  """
  shape, log2_dim = x.shape, x.shape[axis].bit_length() - 1
  c = min(log2_dim, max_log2)
  y = x.reshape(shape[:axis] + (shape[axis] >> c, 1 << c) + shape[axis + 1:])
  y = _hadamard_by_matmuls(y, axis + 1, max_log2)
  if log2_dim > c:
    y = _hadamard_by_left_matmuls(y, axis, max_log2)
  return y.reshape(shape)


def _hadamard_by_butterflies(x: jax.Array, axis: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis`` as radix-4 (and one radix-2) butterfly passes.

  ``H_{2^k} = H_4 (x) H_4 (x) ...``: pass ``j`` views the array as ``[pre, 4, post]`` with the
  ``4`` on bits ``2j, 2j + 1`` of the axis and adds/subtracts its four slices: only additions,
  one elementwise pass over memory per two bits.
  """
  shape = x.shape
  outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
  log2_dim = shape[axis].bit_length() - 1
  y, done = x, 0
  while done < log2_dim:
    bits = min(2, log2_dim - done)
    y = y.reshape(outer << done, 1 << bits, (inner << (log2_dim - done - bits)))
    if bits == 2:
      x0, x1, x2, x3 = y[:, 0], y[:, 1], y[:, 2], y[:, 3]
      s01, d01, s23, d23 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
      y = jnp.stack([s01 + s23, d01 + d23, s01 - s23, d01 - d23], axis=1)
    else:
      y = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1)
    done += bits
  return y.reshape(shape)


# How a power-of-two Hadamard is computed, per backend: ``(along the last axis, along the other
# axes)``, each ``(method, log2 of the largest factor)``; the matrix is the same. On GPU/TPU,
# matmuls with <= 128x128 factors feed the matrix units. On CPU no factor needs a transpose: along
# the last (contiguous) axis one <= 32x32 factor from the right, then the rest from the left;
# along the other axes 8x8 factors from the left. Measured on a 2-core EPYC VM against the former
# choice (32x32 factors on the last axis, with transposes; radix-4 butterflies elsewhere): the
# [32768, 512] embedding block's leading axis 73 -> 31 ms, its last axis 38 -> 23 ms; OrthoAdam's
# update at gpt2-60m 546 -> 371 ms, at tiny 13.0 -> 10.5 ms.
_IMPLS = {
    "butterfly": lambda x, axis, max_log2: _hadamard_by_butterflies(x, axis),
    "matmul": _hadamard_by_matmuls,
    "left_matmul": _hadamard_by_left_matmuls,
    "right_left": _hadamard_by_right_and_left_matmuls,
}
_Impl = tuple[str, int]
_HADAMARD_IMPL: dict[str, tuple[_Impl, _Impl]] = {
    "cpu": (("right_left", 5), ("left_matmul", 3)),
}
_DEFAULT_HADAMARD_IMPL = (("matmul", 7), ("matmul", 7))


def _pow2_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Applies ``H_{2^k}/sqrt(2^k)`` along ``axis`` (length ``2^k``)."""
  dim = x.shape[axis]
  if dim == 1:
    return x
  last, other = _HADAMARD_IMPL.get(target_platform(), _DEFAULT_HADAMARD_IMPL)
  method, max_log2 = last if axis == x.ndim - 1 else other
  y = _IMPLS[method](x, axis, max_log2)
  return y * jnp.asarray(1.0 / math.sqrt(dim), y.dtype)


def hadamard_block_sizes(dim: int) -> list[int]:
  """Block sizes of the per-axis Hadamard: the binary digits of ``dim``, largest first."""
  return [1 << b for b in reversed(range(dim.bit_length())) if dim >> b & 1]


def block_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Block-diagonal normalised Hadamard along ``axis`` (blocks: binary digits of its length)."""
  sizes = hadamard_block_sizes(x.shape[axis])
  if len(sizes) == 1:
    return _pow2_hadamard(x, axis)
  splits = np.cumsum(sizes)[:-1].tolist()
  parts = jnp.split(x, splits, axis=axis)
  return jnp.concatenate([_pow2_hadamard(p, axis) for p in parts], axis=axis)
