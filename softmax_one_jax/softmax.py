"""softmax-1 ("softmax plus one", "quiet attention") and its log form.

softmax-1 adds a virtual logit 0 whose probability is thrown away::

    softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))

so a row may put (almost) no mass anywhere: its outputs sum to ``1 - null`` with
``null = 1 / (1 + sum_j exp(x_j))``. The stable form subtracts ``m = max(max_j x_j, 0)``
(never just ``max_j x_j`` followed by "+1", which is a different function)::

    softmax1(x)_i = exp(x_i - m) / (exp(-m) + sum_j exp(x_j - m))

All functions here follow ``jax.nn.softmax``: they take ``axis`` and a boolean ``where`` mask
(False = excluded), compute in at least float32 and return the input dtype. A row whose every
entry is masked (or ``-inf``) gives zeros, never NaN.

Reference: Kaul et al., "From Attention to Activation: Unravelling the Enigmas of Large
Language Models", ICLR 2025 (arXiv:2410.17174).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Axis = int | tuple[int, ...]


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for narrow floats (bf16, f16) and ints; wider floats stay as they are.

  Example:
    >>> compute_dtype(jnp.bfloat16)
    dtype('float32')
  """
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
    return dtype
  return jnp.dtype(jnp.float32)


def _output_dtype(dtype: jnp.dtype) -> jnp.dtype:
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _stable_parts(
    x: jax.Array, axis: Axis, where: jax.Array | None, with_null: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Returns ``(exp(x - m) masked, m)``, ``m`` a constant row maximum.

  With ``with_null`` (softmax-1) the virtual zero logit joins the maximum, ``m = max(max(x), 0)``;
  without it (softmax) an all-masked row also gets ``m = 0`` instead of ``-inf``.
  """
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)
  m = jnp.max(x, axis=axis, keepdims=True)
  m = jnp.maximum(m, 0.0) if with_null else jnp.where(jnp.isneginf(m), 0.0, m)
  m = jax.lax.stop_gradient(m)
  # m is finite (>= 0 for softmax-1, 0 for an all-masked softmax row), so masked entries give
  # exp(-inf) = 0 without a second select.
  return jnp.exp(x - m), m


def logsumexp1(
    x: jax.Array, axis: Axis = -1, where: jax.Array | None = None, keepdims: bool = False
) -> jax.Array:
  """``log(1 + sum_j exp(x_j))``: the log-normaliser of softmax-1 (>= 0, finite for -inf rows).

  Args:
    x: logits, any shape.
    axis: axis or axes to reduce.
    where: optional boolean mask broadcastable to ``x``; False entries are left out.
    keepdims: keep reduced axes with size one.

  Returns:
    The log-normaliser, reduced over ``axis``, in the input's float dtype.

  Example:
    >>> float(logsumexp1(jnp.array([0.0, 0.0])))  # log(1 + 2)
    1.0986...
  """
  x = jnp.asarray(x)
  out_dtype = _output_dtype(x.dtype)
  xc = x.astype(compute_dtype(x.dtype))
  shifted_exp, m = _stable_parts(xc, axis, where)
  lse = m + jnp.log(jnp.exp(-m) + jnp.sum(shifted_exp, axis=axis, keepdims=True))
  if not keepdims:
    lse = jnp.squeeze(lse, axis=axis)
  return lse.astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 3))
def _normalize(x: jax.Array, axis: Axis, where: jax.Array | None, with_null: bool) -> jax.Array:
  shifted_exp, m = _stable_parts(x, axis, where, with_null)
  denom = jnp.sum(shifted_exp, axis=axis, keepdims=True)
  if with_null:
    denom = denom + jnp.exp(-m)
  else:  # an all-masked softmax row: zeros rather than 0/0
    denom = jnp.where(denom == 0.0, 1.0, denom)
  return shifted_exp / denom


@_normalize.defjvp
def _normalize_jvp(axis, with_null, primals, tangents):
  # softmax-1 has the same Jacobian form as softmax: dy = y * (dx - <y, dx>). Only the output is
  # kept for the backward pass, as jax.nn.softmax does.
  x, where = primals
  x_dot, _ = tangents
  y = _normalize(x, axis, where, with_null)
  # Masked entries have y = 0, so they drop out of both terms (x_dot is finite there).
  return y, y * (x_dot - jnp.sum(y * x_dot, axis=axis, keepdims=True))


def softmax1(x: jax.Array, axis: Axis = -1, where: jax.Array | None = None) -> jax.Array:
  """softmax-1: ``exp(x_i) / (1 + sum_j exp(x_j))``, numerically stable.

  Args:
    x: logits, any shape, any float dtype (bf16/f16 are computed in float32).
    axis: axis or axes to normalise over.
    where: optional boolean mask broadcastable to ``x``; False entries get probability 0.

  Returns:
    Probabilities with the shape and float dtype of ``x``; each row sums to ``< 1``; a row with
    every entry masked is all zeros.

  Example:
    >>> softmax1(jnp.array([0.0, 0.0]))  # the virtual zero logit takes a third
    Array([0.333..., 0.333...], dtype=float32)
  """
  return normalize(x, "softmax1", axis=axis, where=where)


def log_softmax1(x: jax.Array, axis: Axis = -1, where: jax.Array | None = None) -> jax.Array:
  """``log softmax1(x) = x - log(1 + sum_j exp(x_j))``; masked entries are ``-inf``.

  Args:
    x: logits, any shape, any float dtype (bf16/f16 are computed in float32).
    axis: axis or axes to normalise over.
    where: optional boolean mask broadcastable to ``x``.

  Returns:
    Log-probabilities with the shape and float dtype of ``x``.

  Example:
    >>> log_softmax1(jnp.array([0.0]))  # log(1/2)
    Array([-0.693...], dtype=float32)
  """
  x = jnp.asarray(x)
  out_dtype = _output_dtype(x.dtype)
  xc = x.astype(compute_dtype(x.dtype))
  out = xc - logsumexp1(xc, axis=axis, where=where, keepdims=True)
  if where is not None:
    out = jnp.where(where, out, -jnp.inf)
  return out.astype(out_dtype)


SOFTMAX_KINDS = ("softmax1", "softmax")


def check_softmax_kind(kind: str) -> None:
  """Raises a ValueError naming the allowed values unless ``kind`` is in ``SOFTMAX_KINDS``."""
  if kind not in SOFTMAX_KINDS:
    raise ValueError(f"softmax={kind!r} is not known; expected one of {SOFTMAX_KINDS}.")


def normalize(x: jax.Array, kind: str, axis: Axis = -1, where: jax.Array | None = None) -> jax.Array:
  """softmax-1 (``kind="softmax1"``) or softmax (``kind="softmax"``) with one stable code path.

  Unlike ``jax.nn.softmax``, an all-masked softmax row gives zeros rather than NaN.

  Example:
    >>> normalize(jnp.zeros(2), "softmax")
    Array([0.5, 0.5], dtype=float32)
  """
  check_softmax_kind(kind)
  x = jnp.asarray(x)
  out_dtype = _output_dtype(x.dtype)
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)
  y = _normalize(x.astype(compute_dtype(x.dtype)), axis, where, kind == "softmax1")
  return y.astype(out_dtype)
