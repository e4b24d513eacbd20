"""The sharded train step as compiled for 8 CPU devices: what it moves between devices, and the
Pallas attention kernels inside it (per shard, in the interpreters) against one device.

Collective bytes are read from the compiled program (``softmax_one_jax.training.hlo``): per device
per step, the results of every all-gather, all-reduce, reduce-scatter, all-to-all and permute.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from softmax_one_jax.models.loss import linear_cross_entropy

from softmax_one_jax.training import hlo
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training.state import init_train_state, setup_for_run
from softmax_one_jax.training.step import in_mesh, jit_eval_step, jit_train_step
from tests.training._micro import micro_config, random_batch
from tests.training.test_step import _assert_states_close, _run

VOCAB = 512
BATCH, SEQ = 16, 64


def _config(optimizer: str, **model):
  c = micro_config(optimizer=optimizer, seq_len=SEQ, global_batch_size=BATCH)
  c.model.update({"num_layers": 2, "d_model": 64, "num_heads": 4, "mlp_dim": 256,
                  "max_seq_len": SEQ, **model})
  c.optimizer.warmup_steps = 0
  c.optimizer.eps = 1e-3   # see tests/training/test_step.py: compares sharding, not rounding
  return c


def _setup(c, mesh, **optimizer):
  c.optimizer.update(optimizer)
  model_cfg = model_config_from(c, VOCAB)
  return setup_for_run(model_cfg, c.optimizer, c.num_train_steps, mesh, seed=0), model_cfg


def _step_collectives(c, layout, **optimizer):
  """Collective stats of the compiled train step, and the parameters' total bytes."""
  setup, _ = _setup(c, mesh_lib.make_mesh(*layout), **optimizer)
  sh = mesh_lib.batch_sharding(setup.mesh, BATCH)
  batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ), np.float32 if k == "weights" else np.int32,
                                   sharding=sh)
           for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
  text = jit_train_step(setup, 1, BATCH).lower(setup.abstract_state, batch).compile().as_text()
  param_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(setup.abstract_state.params))
  return hlo.collective_stats(text), param_bytes, text


def _total(stats) -> int:
  return sum(s.bytes for s in stats.values())


@pytest.mark.parametrize("layout", [(8, 1, 1), (1, 8, 1), (2, 4, 1)],
                         ids=["data8", "fsdp8", "data2-fsdp4"])
def test_fsdp_step_moves_weights_not_activations(layout):
  stats, param_bytes, text = _step_collectives(_config("adamw"), layout)
  # Data parallel: one all-reduce of the gradients (~1x the parameter bytes). FSDP: gather each
  # weight for the forward and the backward, reduce-scatter its gradient (~2-3x).
  assert _total(stats) <= (1.5 if layout[1] == 1 else 4) * param_bytes, {
      k: v for k, v in stats.items() if v.count}
  # No gathered array holds the global batch's activations ([B, T, ...] or [B*T, ...]).
  gathered = [hlo.shape_bytes(line.split(" = ", 1)[1].split(" all-gather", 1)[0])
              for line in text.splitlines() if " all-gather(" in line]
  activation_bytes = BATCH * SEQ * 64 * 4
  assert all(b < activation_bytes for b in gathered), sorted(gathered)[-3:]


MESHES = {"one": (1, 1, 1), "fsdp4": (1, 4, 1), "data2-fsdp2": (2, 2, 1), "tensor2": (1, 2, 2)}


