"""The decoder-only language model (GPT-2 and Llama-2 flavours are configurations of it).

Example:
  >>> from flax import nnx
  >>> model = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
  >>> tokens = jnp.zeros((2, 16), jnp.int32)
  >>> model(tokens).shape
  (2, 16, 4096)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from softmax_one_jax.models.config import TransformerConfig
from softmax_one_jax.models.layers import (ACT_BTD, ATTENTION_OUT, Block, LayerCache, dense,
                                           logical, make_norm)
from softmax_one_jax.sharding import constrain

# TransformerConfig.remat name -> the jax.checkpoint policy of each block ("none": no remat).
# "save_dots" keeps the matmuls without batch dimensions: every projection and MLP matmul (all
# are 2-D, see layers.token_rows_matmul) but not the XLA attention's [B, N, T, S] logits, which
# are batched over (b, n) and which jax.checkpoint_policies.checkpoint_dots would keep as well.
_REMAT_POLICIES: dict[str, Callable[..., Any]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
    "offload_attention_out": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[ATTENTION_OUT],
        offload_src="device", offload_dst="pinned_host"),
}


class KVCache(NamedTuple):
  """Keys and values of every layer for incremental decoding.

  Attributes:
    keys: per layer ``[B, S_max, K, H]``.
    values: per layer ``[B, S_max, K, H]``.
    end: int32 scalar, the number of positions already written.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  end: jax.Array


