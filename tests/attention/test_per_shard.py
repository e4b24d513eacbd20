"""Pallas attention kernels run once per shard (``jax.shard_map``) under an 8-device CPU mesh.

The kernels run in the Pallas interpreters. Outputs and q/k/v gradients (and learned sinks', split
like the heads) of the sharded call are compared with float64 numpy; the program must hold a
``shard_map`` around the kernel and move no data between devices (attention is independent across
examples and heads) beyond the one all-reduce of the sinks' gradient over the batch shards.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from softmax_one_jax.attention import AttentionSharding, attention_stats, dot_product_attention
from softmax_one_jax.models.layers import attention_sharding, split_groups
from tests.attention.reference_np import (np_attention, np_attention_grads, np_first_visible,
                                          np_logits, random_sinks, sink_grad_atol)
from tests.attention.test_pallas_gpu import random_case

SHARDING = AttentionSharding(batch=("data", "fsdp"), heads="tensor")
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(-start)?\(")


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def mesh_for(impl: str):
  """8 devices; 4 for the TPU interpreter, which holds every simulated device at a barrier in each
  kernel call: XLA:CPU on a 2-core host does not run 8 device programs at once, so 8 deadlock."""
  devices = jax.devices()[:4] if impl == "pallas_tpu" else jax.devices()
  shape = (1, 2, 2) if impl == "pallas_tpu" else (2, 2, 2)
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def _sharded(mesh, fn, args, kinds):
  """``jax.jit(fn)`` with each argument laid out by its kind ("btnh" / "bt" / "n"), under the
  mesh."""
  shardings = tuple(NamedSharding(mesh, getattr(SHARDING, kind)()) for kind in kinds)
  args = tuple(jax.device_put(a, s) for a, s in zip(args, shardings))
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn, in_shardings=shardings)
    text = jitted.lower(*args).compile().as_text()
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return jitted(*args), text, jaxpr


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
def test_kernel_per_shard_matches_numpy(np_rng, impl, softmax):
  # B=4 over data x fsdp, N=4 query and K=2 key/value heads over tensor (GQA groups stay whole);
  # learned sinks [N] over tensor, their gradient summed over the batch shards.
  q, k, v, w, ids = random_case(np_rng, 4, 40, 40, 4, 2, 32, jnp.float32, segments="self")
  sinks = random_sinks(np_rng, 4) if softmax == "learned_sink" else np.zeros(4, np.float32)
  opts = dict(softmax=softmax, is_causal=True, implementation=impl, interpret=True,
              sharding=SHARDING)

  def loss_and_grads(q, k, v, ids, sinks):
    def loss(q, k, v, sinks):
      out = dot_product_attention(q, k, v, segment_ids=ids, **opts,
                                  sinks=sinks if softmax == "learned_sink" else None)
      return jnp.sum(out * w), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, sinks)
    return out, *grads

  got, text, jaxpr = _sharded(mesh_for(impl), loss_and_grads, (q, k, v, ids, sinks),
                              ("btnh",) * 3 + ("bt", "n"))
  assert "shard_map" in jaxpr
  # The sinks' gradient is one all-reduce over the batch shards; nothing else moves.
  collectives = COLLECTIVE.findall(text)
  assert len(collectives) <= (1 if softmax == "learned_sink" else 0), collectives
  want = np_attention_grads(q, k, v, w, softmax=softmax, is_causal=True,
                            segment_ids=np.asarray(ids), sinks=sinks)
  for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2e-4, atol=2e-5, err_msg=name)
  if softmax == "learned_sink":
    np.testing.assert_allclose(got[4], want[4], rtol=2e-5, atol=sink_grad_atol(w, want[0]))


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_statistics_kernel_per_shard_matches_numpy(mesh, np_rng, softmax):
  q, k, _, _, ids = random_case(np_rng, 4, 24, 24, 4, 2, 32, jnp.float32, segments="self")
  sinks = random_sinks(np_rng, 4) if softmax == "learned_sink" else np.zeros(4, np.float32)

  def stats(q, k, ids, sinks):
    return attention_stats(q, k, softmax=softmax, is_causal=True, segment_ids=ids,
                           sinks=sinks if softmax == "learned_sink" else None,
                           implementation="pallas", interpret=True, sharding=SHARDING)

  (lse, row_max, first), text, jaxpr = _sharded(mesh, stats, (q, k, ids, sinks),
                                                ("btnh", "btnh", "bt", "n"))
  assert "shard_map" in jaxpr and not COLLECTIVE.search(text)
  scale = 1.0 / np.sqrt(q.shape[-1])
  _, probs = np_attention(q, k, k, softmax=softmax, is_causal=True,
                          segment_ids=np.asarray(ids), scale=scale, sinks=sinks)
  # p_first = exp(s_f - lse) on each query's first visible key (its segment's first token):
  # the kernel's lse and first logit against numpy's p.
  pos, _ = np_first_visible(np_logits(q, k, is_causal=True, segment_ids=np.asarray(ids)))
  np.testing.assert_allclose(np.exp(np.asarray(first, np.float64) - np.asarray(lse, np.float64)),
                             np.take_along_axis(probs, pos[..., None], -1)[..., 0],
                             rtol=1e-4, atol=1e-6)
  assert lse.shape == row_max.shape == (4, 4, 24)


def test_without_a_mesh_the_kernel_is_called_directly(np_rng):
  q, k, v, _, _ = random_case(np_rng, 2, 16, 16, 2, 2, 32, jnp.float32)
  fn = lambda q, k, v: dot_product_attention(q, k, v, implementation="pallas_gpu",  # noqa: E731
                                             interpret=True, sharding=SHARDING)
  assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
  np.testing.assert_allclose(fn(q, k, v), np_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)


def test_heads_split_inside_a_group_when_tensor_exceeds_the_kv_heads(np_rng):
  """8 query heads, 2 key/value heads, tensor=4: ``split_groups`` repeats each key/value head
  twice and splits the heads over tensor, so every device runs the kernel on its 2 query heads
  (not all 8); outputs and q/k/v gradients equal float64 numpy's."""
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  q, k, v, w, _ = random_case(np_rng, 2, 32, 32, 8, 2, 16, jnp.float32)
  seen = {}

  def attn(q, k, v):
    k2, v2, sharding = split_groups(q, k, v)
    seen.update(sharding=sharding, plain=attention_sharding(q.shape, k.shape), kv=k2.shape)
    return dot_product_attention(q, k2, v2, is_causal=True, implementation="pallas_gpu",
                                 interpret=True, sharding=sharding)

  loss = lambda q, k, v: jnp.sum(attn(q, k, v) * w)  # noqa: E731
  with jax.set_mesh(mesh):
    out = jax.jit(attn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    jaxpr = str(jax.make_jaxpr(attn)(q, k, v))
  assert seen["plain"].heads is None                     # without the split: every head
  assert seen["sharding"] == AttentionSharding(batch="fsdp", heads="tensor")
  assert seen["kv"] == (2, 32, 4, 16)
  assert "f32[1,32,2,16]" in jaxpr                      # the kernel's per-device query block
  want = np_attention_grads(q, k, v, w, is_causal=True)
  np.testing.assert_allclose(out, want[0], rtol=2e-5, atol=2e-5)
  for got, ref in zip(grads, want[1:]):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
