"""The vocab-parallel fused loss on 8 CPU devices, against float64 numpy.

Under a mesh ``linear_cross_entropy`` takes the unembedding in its parameter sharding (words over
tensor, width over fsdp), combines the logsumexp across the vocabulary's shards, and hands back
the unembedding's gradient reduce-scattered into that sharding. Checked here: the numbers (loss,
d/dx, d/dunembed, d/dweights) on every mesh shape, with a vocabulary the tensor axis divides and
one it does not; where each operand and gradient lives; and that no two devices repeat work.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from softmax_one_jax.models.loss import UNEMBED_AXES, linear_cross_entropy, loss_layout
from softmax_one_jax.training import hlo
from softmax_one_jax.training.mesh import logical_sharding, make_mesh
from softmax_one_jax.training.step import in_mesh
from tests.models.test_loss import _np_reference

MESHES = {"one": (1, 1, 1), "fsdp8": (1, 8, 1), "data2-fsdp4": (2, 4, 1),
          "fsdp4-tensor2": (1, 4, 2)}


def _mesh(layout):
  return make_mesh(*layout, devices=jax.devices()[:math.prod(layout)])


def _inputs(rng, b, t, d, v):
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  w_vd = (rng.normal(size=(v, d)) * 0.7).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.25).astype(np.float32)
  return x, w_vd, targets, weights


def _shardings(mesh, x, w_vd):
  """The operands as training shards them: hidden states by batch, the unembedding as the
  parameter (its logical axes through the rules table)."""
  return (logical_sharding(("batch",), x.shape, mesh), logical_sharding(UNEMBED_AXES, w_vd.shape,
                                                                        mesh))


def _grad_fn(targets, chunk):
  def objective(x, w_vd, weights):
    return linear_cross_entropy(x, w_vd, targets, weights, chunk=chunk)[0]
  return jax.value_and_grad(objective, argnums=(0, 1, 2))


# (batch, seq, chunk): 8 rows split over every device; 4 rows cannot take every axis that
# shards neither the batch nor the vocabulary, which then splits the sequence instead.
@pytest.mark.parametrize("rows", [(8, 16, 4), (4, 16, 4)], ids=["b8", "b4"])
@pytest.mark.parametrize("vocab", [64, 37], ids=["v64", "v37"])
@pytest.mark.parametrize("name", sorted(MESHES))
def test_loss_and_gradients_match_float64_numpy_on_every_mesh(np_rng, name, vocab, rows):
  b, t, chunk = rows
  mesh = _mesh(MESHES[name])
  x, w_vd, targets, weights = _inputs(np_rng, b, t, 16, vocab)
  (s_ref, _), (gx_ref, gw_ref, gweights_ref) = _np_reference(x, w_vd, targets, weights)
  x_sh, w_sh = _shardings(mesh, x, w_vd)
  grad = jax.jit(in_mesh(_grad_fn(targets, chunk), mesh), in_shardings=(x_sh, w_sh, None))
  s, (gx, gw, gweights) = grad(x, w_vd, weights)
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx), gx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), gw_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gweights), gweights_ref, rtol=1e-4, atol=1e-5)
  # The gradient of the unembedding comes back in the parameter's own sharding.
  assert gw.sharding.is_equivalent_to(w_sh, 2), (gw.sharding, w_sh)
  # Undifferentiated (evaluation): the forward-only scan, the same sum.
  loss = lambda x, w_vd: linear_cross_entropy(x, w_vd, targets, weights, chunk=chunk)[0]
  s_eval = jax.jit(in_mesh(loss, mesh), in_shardings=(x_sh, w_sh))(x, w_vd)
  np.testing.assert_allclose(float(s_eval), s_ref, rtol=1e-5)


def _layout_on(layout, *args):
  with jax.sharding.use_abstract_mesh(_mesh(layout).abstract_mesh):
    return loss_layout(*args)


def test_every_device_gets_its_own_rows_or_words():
  # (batch, seq, vocab, d_model, chunk) -> the per-device chunk, and which mesh axes split the
  # rows, the sequence, the words and the width.
  lay = lambda *a: dataclasses.astuple(_layout_on(*a))
  assert lay((1, 1, 1), 8, 16, 64, 16, 4) == (4, (), (), (), ())
  assert lay((1, 8, 1), 8, 16, 64, 16, 4) == (4, ("fsdp",), (), (), ("fsdp",))
  assert lay((2, 4, 1), 8, 16, 64, 16, 4) == (4, ("data", "fsdp"), (), (), ("fsdp",))
  assert lay((1, 4, 2), 8, 16, 64, 16, 4) == (4, ("fsdp",), (), ("tensor",), ("fsdp",))
  # A vocabulary the tensor axis does not divide is replicated there, as the parameter is:
  # tensor then splits the rows, else the sequence.
  assert lay((1, 4, 2), 8, 16, 37, 16, 4) == (4, ("fsdp", "tensor"), (), (), ("fsdp",))
  assert lay((1, 4, 2), 4, 16, 37, 16, 8) == (8, ("fsdp",), ("tensor",), (), ("fsdp",))
  # A batch fsdp does not divide: fsdp splits the sequence, each device's chunk within its 2.
  assert lay((1, 8, 1), 4, 16, 64, 16, 4) == (2, (), ("fsdp",), (), ("fsdp",))
  # A width fsdp does not divide leaves the unembedding whole on fsdp (nothing to gather).
  assert lay((1, 8, 1), 8, 16, 64, 12, 4) == (4, ("fsdp",), (), (), ())


def test_tokens_that_no_idle_axis_can_split_fail_with_the_fix():
  # 4 rows on fsdp=4 and 37 words on tensor=2, 15 positions: tensor would repeat fsdp's work.
  with pytest.raises(ValueError, match=r"pad the vocabulary to a multiple of 2 "
                                       r"\(config.model.vocab_multiple\)"):
    _layout_on((1, 4, 2), 4, 15, 37, 16, 5)


def _compiled_grad(layout, b=8, t=16, d=32, v=384, chunk=4):
  mesh = _mesh(layout)
  x = jax.ShapeDtypeStruct((b, t, d), np.float32)
  w_vd = jax.ShapeDtypeStruct((v, d), np.float32)
  x_sh, w_sh = _shardings(mesh, x, w_vd)
  targets, weights = np.zeros((b, t), np.int32), np.ones((b, t), np.float32)
  f = lambda x, w_vd: linear_cross_entropy(x, w_vd, targets, weights, chunk=chunk)[0]
  return jax.jit(in_mesh(jax.grad(f, (0, 1)), mesh), in_shardings=(x_sh, w_sh)).lower(
      x, w_vd).compile(), w_sh


def _result_elements(text: str, opcode: str) -> list[int]:
  """Elements of the result of every ``opcode`` instruction in compiled HLO text."""
  out = []
  for line in text.splitlines():
    m = re.search(rf"= (\S+) {opcode}(?:-start)?\(", line)
    if m:
      out.append(hlo.shape_bytes(m.group(1)) // 4)     # every one here is float32
  return out


@pytest.mark.parametrize("name", ["fsdp8", "data2-fsdp4", "fsdp4-tensor2"])
def test_unembedding_gradient_is_reduce_scattered_not_all_reduced(name):
  v, d = 384, 32
  compiled, w_sh = _compiled_grad(MESHES[name], v=v, d=d)
  text = compiled.as_text()
  shard = math.prod(w_sh.shard_shape((v, d)))
  # One reduce-scatter hands each device its shard of the gradient, summed over the fsdp rows.
  assert _result_elements(text, "reduce-scatter") == [shard], _result_elements(text,
                                                                               "reduce-scatter")
  # No all-reduce is larger than that shard: no [V, D] (or [V / tensor, D]) gradient is summed
  # whole. On data=2 the shard itself is summed over the two replicas of the parameter.
  assert max(_result_elements(text, "all-reduce"), default=0) <= shard, _result_elements(
      text, "all-reduce")


def test_tensor_devices_split_the_head_work_instead_of_repeating_it():
  # Per-device FLOPs of the LM head and its gradient: fsdp=4 x tensor=2 splits the words (V
  # divides) or the rows (it does not) over tensor, so each device does what it does on fsdp=8.
  for v in (384, 381):
    flops = {name: _compiled_grad(MESHES[name], v=v)[0].cost_analysis()["flops"]
             for name in ("fsdp8", "fsdp4-tensor2")}
    np.testing.assert_allclose(flops["fsdp4-tensor2"], flops["fsdp8"], rtol=0.05, err_msg=str(v))
