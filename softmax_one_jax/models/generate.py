"""Autoregressive generation with the KV cache: greedy, temperature and top-k sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from softmax_one_jax.models.transformer import Transformer


def sample_logits(
    logits_bv: jax.Array, rng: jax.Array, temperature: float = 0.0, top_k: int | None = None
) -> jax.Array:
  """Next token ids ``[B]``: argmax when ``temperature == 0``, else a (top-k) sample.

  Example:
    >>> sample_logits(jnp.array([[0.0, 5.0, 1.0]]), jax.random.key(0))
    Array([1], dtype=int32)
  """
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / temperature
  if top_k is not None:
    kth_largest_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_largest_b1, -jnp.inf, logits_bv)
  return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


def generate(
    model: Transformer,
    prompt_bp: jax.Array,
    max_new_tokens: int,
    *,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> jax.Array:
  """Continues ``prompt_bp`` by ``max_new_tokens`` tokens, one jitted scan over the KV cache.

  Args:
    model: the language model.
    prompt_bp: int ``[B, P]`` prompt tokens (all rows the same length).
    max_new_tokens: tokens to add (>= 1).
    rng: PRNG key for sampling; required when ``temperature > 0``.
    temperature: 0 for greedy decoding.
    top_k: sample only among the ``top_k`` most likely tokens.

  Returns:
    int32 ``[B, P + max_new_tokens]``: the prompt followed by the generated tokens.

  Example:
    >>> out = generate(model, jnp.array([[1, 2, 3]]), 5)
    >>> out.shape
    (1, 8)
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0.")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(...).")
  if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
    raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={model.config.vocab_size}].")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_bp, jnp.int32), rng,
                   max_new_tokens, temperature, top_k)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt_bp, rng, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  b, p = prompt_bp.shape
  cache = model.init_cache(b, p + max_new_tokens)
  logits_bpv, cache = model(prompt_bp, cache=cache)
  rngs = jax.random.split(rng, max_new_tokens)
  first_b = sample_logits(logits_bpv[:, -1], rngs[0], temperature, top_k)

  def step(carry, step_rng):
    token_b, cache = carry
    logits_b1v, cache = model(token_b[:, None], cache=cache)
    return (sample_logits(logits_b1v[:, 0], step_rng, temperature, top_k), cache), token_b

  (last_b, _), tokens_nb = jax.lax.scan(step, (first_b, cache), rngs[1:])
  return jnp.concatenate([prompt_bp, tokens_nb.T, last_b[:, None]], axis=1)