def _losses_on(c, layout, batches, state=None):
  """Train ``c`` on ``batches`` on a mesh of ``layout`` (from ``state``, else step 0)."""
  devices = jax.devices()[:math.prod(layout)]
  setup, model_cfg = _setup(c, mesh_lib.make_mesh(*layout, devices=devices))
  state = init_train_state(setup, model_cfg, 0) if state is None else state
  step = jit_train_step(setup, 1, BATCH)
  sh = mesh_lib.batch_sharding(setup.mesh, BATCH)
  losses = []
  for b in batches:
    state, m = step(state, mesh_lib.global_batch(b, sh))
    losses.append(float(m["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def mesh_batches():
  seed = int.from_bytes(__import__("os").urandom(4), "little")
  print(f"mesh batches: numpy seed {seed}")
  rng = np.random.default_rng(seed)
  return [random_batch(rng, BATCH, SEQ, VOCAB) for _ in range(6)]


def test_orthoadam_trains_to_the_same_losses_on_every_mesh_as_adamw_does(mesh_batches):
  """One Q on every mesh: OrthoAdam's losses differ across meshes no more than AdamW's do."""
  spread = {}
  for optimizer in ("adamw", "orthoadam"):
    c = _config(optimizer)
    c.optimizer.eps = 1e-8
    losses = {name: _losses_on(c, layout, mesh_batches)[0] for name, layout in MESHES.items()}
    spread[optimizer] = max(abs(a - b) for name in MESHES
                            for a, b in zip(losses[name], losses["one"]))
    print(optimizer, losses)
  print("largest loss difference from one device:", spread)
  # AdamW's spread is float rounding (~1e-6); a mesh-dependent Q shows up as ~1e-2.
  assert spread["orthoadam"] <= max(10 * spread["adamw"], 2e-5), spread


def test_orthoadam_saved_on_4_devices_resumes_on_2_to_the_unbroken_losses(tmp_path, mesh_batches):
  import orbax.checkpoint as ocp

  c = _config("orthoadam")
  c.optimizer.eps = 1e-8
  unbroken, _ = _losses_on(c, (1, 2, 1), mesh_batches)
  first, state = _losses_on(c, (1, 4, 1), mesh_batches[:3])
  with ocp.StandardCheckpointer() as ckpt:
    assert {d.id for x in jax.tree.leaves(state) for d in x.sharding.device_set} == {0, 1, 2, 3}
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    setup, _ = _setup(c, mesh_lib.make_mesh(1, 2, 1, devices=jax.devices()[:2]))
    restored = ckpt.restore(tmp_path / "state", setup.abstract_state)
  assert {d.id for x in jax.tree.leaves(restored) for d in x.sharding.device_set} == {0, 1}
  rest, _ = _losses_on(c, (1, 2, 1), mesh_batches[3:], state=restored)
  np.testing.assert_allclose(first + rest, unbroken, rtol=0, atol=2e-5)


@pytest.mark.parametrize("impl,layout", [("pallas_gpu", (2, 2, 2)), ("pallas_tpu", (1, 2, 2))])
def test_step_with_pallas_attention_per_shard_equals_one_device(impl, layout):
  """Train and eval steps with the Pallas kernel (interpreted) on a mesh == XLA on one device.

  The TPU interpreter runs on 4 devices: it holds every simulated device at a barrier in each
  kernel call, and XLA:CPU on 2 cores does not run 8 device programs at once.
  """
  rng = np.random.default_rng(int.from_bytes(__import__("os").urandom(4), "little"))
  batches = [random_batch(rng, BATCH, SEQ, VOCAB) for _ in range(2)]
  devices = jax.devices()[:math.prod(layout)]
  mesh = mesh_lib.make_mesh(*layout, devices=devices)
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  # One layer: the kernels' per-shard calls are the same in every layer.
  kernel_cfg = _config("orthoadam", attention_impl=impl, attention_interpret=True, num_layers=1)
  setup, model_cfg = _setup(kernel_cfg, mesh)
  ref_setup, ref_model_cfg = _setup(_config("orthoadam", attention_impl="xla", num_layers=1), one)
  got, got_m = _run(setup, init_train_state(setup, model_cfg, 0), batches, BATCH)
  want, want_m = _run(ref_setup, init_train_state(ref_setup, ref_model_cfg, 0), batches, BATCH)
  for a, b in zip(got_m, want_m):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  _assert_states_close(got, want)

  full = {k: v for k, v in batches[0].items()}
  ev = jit_eval_step(setup, BATCH)(got.params, mesh_lib.global_batch(
      full, mesh_lib.batch_sharding(mesh, BATCH)))
  ref_ev = jit_eval_step(ref_setup, BATCH)(want.params, mesh_lib.global_batch(
      full, mesh_lib.batch_sharding(one, BATCH)))
  np.testing.assert_allclose(np.asarray(ev), np.asarray(ref_ev), rtol=1e-5)


def test_fused_loss_reads_the_unembedding_once_per_step_under_a_mesh(np_rng):
  """The fused LM head + loss scans over sequence chunks; per batch shard it gathers the
  FSDP-sharded unembedding once and reduces its gradient once, not once per chunk, and its
  loss and gradients equal the unsharded ones."""
  mesh = mesh_lib.make_mesh(2, 4, 1)
  b, t, d, v, chunks = 8, 64, 32, 256, 8
  x = np_rng.standard_normal((b, t, d)).astype(np.float32)
  unembed = np_rng.standard_normal((v, d)).astype(np.float32)
  targets = np_rng.integers(0, v, (b, t)).astype(np.int32)
  weights = np_rng.random((b, t)).astype(np.float32)

  def loss(x, unembed):
    s, n = linear_cross_entropy(x, unembed, targets, weights, chunk=t // chunks)
    return s / n

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1))
  rows, cols = (NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P(None, "fsdp")))
  sharded = jax.jit(in_mesh(grad_fn, mesh), in_shardings=(rows, cols))
  stats = hlo.collective_stats(sharded.lower(x, unembed).compile().as_text())
  unembed_bytes = v * d * 4
  assert _total(stats) <= 3 * unembed_bytes, {k: s for k, s in stats.items() if s.count}
  (got, (gx, gu)), (want, (wx, wu)) = sharded(x, unembed), jax.jit(grad_fn)(x, unembed)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(gx, wx, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gu, wu, rtol=1e-4, atol=1e-6)
