"""Walsh-Hadamard transforms along one axis of an array, for OrthoAdam's "hadamard" rotation.

An axis of any length ``d`` gets a block-diagonal normalised Hadamard matrix whose block sizes are
the binary digits of ``d`` (``11008 = 8192 + 2048 + 512 + 256``), each block a Sylvester matrix
``H_{2^k} / sqrt(2^k)``: square and exactly orthogonal, no padding. A power-of-two block is
computed as a product of small Hadamard matmuls (``H_{2^a} (x) H_{2^b} = H_{2^(a+b)}``), each in
the array's own layout: on the last axis its minor factor from the right, every other factor from
the left, so no factor needs a transpose. The factors are up to 128 wide on TPUs and GPUs and
narrower on CPUs (``factor_widths``).

Example:
  >>> x = jnp.eye(4)
  >>> bool(jnp.allclose(block_hadamard(block_hadamard(x, 0), 0), x, atol=1e-6))
  True
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


class FactorWidths(NamedTuple):
  """Largest Hadamard factors, as log2: the last axis's minor factor, and every other factor."""
  last_minor: int
  other: int


# A factor ``H_{2^c}`` is one pass over the array (read and write: 8 bytes per float32 element)
# and ``2^c`` multiply-adds per element, so the widths trade passes for arithmetic:
# - TPU and GPU: 128 wide. On a TPU the transform is memory-bound: float32 at HIGHEST precision is
#   6 bf16 MXU passes, so a 128-wide factor is ~190 flops per byte, about a v5e's (240) or v5p's
#   (166) ridge, and every axis up to 2^14 takes at most two passes. The last axis's minor factor
#   is 128 where the axis allows: a TPU vector register holds 128 lanes, and a narrower minor
#   sub-axis would be padded to 128 in memory. On an H100 (float32 at 67 TFLOP/s, 3.35 TB/s) a
#   128-wide pass is mildly compute-bound but still cheaper than the two narrow passes it saves.
# - CPU: 32 on the last axis, 8 elsewhere. A CPU has no matrix unit and is compute-bound here;
#   narrow factors keep the transform a few percent of a train step (bench/optimizer.py).
# The widths set the float rounding (tests pin the CPU's); ``Q`` is the same matrix either way.
FACTOR_WIDTHS = {"cpu": FactorWidths(last_minor=5, other=3)}
ACCELERATOR_WIDTHS = FactorWidths(last_minor=7, other=7)


def factor_widths(platform: str) -> FactorWidths:
  """The factor widths of ``platform`` ("cpu", "gpu", "tpu").

  Example:
    >>> factor_widths("cpu"), factor_widths("tpu")
    (FactorWidths(last_minor=5, other=3), FactorWidths(last_minor=7, other=7))
  """
  return FACTOR_WIDTHS.get(platform, ACCELERATOR_WIDTHS)


def _left_factors(x: jax.Array, axis: int, chunks: list[int]) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along ``axis`` as small Hadamard matrices multiplied from the left.

  With the axis split into factors ``[f_0, f_1, ...]`` (``f_i = 2^chunks[i]``), factor ``i`` views
  the axis alone as ``[done, f_i, rest]`` and contracts ``H_{f_i}`` with its middle part. No other
  axis is reshaped, so a sharded neighbouring axis stays sharded (``layout.py`` rotates one axis at
  a time).
  """
  shape, dim = x.shape, x.shape[axis]
  y, done = x, 1
  for c in chunks:
    h = jnp.asarray(sylvester_signs(c), dtype=y.dtype)
    y = y.reshape(shape[:axis] + (done, 1 << c, dim // (done << c)) + shape[axis + 1:])
    y = jnp.moveaxis(jnp.tensordot(h, y, axes=([1], [axis + 1]), precision=_HIGHEST), 0, axis + 1)
    done <<= c
  return y.reshape(shape)


def _last_axis_factors(x: jax.Array, log2_dim: int, widths: FactorWidths) -> jax.Array:
  """Unnormalised ``H_{2^k}`` along the last axis: ``H_{2^c}`` on its minor ``2^c`` sub-axis from
  the right (``c = min(k, widths.last_minor)``, reading memory in place), then ``H_{2^(k-c)}``
  on the rest from the left."""
  shape, c = x.shape, min(log2_dim, widths.last_minor)
  y = x.reshape(shape[:-1] + (shape[-1] >> c, 1 << c))
  y = jnp.tensordot(y, jnp.asarray(sylvester_signs(c), dtype=y.dtype), axes=([y.ndim - 1], [0]),
                    precision=_HIGHEST)
  if log2_dim > c:
    y = _left_factors(y, y.ndim - 2, _pow2_chunks(log2_dim - c, widths.other))
  return y.reshape(shape)


def _pow2_hadamard(x: jax.Array, axis: int, widths: FactorWidths) -> jax.Array:
  """Applies ``H_{2^k}/sqrt(2^k)`` along ``axis`` (length ``2^k``)."""
  dim = x.shape[axis]
  if dim == 1:
    return x
  log2_dim = dim.bit_length() - 1
  if axis == x.ndim - 1:
    y = _last_axis_factors(x, log2_dim, widths)
  else:
    y = _left_factors(x, axis, _pow2_chunks(log2_dim, widths.other))
  return y * jnp.asarray(1.0 / math.sqrt(dim), y.dtype)


def hadamard_block_sizes(dim: int) -> list[int]:
  """Block sizes of the per-axis Hadamard: the binary digits of ``dim``, largest first."""
  return [1 << b for b in reversed(range(dim.bit_length())) if dim >> b & 1]


def block_hadamard(x: jax.Array, axis: int, platform: str | None = None) -> jax.Array:
  """Block-diagonal normalised Hadamard along ``axis`` (blocks: binary digits of its length).

  ``platform`` picks the factor widths (``factor_widths``); default: the platform the code is
  built for (``sharding.target_platform``: a TPU slice compiled ahead of time takes the TPU's).
  """
  widths = factor_widths(platform or target_platform())
  sizes = hadamard_block_sizes(x.shape[axis])
  if len(sizes) == 1:
    return _pow2_hadamard(x, axis, widths)
  splits = np.cumsum(sizes)[:-1].tolist()
  parts = jnp.split(x, splits, axis=axis)
  return jnp.concatenate([_pow2_hadamard(p, axis, widths) for p in parts], axis=axis)
