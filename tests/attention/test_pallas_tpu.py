"""The TPU path (splash attention with zero or learned sinks) in the Pallas TPU interpreter,
against numpy (outputs, q/k/v gradients and learned sinks' gradients).

Runs only where the installed jax has ``pltpu.InterpretParams`` (the TPU interpreter on CPU).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import dot_product_attention, pallas_tpu
from tests.attention.reference_np import (np_attention, np_attention_grads, random_sinks,
                                          sink_grad_atol)
from tests.attention.test_pallas_gpu import check_against_numpy, out_and_grads, random_case

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
if not hasattr(pltpu, "InterpretParams"):
  pytest.skip("this jax has no Pallas TPU interpreter", allow_module_level=True)


def tpu_kernel(q, k, v, **opts):
  return pallas_tpu.flash_attention(q, k, v, interpret=pltpu.InterpretParams(), **opts)


@pytest.mark.parametrize(
    "shape,dtype,softmax,is_causal,segments",
    [
        ((2, 128, 128, 2, 2, 64), jnp.float32, "softmax1", False, None),  # batch folded in heads
        ((1, 100, 100, 4, 2, 64), jnp.float32, "softmax1", True, None),  # padded keys, GQA
        ((2, 37, 50, 4, 1, 128), jnp.float32, "softmax", False, "cross"),  # MQA, no-key rows
        ((1, 130, 130, 2, 1, 64), jnp.bfloat16, "softmax1", True, "self"),
        ((2, 128, 128, 2, 2, 128), jnp.float32, "learned_sink", True, None),  # sinks tiled over b
        ((2, 100, 100, 4, 2, 64), jnp.float32, "learned_sink", False, "self"),  # mapped over b
    ],
)
def test_matches_numpy(np_rng, shape, dtype, softmax, is_causal, segments):
  check_against_numpy(tpu_kernel, np_rng, shape, dtype, softmax, is_causal, segments)


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
def test_fully_masked_rows_give_zeros(np_rng, softmax):
  q, k, v, w, _ = random_case(np_rng, 1, 24, 24, 2, 2, 64, jnp.float32)
  q_ids = jnp.asarray(np.repeat([[0, 1, 2]], 8, axis=1), jnp.int32)  # segment 2 has no keys
  kv_ids = jnp.asarray(np.repeat([[0, 1, 3]], 8, axis=1), jnp.int32)
  opts = dict(softmax=softmax, segment_ids=(q_ids, kv_ids))
  np_ids = (np.asarray(q_ids), np.asarray(kv_ids))
  if softmax == "learned_sink":
    sinks = random_sinks(np_rng, 2)
    out, dq, dk, dv, dsinks = out_and_grads(
        lambda q, k, v, c: tpu_kernel(q, k, v, sinks=c, **opts), q, k, v, w, sinks)
    want = np_attention_grads(q, k, v, w, softmax=softmax, segment_ids=np_ids, sinks=sinks)
    np.testing.assert_allclose(dsinks, want[4], rtol=2e-5, atol=sink_grad_atol(w, want[0]))
  else:
    out, dq, dk, dv = out_and_grads(lambda q, k, v: tpu_kernel(q, k, v, **opts), q, k, v, w)
    want = np_attention_grads(q, k, v, w, softmax=softmax, segment_ids=np_ids)
  np.testing.assert_array_equal(out[:, 16:], 0.0)
  assert all(np.isfinite(x).all() for x in (dq, dk, dv))
  np.testing.assert_allclose(out, want[0], rtol=2e-5, atol=2e-5)


def test_dispatch_interpret_true_means_tpu_interpreter(np_rng):
  q, k, v, _, _ = random_case(np_rng, 1, 20, 20, 2, 2, 64, jnp.float32)
  got = dot_product_attention(q, k, v, implementation="pallas_tpu", interpret=True, scale=0.2)
  want, _ = np_attention(q, k, v, scale=0.2)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("softmax", ["softmax1", "learned_sink"])
def test_lowers_to_mosaic_for_tpu(softmax):
  """Cross-lowers forward and backward for TPU on this CPU machine (Mosaic, not the interpreter),
  including the vmap over the batch that segment ids take on TPU (and the sinks' gradient)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top

  q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 1000), jnp.int32)
  sinks = jax.ShapeDtypeStruct((8,), jnp.float32) if softmax == "learned_sink" else None

  def fwd_bwd(q, k, v, ids, sinks):
    def loss(q, k, v, sinks):
      return jnp.sum(pallas_tpu.flash_attention(q, k, v, softmax=softmax, sinks=sinks,
                                                is_causal=True, segment_ids=ids))
    return jax.grad(loss, argnums=(0, 1, 2) if sinks is None else (0, 1, 2, 3))(q, k, v, sinks)

  exported = export.export(
      jax.jit(fwd_bwd), platforms=["tpu"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(
          q, kv, kv, ids, sinks)
  assert exported.mlir_module().count("@tpu_custom_call(") == 3  # forward, dq, dkv
