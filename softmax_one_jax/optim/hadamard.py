"""Walsh-Hadamard transforms along one axis of an array, for OrthoAdam's "hadamard" rotation.

An axis of any length ``d`` gets a block-diagonal normalised Hadamard matrix whose block sizes are
the binary digits of ``d`` (``11008 = 8192 + 2048 + 512 + 256``), each block a Sylvester matrix
``H_{2^k} / sqrt(2^k)``: square and exactly orthogonal, no padding. A power-of-two block is
computed as a product of small Hadamard matmuls (``H_{2^a} (x) H_{2^b} = H_{2^(a+b)}``), each in
the array's own layout: on the last axis its minor factor from the right, every other factor from
the left, so no factor needs a transpose.

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


# Largest factor, as log2: a factor ``H_{2^c}`` costs ``2^c`` multiply-adds per element, so the
# transform costs ``n * sum(2^c)`` instead of the dense ``n * 2^k``. The last axis's factors are
# at most 32 x 32, the other axes' 8 x 8 (fixed: they set the float rounding, which tests pin).
_LAST_AXIS_MAX_LOG2 = 5
_OTHER_AXES_MAX_LOG2 = 3


def _left_factors(x: jax.Array, axis: int, max_log2: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis`` as small Hadamard matrices multiplied from the left.

  With the axis split into factors ``[f_0, f_1, ...]``, factor ``i`` views the axis alone as
  ``[done, f_i, rest]`` and contracts ``H_{f_i}`` with its middle part. No other axis is reshaped,
  so a sharded neighbouring axis stays sharded (``layout.py`` rotates one axis at a time).
  """
  shape, dim = x.shape, x.shape[axis]
  y, done = x, 1
  for c in _pow2_chunks(dim.bit_length() - 1, max_log2):
    h = jnp.asarray(sylvester_signs(c), dtype=y.dtype)
    y = y.reshape(shape[:axis] + (done, 1 << c, dim // (done << c)) + shape[axis + 1:])
    y = jnp.moveaxis(jnp.tensordot(h, y, axes=([1], [axis + 1]), precision=_HIGHEST), 0, axis + 1)
    done <<= c
  return y.reshape(shape)


def _last_axis_factors(x: jax.Array, max_log2: int) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along the last axis: ``H_{2^c}`` on its minor ``2^c`` sub-axis from
  the right (``c = min(k, max_log2)``, reading memory in place), then ``H_{2^(k-c)}`` on the rest
  from the left.
  """
  shape, log2_dim = x.shape, x.shape[-1].bit_length() - 1
  c = min(log2_dim, max_log2)
  y = x.reshape(shape[:-1] + (shape[-1] >> c, 1 << c))
  y = jnp.tensordot(y, jnp.asarray(sylvester_signs(c), dtype=y.dtype), axes=([y.ndim - 1], [0]),
                    precision=_HIGHEST)
  if log2_dim > c:
    y = _left_factors(y, y.ndim - 2, max_log2)
  return y.reshape(shape)


def _pow2_hadamard(x: jax.Array, axis: int) -> jax.Array:
  """Applies ``H_{2^k}/sqrt(2^k)`` along ``axis`` (length ``2^k``)."""
  dim = x.shape[axis]
  if dim == 1:
    return x
  if axis == x.ndim - 1:
    y = _last_axis_factors(x, _LAST_AXIS_MAX_LOG2)
  else:
    y = _left_factors(x, axis, _OTHER_AXES_MAX_LOG2)
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
