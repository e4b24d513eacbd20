"""Building blocks of the decoder: norms, MLPs, rotary embeddings, attention, the block.

Every parameter carries logical sharding names (``"vocab"``, ``"embed"``, ``"heads"``,
``"kv_heads"``, ``"mlp"``) in its metadata; the training code maps them to mesh axes with one
rules table. Names use shape suffixes: ``b`` batch, ``t`` query positions, ``s`` key positions,
``d`` model width, ``n`` query heads, ``k`` key/value heads, ``h`` head width, ``f`` MLP width.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from softmax_one_jax.attention import (AttentionSharding, dot_product_attention,
                                       first_token_stats, reference_attention)
from softmax_one_jax.models.config import TransformerConfig
from softmax_one_jax.models.intermediates import SowConfig
from softmax_one_jax.sharding import constrain, current_mesh, spec_in_context

# Logical names of activations (see softmax_one_jax.sharding): the batch is split over the data
# and fsdp mesh axes, heads and the MLP width over tensor, the model width never.
ACT_BTD = ("batch", "seq", "act_embed")
ACT_BTNH = ("batch", "seq", "heads", None)
ACT_BTKH = ("batch", "seq", "kv_heads", None)
ACT_BTF = ("batch", "seq", "mlp")

LogicalNames = tuple[str | None, ...]

# The checkpoint name of each block's attention output, which the "save_attention_out" and
# "offload_attention_out" remat policies keep (see TransformerConfig.remat). A flash kernel's
# forward is spared in the backward pass only where the kernel gives its own residuals (output,
# logsumexp) this name too.
ATTENTION_OUT = "attention_out"


def logical(init: Callable, names: LogicalNames) -> Callable:
  """Attaches logical sharding names to an initialiser, without needing a mesh.

  Example:
    >>> init = logical(nnx.initializers.zeros_init(), ("embed",))
  """
  return nnx.with_partitioning(init, names, eager_sharding=False)


class Dense(nnx.Module):
  """``x @ kernel + bias`` over the last axis, the tokens as the rows of one 2-D matmul.

  ``kernel`` is ``[in, out]`` and ``bias`` ``[out]``, as in ``nnx.Linear``. The leading axes are
  folded into one row axis (a reshape, free for a row-major array), so the weight gradient is the
  plain ``x^T @ dy`` of two matrices, which matmul libraries read in place; contracting two token
  axes of 3-D operands makes XLA lay out a transposed copy of the activations first
  (bench/RESULTS.md, 2026-12-02).

  Example:
    >>> layer = Dense(4, 2, use_bias=True, kernel_init=nnx.initializers.lecun_normal(),
    ...               bias_init=nnx.initializers.zeros_init(), dtype=jnp.float32,
    ...               param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((3, 5, 4))).shape
    (3, 5, 2)
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, kernel_init: Callable,
               bias_init: Callable, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias
                 else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    bias_o = None if self.bias is None else self.bias[...]
    return token_rows_matmul(x, self.kernel[...], bias_o, self.dtype)


def token_rows_matmul(x: jax.Array, kernel_io: jax.Array, bias_o: jax.Array | None,
                      dtype: jnp.dtype) -> jax.Array:
  """``x [..., I] @ kernel [I, O] (+ bias [O])`` in ``dtype``, as one ``[rows, I]`` matmul.

  The leading axes of ``x`` become the rows (see ``Dense`` for why); the result has them back.

  Example:
    >>> token_rows_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)), None, jnp.float32).shape
    (2, 3, 5)
  """
  y_no = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel_io.astype(dtype)
  if bias_o is not None:
    y_no = y_no + bias_o.astype(dtype)
  return y_no.reshape(*x.shape[:-1], y_no.shape[-1])


