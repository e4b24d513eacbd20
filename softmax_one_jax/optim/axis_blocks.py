"""Per-axis block counts: block-diagonal "hadamard" and "kronecker" rotations.

With ``blocks = (k_0, k_1, ...)``, axis ``i`` of a parameter (length ``d_i``) is cut into ``k_i``
equal contiguous blocks of length ``b_i = d_i / k_i`` and the rotation on that axis is
block-diagonal, ``diag(Q_i^(1), ..., Q_i^(k_i))``, each block an independent rotation of length
``b_i``. The counts are the user's choice, fixed and the same on every mesh (a weaker mixing
than the default's whole axes: coordinates mix only within a block).

A blocked axis's state arrays carry the block axis first (``[k_i, b_i]`` signs, ``[k_i, b_i,
b_i]`` Haar factors); an unblocked axis keeps its one-block shapes (``[d_i]``, ``[d_i, d_i]``).
The parameter is viewed as ``[..., k_i, b_i, ...]`` (block axis major: a sharded axis splits into
``(shards, local)`` in place) and the one-block transform is ``vmap``-ed over the block axes, so
its own reshapes never merge a sharded axis into another one.

Example:
  >>> resolve_blocks((4,), (768, 3072), "hadamard", "mlp.kernel")
  (4, 1)
  >>> split_shape((768, 3072), (4, 1))
  (4, 192, 3072)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

Shape = tuple[int, ...]


def check_blocks(blocks: Any, family: str) -> tuple[int, ...]:
  """``blocks`` as a tuple of positive ints (a family's ``blocks`` attribute, at construction).

  Example:
    >>> check_blocks([4, 1], "hadamard")
    (4, 1)
  """
  counts = tuple(blocks)
  if not all(isinstance(k, (int, np.integer)) and k >= 1 for k in counts):
    raise ValueError(
        f"rotation {family!r} got blocks={blocks!r}; expected a tuple of positive block counts, "
        "one per axis, e.g. blocks=(4, 1) to cut axis 0 into 4 blocks."
    )
  return tuple(int(k) for k in counts)


def resolve_blocks(blocks: tuple[int, ...], shape: Shape, family: str,
                   path: str = "") -> tuple[int, ...]:
  """``blocks`` padded with 1s to ``shape``'s rank, checked to divide each axis.

  Args:
    blocks: block count per axis (``()``: one block per axis); shorter than the rank is padded.
    shape: the parameter's shape ``[d_0, d_1, ...]``.
    family: the family's name, for error messages.
    path: the parameter's path, for error messages.

  Returns:
    A tuple of ``len(shape)`` positive block counts ``k_i``, each dividing ``d_i``.

  Example:
    >>> resolve_blocks((), (4, 6), "hadamard")
    (1, 1)
  """
  name = path or "<param>"
  if len(blocks) > len(shape):
    raise ValueError(
        f"rotation {family!r} for parameter {name} of shape {shape} has blocks={blocks}, "
        f"{len(blocks)} block counts for {len(shape)} axes; give at most one per axis."
    )
  counts = tuple(blocks) + (1,) * (len(shape) - len(blocks))
  for axis, (d, k) in enumerate(zip(shape, counts)):
    if k < 1 or d % k:
      divisors = [c for c in range(1, min(d, 64) + 1) if d % c == 0]
      raise ValueError(
          f"rotation {family!r} for parameter {name} of shape {shape}: blocks[{axis}]={k} does "
          f"not divide axis {axis} of length {d} into equal blocks. Use a block count that "
          f"divides {d} (e.g. one of {divisors}), or 1 to rotate the whole axis."
      )
  return counts


def split_shape(shape: Shape, counts: tuple[int, ...]) -> Shape:
  """``shape`` with each blocked axis ``d_i`` (``k_i > 1``) split into ``(k_i, d_i / k_i)``."""
  out: list[int] = []
  for d, k in zip(shape, counts):
    out += [k, d // k] if k > 1 else [d]
  return tuple(out)


def apply_in_blocks(fn: Callable[[Any, jax.Array], jax.Array], state: Any, leaf_axes: Any,
                    counts: tuple[int, ...], x: jax.Array) -> jax.Array:
  """``fn(block_state, block)`` on every block of ``x``, all blocks at once; shape-preserving.

  Args:
    fn: the one-block transform: a state whose leaves have no block axis, and an array of the
      block shape ``[b_0, b_1, ...]``; returns an array of that shape.
    state: the rotation state; a leaf that belongs to a blocked axis has that block axis first.
    leaf_axes: ``state``'s structure with, per leaf, the axis of ``x`` it belongs to.
    counts: block count per axis of ``x`` (all 1: ``fn(state, x)`` unchanged).
    x: the parameter-shaped array ``[d_0, d_1, ...]``.

  Returns:
    ``[d_0, d_1, ...]``: block ``(j_0, j_1, ...)`` of ``x`` transformed with the state of blocks
    ``j_i`` on each blocked axis ``i``.
  """
  blocked = [i for i, k in enumerate(counts) if k > 1]
  if not blocked:
    return fn(state, x)
  shape = split_shape(x.shape, counts)
  position, pos = {}, 0
  for i, k in enumerate(counts):
    position[i] = pos
    pos += 2 if k > 1 else 1
  # Innermost vmap over the first blocked axis: each outer vmap removes a block axis that lies
  # after the inner ones, so the positions in the split shape stay valid at every level.
  f = fn
  for i in blocked:
    state_axes = jax.tree.map(lambda a, i=i: 0 if a == i else None, leaf_axes)
    f = jax.vmap(f, in_axes=(state_axes, position[i]), out_axes=position[i])
  return f(state, x.reshape(shape)).reshape(x.shape)
