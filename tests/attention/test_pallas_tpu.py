"""The TPU path (splash attention with zero sinks) in the Pallas TPU interpreter, against numpy.

Runs only where the installed jax has ``pltpu.InterpretParams`` (the TPU interpreter on CPU).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import dot_product_attention, pallas_tpu
from tests.attention.reference_np import np_attention
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
    ],
)
def test_matches_numpy(np_rng, shape, dtype, softmax, is_causal, segments):
  check_against_numpy(tpu_kernel, np_rng, shape, dtype, softmax, is_causal, segments)


@pytest.mark.parametrize("softmax", ["softmax1", "softmax"])
def test_fully_masked_rows_give_zeros(np_rng, softmax):
  q, k, v, w, _ = random_case(np_rng, 1, 24, 24, 2, 2, 64, jnp.float32)
  q_ids = jnp.asarray(np.repeat([[0, 1, 2]], 8, axis=1), jnp.int32)  # segment 2 has no keys
  kv_ids = jnp.asarray(np.repeat([[0, 1, 3]], 8, axis=1), jnp.int32)
  opts = dict(softmax=softmax, segment_ids=(q_ids, kv_ids))
  out, dq, dk, dv = out_and_grads(lambda q, k, v: tpu_kernel(q, k, v, **opts), q, k, v, w)
  np.testing.assert_array_equal(out[:, 16:], 0.0)
  assert all(np.isfinite(x).all() for x in (dq, dk, dv))
  want, _ = np_attention(q, k, v, softmax=softmax,
                         segment_ids=(np.asarray(q_ids), np.asarray(kv_ids)))
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def test_dispatch_interpret_true_means_tpu_interpreter(np_rng):
  q, k, v, _, _ = random_case(np_rng, 1, 20, 20, 2, 2, 64, jnp.float32)
  got = dot_product_attention(q, k, v, implementation="pallas_tpu", interpret=True, scale=0.2)
  want, _ = np_attention(q, k, v, scale=0.2)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_lowers_to_mosaic_for_tpu():
  """Cross-lowers forward and backward for TPU on this CPU machine (Mosaic, not the interpreter),
  including the vmap over the batch that segment ids take on TPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export  # pylint: disable=g-import-not-at-top

  q = jax.ShapeDtypeStruct((2, 1000, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

  def fwd_bwd(q, k, v, ids):
    def loss(q, k, v):
      return jnp.sum(pallas_tpu.flash_attention(q, k, v, is_causal=True, segment_ids=ids))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  exported = export.export(
      jax.jit(fwd_bwd), platforms=["tpu"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("tpu_custom_call")])(q, kv, kv, ids)
  assert exported.mlir_module().count("@tpu_custom_call(") == 3  # forward, dq, dkv