def dense(
    config: TransformerConfig,
    in_features: int,
    out_features: int,
    names: tuple[str, str],
    *,
    rngs: nnx.Rngs,
    std: float | None = None,
    use_bias: bool | None = None,
) -> Dense:
  """A ``Dense`` layer ``[in, out]`` with normal(std) kernel, zero bias and logical names.

  Example:
    >>> layer = dense(preset("tiny"), 128, 512, ("embed", "mlp"), rngs=nnx.Rngs(0))
  """
  return Dense(
      in_features,
      out_features,
      use_bias=config.use_bias if use_bias is None else use_bias,
      kernel_init=logical(nnx.initializers.normal(std or config.init_std), names),
      bias_init=logical(nnx.initializers.zeros_init(), (names[1],)),
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale`` with a per-channel gain ``[D]`` or one scalar gain ``[]``.

  The scalar form is the paper's norm for OrthoAdam: a per-channel gain privileges the
  coordinate basis that OrthoAdam avoids. Statistics are computed in float32.

  Example:
    >>> norm = RMSNorm(8, scalar_gain=True)
    >>> norm.scale.value.shape
    ()
  """

  def __init__(
      self,
      dim: int,
      *,
      scalar_gain: bool = False,
      eps: float = 1e-5,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
  ):
    shape, names = ((), ()) if scalar_gain else ((dim,), ("embed",))
    self.scale = nnx.Param(
        jnp.ones(shape, param_dtype), out_sharding=names, eager_sharding=False
    )
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * self.scale.value.astype(jnp.float32)).astype(self.dtype)


class ScalarLayerNorm(nnx.Module):
  """LayerNorm with one learned scalar gain: ``(x - mean(x)) / std(x) * scale + bias``.

  Centring, variance normalisation and the per-channel bias ``[D]`` are LayerNorm's; only the
  gain is a single scalar ``[]`` (initialised to 1), so a GPT-2-flavoured model can drop the
  per-channel gain, which privileges the coordinate basis OrthoAdam avoids, and change nothing
  else. Statistics are computed in float32.

  Example:
    >>> norm = ScalarLayerNorm(8)
    >>> norm.scale.value.shape, norm.bias.value.shape
    ((), (8,))
  """

  def __init__(
      self,
      dim: int,
      *,
      eps: float = 1e-5,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
  ):
    self.scale = nnx.Param(jnp.ones((), param_dtype), out_sharding=(), eager_sharding=False)
    self.bias = nnx.Param(
        jnp.zeros((dim,), param_dtype), out_sharding=("embed",), eager_sharding=False
    )
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x = x_btd.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    x = x * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)
    return x.astype(self.dtype)


def make_norm(config: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The norm named by ``config.norm`` (see ``TransformerConfig.norm``).

  Example:
    >>> make_norm(preset("tiny"), rngs=nnx.Rngs(0))
    LayerNorm(...)
    >>> make_norm(preset("tiny", norm="scalar_layernorm"), rngs=nnx.Rngs(0)).scale.value.shape
    ()
  """
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  if config.norm == "layernorm":
    return nnx.LayerNorm(
        config.d_model,
        epsilon=config.norm_eps,
        scale_init=logical(nnx.initializers.ones_init(), ("embed",)),
        bias_init=logical(nnx.initializers.zeros_init(), ("embed",)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
  if config.norm == "scalar_layernorm":
    return ScalarLayerNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                           param_dtype=param_dtype)
  return RMSNorm(
      config.d_model,
      scalar_gain=config.norm == "scalar_rmsnorm",
      eps=config.norm_eps,
      dtype=dtype,
      param_dtype=param_dtype,
  )


def rope_cos_sin(positions_bt: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Rotary tables ``cos, sin`` of shape ``[B, T, 1, H]`` (half-split layout, as HF Llama).

  Example:
    >>> cos, sin = rope_cos_sin(jnp.arange(4)[None], 8, 10_000.0)
    >>> cos.shape
    (1, 4, 1, 8)
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_bth = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles_bth = jnp.concatenate([angles_bth, angles_bth], axis=-1)
  return jnp.cos(angles_bth)[:, :, None, :], jnp.sin(angles_bth)[:, :, None, :]


def apply_rope(x_btnh: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs ``(x[i], x[i + H/2])`` by position-dependent angles (computed in float32).

  Example:
    >>> x = jnp.ones((1, 4, 2, 8))
    >>> apply_rope(x, *rope_cos_sin(jnp.arange(4)[None], 8, 10_000.0)).shape
    (1, 4, 2, 8)
  """
  x = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_btnh.dtype)


class MLP(nnx.Module):
  """GELU MLP ``down(gelu(up(x)))`` or SwiGLU ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.kind = c.mlp
    self.up_proj = dense(c, c.d_model, c.mlp_dim, ("embed", "mlp"), rngs=rngs)
    self.gate_proj = (
        dense(c, c.d_model, c.mlp_dim, ("embed", "mlp"), rngs=rngs) if c.mlp == "swiglu" else None
    )
    self.down_proj = dense(
        c, c.mlp_dim, c.d_model, ("mlp", "embed"), rngs=rngs, std=_residual_std(c)
    )

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    if self.kind == "swiglu":
      h_btf = jax.nn.silu(constrain(self.gate_proj(x_btd), ACT_BTF)) * constrain(
          self.up_proj(x_btd), ACT_BTF)
    else:
      h_btf = jax.nn.gelu(constrain(self.up_proj(x_btd), ACT_BTF), approximate=True)
    return constrain(self.down_proj(h_btf), ACT_BTD)


def _residual_std(config: TransformerConfig) -> float:
  """GPT-2's scaled initialisation of layers that write into the residual stream."""
  return config.init_std / math.sqrt(2 * config.num_layers)


QKV_NAMES: LogicalNames = ("embed", "kv_heads", None, None)


class QKVProjection(nnx.Module):
  """The query, key and value projections as one parameter, grouped by key/value head.

  ``kernel`` is ``[D, K, G + 2, H]`` (logical names ``QKV_NAMES``): for key/value head ``k``, the
  ``G = N / K`` query heads that read it, then its key, then its value. Query head ``n = k * G +
  g`` reads key/value head ``k``, as in Hugging Face's Llama (``repeat_kv``). Sharding ``K``
  keeps each group (its queries, key and value) on one device, for multi-head (``G = 1``) and
  grouped-query attention alike. The call is one ``[B*T, D] @ [D, K * (G + 2) * H]`` matmul.
  ``bias`` is ``[K, G + 2, H]`` when ``config.use_bias``.

  Example:
    >>> qkv = QKVProjection(preset("tiny"), rngs=nnx.Rngs(0))
    >>> [y.shape for y in qkv(jnp.ones((2, 16, 128)))]      # q [B, T, N, H], k and v [B, T, K, H]
    [(2, 16, 4, 32), (2, 16, 4, 32), (2, 16, 4, 32)]
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    shape = (c.d_model, c.num_kv_heads, c.num_heads // c.num_kv_heads + 2, c.head_dim)
    param_dtype = jnp.dtype(c.param_dtype)
    init = logical(nnx.initializers.normal(c.init_std), QKV_NAMES)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.bias = (nnx.Param(logical(nnx.initializers.zeros_init(), QKV_NAMES[1:])(
        rngs.params(), shape[1:], param_dtype)) if c.use_bias else None)
    self.dtype = jnp.dtype(c.dtype)

  def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q [B, T, N, H], k [B, T, K, H], v [B, T, K, H])`` in the compute dtype."""
    b, t, _ = x_btd.shape
    d, k, s, h = self.kernel.shape
    bias_f = None if self.bias is None else self.bias[...].reshape(k * s * h)
    y_btf = token_rows_matmul(x_btd, self.kernel[...].reshape(d, k * s * h), bias_f, self.dtype)
    q_btf, k_btf, v_btf = split_qkv(y_btf.reshape(b, t, k, s, h))
    return (q_btf.reshape(b, t, -1, h), k_btf.reshape(b, t, k, h), v_btf.reshape(b, t, k, h))


def fuse_qkv(q: jax.Array, k: jax.Array, v: jax.Array, num_kv_heads: int) -> jax.Array:
  """``QKVProjection``'s ``[D, K, G + 2, H]`` kernel from separate ``[D, N*H]``, ``[D, K*H]`` ones.

  Biases fuse too: pass ``[N*H]``, ``[K*H]``, ``[K*H]`` and get ``[K, G + 2, H]``. Works on numpy
  and jax arrays; ``split_qkv`` inverts it.

  Example:
    >>> fuse_qkv(np.ones((8, 16)), np.ones((8, 4)), np.ones((8, 4)), num_kv_heads=1).shape
    (8, 1, 6, 4)
  """
  lead, kv_width = q.shape[:-1], k.shape[-1]
  h = kv_width // num_kv_heads
  q_kgh = q.reshape(*lead, num_kv_heads, -1, h)
  parts = [q_kgh, k.reshape(*lead, num_kv_heads, 1, h), v.reshape(*lead, num_kv_heads, 1, h)]
  xp = np if isinstance(q, np.ndarray) else jnp
  return xp.concatenate(parts, axis=-2)


def split_qkv(fused: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``[..., N*H]``, ``[..., K*H]``, ``[..., K*H]`` projections in a ``[..., K, G + 2, H]`` one.

  Example:
    >>> q, k, v = split_qkv(np.ones((8, 1, 6, 4)))
    >>> q.shape, k.shape, v.shape
    ((8, 16), (8, 4), (8, 4))
  """
  lead = fused.shape[:-3]
  k, s, h = fused.shape[-3:]
  return (fused[..., :-2, :].reshape(*lead, k * (s - 2) * h),
          fused[..., -2, :].reshape(*lead, k * h), fused[..., -1, :].reshape(*lead, k * h))


def attention_sharding(q_shape: tuple[int, ...], k_shape: tuple[int, ...]
                       ) -> AttentionSharding | None:
  """The batch and head mesh axes of attention under the mesh in context (None outside one).

  Heads are split only when the query and the key/value heads split over the same mesh axes
  (grouped-query groups must stay on one device); otherwise every device holds every head.

  Example:
    >>> attention_sharding((8, 128, 12, 64), (8, 128, 12, 64))   # under a (1, 4, 2) mesh
    AttentionSharding(batch='fsdp', heads='tensor')
  """
  q_spec = spec_in_context(ACT_BTNH, q_shape)
  k_spec = spec_in_context(ACT_BTKH, k_shape)
  if q_spec is None or k_spec is None:
    return None
  q_axes, k_axes = tuple(q_spec) + (None,) * 4, tuple(k_spec) + (None,) * 4
  return AttentionSharding(batch=q_axes[0], heads=q_axes[2] if q_axes[2] == k_axes[2] else None)


def split_groups(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array
                 ) -> tuple[jax.Array, jax.Array, AttentionSharding | None]:
  """Keys and values repeated so that the query heads' split reaches inside a group.

  When the mesh axes of the query heads have more devices ``D`` than there are key/value heads
  ``K`` (``tensor > num_kv_heads``), ``attention_sharding`` cannot split the heads (a group would
  straddle devices) and every device would compute every head. With ``D % K == 0`` each device's
  ``N / D`` query heads lie inside one group: each key/value head is repeated ``D / K`` times
  and split like the queries, so a device holds its own query heads and the one key/value head
  they read (the bytes it held before, but a ``D``-th of the work). Returns the inputs and
  ``attention_sharding``'s answer unchanged otherwise.

  Example:
    >>> k2, v2, sh = split_groups(q, k, v)   # N=8, K=2 under tensor=4: K repeated to 4 heads
  """
  sharding = attention_sharding(q_btnh.shape, k_btkh.shape)
  if sharding is None or sharding.heads is not None:
    return k_btkh, v_btkh, sharding
  heads_axes = (tuple(spec_in_context(ACT_BTNH, q_btnh.shape)) + (None,) * 4)[2]
  if heads_axes is None:
    return k_btkh, v_btkh, sharding
  names = heads_axes if isinstance(heads_axes, tuple) else (heads_axes,)
  devices = math.prod(current_mesh().shape[a] for a in names)
  kv_heads = k_btkh.shape[2]
  if devices % kv_heads or q_btnh.shape[2] % devices:
    return k_btkh, v_btkh, sharding
  repeat = devices // kv_heads
  spec = jax.sharding.PartitionSpec(sharding.batch, None, heads_axes, None)
  k_btkh, v_btkh = (jax.lax.with_sharding_constraint(jnp.repeat(x, repeat, axis=2), spec)
                    for x in (k_btkh, v_btkh))
  return k_btkh, v_btkh, sharding._replace(heads=heads_axes)


class LayerCache(NamedTuple):
  """One layer's slice of a ``KVCache``: keys and values ``[B, S_max, K, H]`` and the fill level."""

  keys: jax.Array
  values: jax.Array
  end: jax.Array


class Attention(nnx.Module):
  """Multi-head / grouped-query self-attention with softmax, softmax-1 or learned sinks.

  With ``softmax="learned_sink"`` the layer owns ``sink_logits`` ``[num_heads]`` (float32,
  logical axis "heads"), one null-key logit per query head, initialised to 0 so that training
  starts exactly at softmax-1. ``sow_config`` (off by default) names what the layer records as
  ``nnx.Intermediate`` while it runs; see ``models.intermediates``.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.sow_config = SowConfig()
    self.sink_logits = (
        nnx.Param(jnp.zeros((c.num_heads,), jnp.float32), out_sharding=("heads",),
                  eager_sharding=False)
        if c.softmax == "learned_sink" else None)
    self.qkv_proj = QKVProjection(c, rngs=rngs)
    self.o_proj = dense(
        c, c.num_heads * c.head_dim, c.d_model, ("heads", "embed"), rngs=rngs, std=_residual_std(c)
    )

  def _qkv(self, x_btd: jax.Array, positions_bt: jax.Array):
    c = self.config
    q_btnh, k_btkh, v_btkh = self.qkv_proj(x_btd)
    if self.sow_config.values:
      values_btf = v_btkh.reshape(*v_btkh.shape[:2], -1).astype(jnp.float32)
      self.sow(nnx.Intermediate, "values", values_btf)
    if c.position == "rope":
      cos, sin = rope_cos_sin(positions_bt, c.head_dim, c.rope_theta)
      q_btnh, k_btkh = apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin)
    return constrain(q_btnh, ACT_BTNH), constrain(k_btkh, ACT_BTKH), constrain(v_btkh, ACT_BTKH)

  def _sinks(self) -> jax.Array | None:
    """The ``[N]`` sink logits for ``softmax="learned_sink"``, else None."""
    return None if self.sink_logits is None else self.sink_logits[...]

  def _attend(self, q, k, v, segment_ids_bt):
    """Causal attention over the sequence itself, recording what ``sow_config`` asks for."""
    kwargs = dict(softmax=self.config.softmax, sinks=self._sinks(), is_causal=True,
                  segment_ids=segment_ids_bt)
    k, v, sharding = split_groups(q, k, v)
    if self.sow_config.attention_stats:
      self.sow(nnx.Intermediate, "attention_stats",
               first_token_stats(q, k, sharding=sharding, **kwargs))
    if self.sow_config.attention_probs:  # the reference path is the one that forms probabilities
      out, probs_bnts = reference_attention(q, k, v, return_probs=True, **kwargs)
      self.sow(nnx.Intermediate, "attention_probs", probs_bnts)
      return out
    return dot_product_attention(q, k, v, implementation=self.config.attention_impl,
                                 interpret=self.config.attention_interpret, sharding=sharding,
                                 **kwargs)

  def _attend_cached(self, q, k, v, positions_bt, cache: LayerCache):
    """Writes the new keys and values at ``cache.end``, then attends to every filled position."""
    keys_bskh = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype),
                                                    cache.end, 1)
    values_bskh = jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype),
                                                      cache.end, 1)
    key_positions_s = jnp.arange(keys_bskh.shape[1])
    visible_bts = key_positions_s[None, None, :] <= positions_bt[:, :, None]
    out = dot_product_attention(
        q, keys_bskh.astype(q.dtype), values_bskh.astype(q.dtype),
        softmax=self.config.softmax, sinks=self._sinks(), mask=visible_bts[:, None],
        implementation="xla",
    )
    return out, LayerCache(keys_bskh, values_bskh, cache.end)

  def __call__(
      self,
      x_btd: jax.Array,
      positions_bt: jax.Array,
      segment_ids_bt: jax.Array | None = None,
      cache: LayerCache | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    """Causal self-attention: ``(y [B, T, D], cache)``.

    Without a cache the ``T`` tokens attend among themselves (within their segment); with one
    they are the next ``T`` positions after ``cache.end`` and attend to everything cached.
    """
    q, k, v = self._qkv(x_btd, positions_bt)
    if cache is None:
      out = checkpoint_name(self._attend(q, k, v, segment_ids_bt), ATTENTION_OUT)
    else:
      out, cache = self._attend_cached(q, k, v, positions_bt, cache)
    b, t = out.shape[:2]
    out_btnh = constrain(out, ACT_BTNH)
    return constrain(self.o_proj(out_btnh.reshape(b, t, -1)), ACT_BTD), cache


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  With ``sow_config.hidden`` it records its output (float32 ``[B, T, D]``) as "hidden".
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.sow_config = SowConfig()
    self.attn_norm = make_norm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = make_norm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(
      self,
      x_btd: jax.Array,
      positions_bt: jax.Array,
      segment_ids_bt: jax.Array | None = None,
      cache: LayerCache | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    x_btd = constrain(x_btd, ACT_BTD)
    y_btd, cache = self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt, cache)
    x_btd = x_btd + y_btd
    x_btd = constrain(x_btd + self.mlp(self.mlp_norm(x_btd)), ACT_BTD)
    if self.sow_config.hidden:
      self.sow(nnx.Intermediate, "hidden", x_btd.astype(jnp.float32))
    return x_btd, cache