def segment_starts(segment_ids_bt: jax.Array) -> jax.Array:
  """Index of the first token of each token's segment (a run of equal segment ids).

  Args:
    segment_ids_bt: ``[B, T]`` int segment ids, as packed data yields them.

  Returns:
    ``[B, T]`` int32; a token starts its segment where the value equals its own index.

  Example:
    >>> segment_starts(jnp.array([[1, 1, 1, 2, 2, 0]]))
    Array([[0, 0, 0, 3, 3, 5]], dtype=int32)
  """
  t = segment_ids_bt.shape[1]
  index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
  changed_bt = jnp.concatenate(
      [jnp.ones_like(segment_ids_bt[:, :1], dtype=bool),
       segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=1)
  return jax.lax.cummax(jnp.where(changed_bt, index_bt, 0), axis=1)


def positions_from_segments(segment_ids_bt: jax.Array) -> jax.Array:
  """Position of each token within its segment (restarting at 0 where the segment id changes).

  Example:
    >>> positions_from_segments(jnp.array([[1, 1, 1, 2, 2, 0]]))
    Array([[0, 1, 2, 0, 1, 0]], dtype=int32)
  """
  t = segment_ids_bt.shape[1]
  return jnp.arange(t, dtype=jnp.int32)[None, :] - segment_starts(segment_ids_bt)


class Transformer(nnx.Module):
  """Decoder-only Transformer LM with softmax, softmax-1 or learned-sink attention.

  Call it on int tokens ``[B, T]``; it returns float32 logits ``[B, T, V]``. One forward pass
  serves training (``features``, its first half), evaluation, incremental decoding (``cache=``)
  and analysis (intermediates recorded with ``nnx.sow``; see ``models.intermediates``).
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.embed = nnx.Embed(
        c.vocab_size, c.d_model,
        embedding_init=logical(nnx.initializers.normal(c.init_std), ("vocab", "embed")),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.pos_embed = (
        nnx.Embed(
            c.max_seq_len, c.d_model,
            embedding_init=logical(nnx.initializers.normal(c.init_std / 2), (None, "embed")),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        if c.position == "learned" else None
    )
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = make_norm(c, rngs=rngs)
    self.lm_head = (
        None if c.tie_embeddings
        else dense(c, c.d_model, c.vocab_size, ("embed", "vocab"), rngs=rngs, use_bias=False)
    )

  # ----------------------------------------------------------------------------------------------
  def _check_tokens(self, tokens_bt: jax.Array, cache: KVCache | None) -> None:
    if tokens_bt.ndim != 2 or not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
      raise ValueError(
          f"tokens must be integer ids of shape [batch, seq]; got {tokens_bt.dtype} "
          f"{tokens_bt.shape}."
      )
    positions_needed = tokens_bt.shape[1] if cache is None else cache.keys[0].shape[1]
    if self.config.position == "learned" and positions_needed > self.config.max_seq_len:
      raise ValueError(
          f"sequence needs {positions_needed} positions but max_seq_len="
          f"{self.config.max_seq_len} (learned position table); use shorter inputs or a config "
          "with a larger max_seq_len."
      )

  def _embed(self, tokens_bt: jax.Array, positions_bt: jax.Array) -> jax.Array:
    x_btd = self.embed(tokens_bt)
    if self.pos_embed is not None:
      x_btd = x_btd + self.pos_embed(positions_bt)
    return constrain(x_btd.astype(jnp.dtype(self.config.dtype)), ACT_BTD)

  def _logits(self, x_btd: jax.Array) -> jax.Array:
    x_btd = self.final_norm(x_btd)
    logits_btv = self.embed.attend(x_btd) if self.lm_head is None else self.lm_head(x_btd)
    return logits_btv.astype(jnp.float32)

  def unembedding(self) -> jax.Array:
    """The output embedding ``[V, D]`` in the compute dtype: logits are ``features @ it.T``.

    The token embedding when tied, else the LM head's kernel transposed (a layout change that
    XLA folds into the matmul reading it).
    """
    table_vd = self.embed.embedding.value if self.lm_head is None else self.lm_head.kernel.value.T
    return table_vd.astype(jnp.dtype(self.config.dtype))

  def features(
      self,
      tokens_bt: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """The final-normalised hidden states ``[B, T, D]`` that the LM head reads (compute dtype).

    The first half of ``__call__``: ``model(tokens)`` equals ``features(tokens) @
    unembedding().T`` in float32. Training feeds both to ``models.loss.linear_cross_entropy``,
    which never builds the ``[B, T, V]`` logits.

    Example:
      >>> x_btd = model.features(tokens_bt)
      >>> loss_sum, n = linear_cross_entropy(x_btd, model.unembedding(), targets_bt, weights_bt)
    """
    x_btd, _ = self._trunk(tokens_bt, positions, segment_ids, None)
    return constrain(self.final_norm(x_btd), ACT_BTD)

  def _trunk(self, tokens_bt, positions, segment_ids, cache):
    """Embeddings and blocks, before the final norm: ``(x_btd, cache)``."""
    self._check_tokens(tokens_bt, cache)
    b, t = tokens_bt.shape
    if cache is not None:
      if segment_ids is not None or positions is not None:
        raise ValueError("with a cache, positions follow cache.end; pass neither positions nor "
                         "segment_ids.")
      positions = jnp.broadcast_to(cache.end + jnp.arange(t, dtype=jnp.int32), (b, t))
    elif positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    x_btd = self._embed(tokens_bt, positions)
    if cache is None:
      block_fn = rematerialised(_call_block, self.config.remat)
      for block in self.blocks:
        x_btd = block_fn(block, x_btd, positions, segment_ids)
      return x_btd, None
    keys, values = [], []
    for block, k, v in zip(self.blocks, cache.keys, cache.values):
      x_btd, layer = block(x_btd, positions, None, LayerCache(k, v, cache.end))
      keys.append(layer.keys)
      values.append(layer.values)
    return x_btd, KVCache(tuple(keys), tuple(values), cache.end + t)

  # ----------------------------------------------------------------------------------------------
  def __call__(
      self,
      tokens_bt: jax.Array,
      *,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Runs the model on a batch, or on the next tokens after a KV cache.

    Args:
      tokens_bt: int ``[B, T]``.
      positions: int ``[B, T]``; by default ``0..T-1``, restarting in each segment when
        ``segment_ids`` is given.
      segment_ids: int ``[B, T]`` document ids of packed sequences; tokens attend only within
        their own segment.
      cache: a ``KVCache`` (``init_cache``): the tokens are the ``T`` positions after
        ``cache.end`` and attend to everything before them; the result equals the full forward
        pass over all tokens so far, restricted to the new ones.

    Returns:
      float32 logits ``[B, T, V]``, and the updated cache when given one.

    Intermediates for analysis (block outputs, attention probabilities, ...) are recorded with
    ``nnx.sow``; ``models.intermediates.with_intermediates`` collects them.

    Example:
      >>> cache = model.init_cache(1, 8)
      >>> logits, cache = model(jnp.array([[1, 2, 3]]), cache=cache)
      >>> logits, cache = model(jnp.array([[4]]), cache=cache)   # the next position
    """
    x_btd, new_cache = self._trunk(tokens_bt, positions, segment_ids, cache)
    logits_btv = self._logits(x_btd)
    return logits_btv if cache is None else (logits_btv, new_cache)

  def init_cache(self, batch_size: int, max_len: int, dtype: str | None = None) -> KVCache:
    """An empty KV cache for ``max_len`` positions.

    Example:
      >>> cache = model.init_cache(2, 32)
      >>> cache.keys[0].shape  # [B, S_max, K, H]
      (2, 32, 4, 32)
    """
    c = self.config
    if c.position == "learned" and max_len > c.max_seq_len:
      raise ValueError(f"max_len={max_len} exceeds max_seq_len={c.max_seq_len}.")
    shape = (batch_size, max_len, c.num_kv_heads, c.head_dim)
    zeros = lambda: jnp.zeros(shape, jnp.dtype(dtype or c.dtype))  # noqa: E731
    return KVCache(
        keys=tuple(zeros() for _ in range(c.num_layers)),
        values=tuple(zeros() for _ in range(c.num_layers)),
        end=jnp.zeros((), jnp.int32),
    )


def _call_block(block: Block, x_btd, positions_bt, segment_ids_bt):
  return block(x_btd, positions_bt, segment_ids_bt)[0]


def remat_policy(name: str) -> Callable[..., Any]:
  """The ``jax.checkpoint`` policy of a ``TransformerConfig.remat`` name other than "none".

  Example:
    >>> remat_policy("save_dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    True
  """
  if name not in _REMAT_POLICIES:
    raise ValueError(f"remat={name!r} has no policy; expected one of {tuple(_REMAT_POLICIES)} "
                     "(\"none\" means no remat).")
  return _REMAT_POLICIES[name]


def rematerialised(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
  """``fn`` under ``nnx.remat`` with the policy named ``remat``; ``fn`` itself for "none".

  Example:
    >>> block_fn = rematerialised(_call_block, "save_attention_out")
    >>> x_btd = block_fn(block, x_btd, positions_bt, None)
  """
  return fn if remat == "none" else nnx.remat(fn, policy=remat_policy(remat))


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of ``Transformer(config)``, from shapes only (no weights allocated).

  Example:
    >>> count_params(preset("llama2-7b")) / 1e9
    6.738...
  """
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return int(sum(x.size for x in leaves))
