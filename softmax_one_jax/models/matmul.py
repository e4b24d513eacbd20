"""The projection matmul ``x @ w`` with a hand-written backward pass.

JAX differentiates ``dot_general`` with respect to its right operand by contracting the cotangent
with ``x`` in the order the transpose rule dictates (``[out, in]``) and then transposing the
result into the kernel's ``[in, out]`` layout: one more transpose and copy per projection and
step. ``matmul`` computes the two gradients directly, ``dx = dy @ w^T`` and
``dw = x^T @ dy`` over the flattened leading axes, each one dot in the layout it is needed in.
Same values (tests compare with ``jax.grad`` of the plain matmul and with float64 numpy); on
this project's 2-core CPU the ``tiny`` train step is ~7% and the gpt2-60m step ~5% faster
(alternating steps in one process).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x @ w`` for ``x [..., K]`` and ``w [K, *F]``, giving ``[..., *F]`` in ``x``'s dtype.

  ``w`` may have several output axes (stacked q/k/v kernels ``[D, 3, F]``), which then stay
  separate, so a sharded one stays local. Dots run in the operands' dtype, as ``lax.dot_general``
  by default (which ``nnx.Linear`` used before). Under differentiation the gradients are two
  plain dots (see the module docstring).

  Example:
    >>> matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
    (2, 3, 5)
  """
  return _forward(x, w)


def _forward(x: jax.Array, w: jax.Array) -> jax.Array:
  if w.ndim < 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"matmul needs x [..., K] and w [K, ...]; got {x.shape} and {w.shape}.")
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  return _forward(x, w), (x, w)


def _matmul_bwd(residuals: tuple[jax.Array, jax.Array], dy: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  x, w = residuals
  out_axes = w.ndim - 1                      # dy is [..., *F] with len(F) = out_axes
  lead = dy.ndim - out_axes
  dx = lax.dot_general(dy, w, ((tuple(range(lead, dy.ndim)), tuple(range(1, w.ndim))), ((), ())))
  x_mk = x.reshape(-1, x.shape[-1])
  dy_mf = dy.reshape((-1,) + dy.shape[lead:])
  dw = lax.dot_general(x_mk, dy_mf, (((0,), (0,)), ((), ())))
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None, preferred_element_type: Any = None,
                      **kwargs: Any) -> jax.Array:
  """A ``dot_general`` for ``nnx.Linear``: ``matmul`` for its ``[..., K] x [K, N]`` contraction.

  Anything else (batch dimensions, an explicit precision, output dtype or sharding) goes to
  ``lax.dot_general`` unchanged.

  Example:
    >>> layer = nnx.Linear(4, 5, dot_general=dense_dot_general, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 5)
  """
  (lhs_contract, rhs_contract), batch_dims = dimension_numbers
  plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
           and rhs.ndim >= 2 and lhs.dtype == rhs.dtype and not any(batch_dims)
           and precision is None
           and preferred_element_type is None and not any(kwargs.values()))
  if not plain:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)
  return matmul(lhs, rhs)
