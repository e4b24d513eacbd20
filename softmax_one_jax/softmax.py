"""softmax-1 ("softmax plus one", "quiet attention") and its log form.

softmax-1 adds a virtual logit 0 whose probability is thrown away::

    softmax1(x)_i = exp(x_i) / (1 + sum_j exp(x_j))

so a row may put (almost) no mass anywhere: its outputs sum to ``1 - null`` with
``null = 1 / (1 + sum_j exp(x_j))``. The stable form subtracts ``m = max(max_j x_j, 0)``
(never just ``max_j x_j`` followed by "+1", which is a different function)::

    softmax1(x)_i = exp(x_i - m) / (exp(-m) + sum_j exp(x_j - m))

A learned sink generalises the zero to a logit ``c`` (``softmax_with_sink``, ``normalize`` with
``kind="learned_sink"``): ``exp(x_i) / (exp(c) + sum_j exp(x_j))``, stabilised by
``m = max(max_j x_j, c)``; softmax-1 is ``c = 0`` and plain softmax ``c = -inf``.

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
    x: jax.Array, axis: Axis, where: jax.Array | None, null: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
  """Returns ``(exp(x - m) masked, m)``, ``m`` a constant row maximum.

  ``null`` is the logit of the virtual null key (0 for softmax-1, a learned sink, or None for
  plain softmax); it joins the maximum, ``m = max(max(x), null)``. A row with nothing in it
  (every entry masked, no null key) gets ``m = 0`` instead of ``-inf``.
  """
  if where is not None:
    x = jnp.where(where, x, -jnp.inf)
  m = jnp.max(x, axis=axis, keepdims=True)
  if null is not None:
    m = jnp.maximum(m, null)
  m = jax.lax.stop_gradient(jnp.where(jnp.isneginf(m), 0.0, m))
  # m is finite, so masked entries give exp(-inf) = 0 without a second select.
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
  shifted_exp, m = _stable_parts(xc, axis, where, jnp.zeros((), xc.dtype))
  lse = m + jnp.log(jnp.exp(-m) + jnp.sum(shifted_exp, axis=axis, keepdims=True))
  if not keepdims:
    lse = jnp.squeeze(lse, axis=axis)
  return lse.astype(out_dtype)


def _normalize_parts(
    x: jax.Array, axis: Axis, where: jax.Array | None, null: jax.Array | None
) -> tuple[jax.Array, jax.Array | None]:
  """``(probabilities, null share)``; the null share (keepdims shape) is None without a null."""
  shifted_exp, m = _stable_parts(x, axis, where, null)
  denom = jnp.sum(shifted_exp, axis=axis, keepdims=True)
  null_exp = None if null is None else jnp.exp(null - m)
  if null_exp is not None:
    denom = denom + null_exp
  # An empty row (all masked, no null key, or a null of -inf): zeros rather than 0/0.
  denom = jnp.where(denom == 0.0, 1.0, denom)
  return shifted_exp / denom, None if null_exp is None else null_exp / denom


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, axis: Axis, where: jax.Array | None,
               null: jax.Array | None) -> jax.Array:
  return _normalize_parts(x, axis, where, null)[0]


@_normalize.defjvp
def _normalize_jvp(axis, primals, tangents):
  # With a null logit c the log-normaliser moves by d lse = <y, dx> + p_null * dc, and every
  # output by dy = y * (dx - d lse): the softmax Jacobian plus one column for the null key. Only
  # the outputs (and the null key's per-row share) are kept for the backward pass, as
  # jax.nn.softmax keeps its outputs.
  x, where, null = primals
  x_dot, _, null_dot = tangents
  y, null_share = _normalize_parts(x, axis, where, null)
  # Masked entries have y = 0, so they drop out of both terms (x_dot is finite there).
  d_lse = jnp.sum(y * x_dot, axis=axis, keepdims=True)
  if null is not None:
    d_lse = d_lse + null_share * null_dot
  return y, y * (x_dot - d_lse)


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


SOFTMAX_KINDS = ("softmax1", "softmax", "learned_sink")


def check_softmax_kind(kind: str) -> None:
  """Raises a ValueError naming the allowed values unless ``kind`` is in ``SOFTMAX_KINDS``."""
  if kind not in SOFTMAX_KINDS:
    raise ValueError(f"softmax={kind!r} is not known; expected one of {SOFTMAX_KINDS}.")


def resolve_sinks(
    kind: str, sinks: jax.typing.ArrayLike | None, shape: tuple[int, ...] | None = None
) -> jax.Array | None:
  """The sink logit(s) that a normaliser kind adds to its denominator (the one rule for ``sinks``).

  A sink is a virtual key with logit ``c`` and no value: ``p_i = exp(x_i) / (exp(c) + sum_j
  exp(x_j))``. "softmax" has none (None), "softmax1" has ``c = 0`` (zeros of ``shape``) and
  "learned_sink" takes the caller's ``sinks``, which it requires; the other kinds reject them.

  Args:
    kind: one of ``SOFTMAX_KINDS``.
    sinks: the sink logits for "learned_sink" (in the units of the logits), else None.
    shape: the shape ``sinks`` must have (attention: ``(num_query_heads,)``) and of softmax-1's
      zeros; None accepts any shape and gives a scalar zero for softmax-1.

  Returns:
    None (softmax) or a float array (float32 unless ``sinks`` is a wider float).

  Example:
    >>> resolve_sinks("softmax1", None, (2,))
    Array([0., 0.], dtype=float32)
  """
  check_softmax_kind(kind)
  if kind != "learned_sink":
    if sinks is not None:
      raise ValueError(
          f"softmax={kind!r} takes no sinks (got an array of shape {jnp.shape(sinks)}); pass "
          "softmax='learned_sink' to use learned sink logits, or drop sinks=.")
    return None if kind == "softmax" else jnp.zeros(() if shape is None else shape, jnp.float32)
  if sinks is None:
    expected = "" if shape is None else f" of shape {shape}"
    raise ValueError(
        f"softmax='learned_sink' needs the sink logits: pass sinks=<float array{expected}> "
        "(one logit per query head), or use softmax='softmax1' for a fixed sink of 0.")
  sinks = jnp.asarray(sinks)
  if shape is not None and sinks.shape != tuple(shape):
    raise ValueError(f"sinks has shape {sinks.shape}; expected {tuple(shape)} (one logit per "
                     "query head).")
  return sinks.astype(compute_dtype(sinks.dtype))


def softmax_with_sink(
    x: jax.Array, sink: jax.Array | None, axis: Axis = -1, where: jax.Array | None = None
) -> jax.Array:
  """``exp(x_i) / (exp(sink) + sum_j exp(x_j))``, differentiable in ``x`` and ``sink``.

  Args:
    x: logits, any shape, any float dtype (bf16/f16 are computed in float32).
    sink: the null logit, broadcastable to ``x`` with the ``axis`` dimensions kept as size 1
      (e.g. ``[N, 1, 1]`` for ``[B, N, T, S]`` logits normalised over ``S``); 0 is softmax-1;
      None is plain softmax.
    axis: axis or axes to normalise over.
    where: optional boolean mask broadcastable to ``x``; False entries get probability 0.

  Returns:
    Probabilities with the shape and float dtype of ``x``; each row sums to ``1 - exp(sink -
    lse)``; a row with every entry masked is all zeros.

  Example:
    >>> softmax_with_sink(jnp.zeros(2), jnp.log(2.0))  # the sink counts as two keys
    Array([0.25, 0.25], dtype=float32)
  """
  x = jnp.asarray(x)
  out_dtype = _output_dtype(x.dtype)
  xc = x.astype(compute_dtype(x.dtype))
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)
  null = None if sink is None else jnp.asarray(sink).astype(xc.dtype)
  return _normalize(xc, axis, where, null).astype(out_dtype)


def normalize(x: jax.Array, kind: str, axis: Axis = -1, where: jax.Array | None = None,
              sinks: jax.Array | None = None) -> jax.Array:
  """softmax-1, softmax or learned-sink softmax (``kind``) with one stable code path.

  ``sinks`` (only with ``kind="learned_sink"``) is broadcast as in :func:`softmax_with_sink`.
  Unlike ``jax.nn.softmax``, an all-masked softmax row gives zeros rather than NaN.

  Example:
    >>> normalize(jnp.zeros(2), "softmax")
    Array([0.5, 0.5], dtype=float32)
  """
  return softmax_with_sink(x, resolve_sinks(kind, sinks), axis=axis, where=where)
