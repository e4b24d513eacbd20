"""The train step: loss against float64 numpy, sharded == single device, accumulation, NaN skip."""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from softmax_one_jax.models.loss import weighted_cross_entropy
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training.state import (build_optimizer, build_run, init_train_state,
                                            learning_rate_schedule, make_setup)
from softmax_one_jax.training.step import in_mesh, jit_train_step, make_train_step
from tests.training._micro import micro_config, random_batch

VOCAB = 512


def _np_weighted_xent(logits, targets, weights):
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return (nll * weights).sum(), weights.sum()


def test_weighted_cross_entropy_matches_float64_numpy(np_rng):
  logits = np_rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = np_rng.integers(0, 11, (3, 5)).astype(np.int32)
  weights = (np_rng.random((3, 5)) > 0.3).astype(np.float32)
  s, w = weighted_cross_entropy(logits, targets, weights)
  s_ref, w_ref = _np_weighted_xent(logits, targets, weights)
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-5)
  assert float(w) == w_ref


def test_schedule_is_linear_warmup_then_cosine():
  c = micro_config()
  c.optimizer.warmup_steps, c.optimizer.end_lr_fraction, c.num_train_steps = 4, 0.1, 20
  s = learning_rate_schedule(c.optimizer, c.num_train_steps)
  peak = c.optimizer.learning_rate
  for t in range(0, 21):
    if t <= 4:
      want = peak * t / 4
    else:
      frac = (t - 4) / 16
      want = peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
    np.testing.assert_allclose(float(s(t)), want, rtol=1e-5, atol=1e-9)


def _setup(optimizer, mesh, lr=3e-3, loss_chunk_logits=None):
  c = micro_config(optimizer=optimizer)
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = 0
  # Adam divides by sqrt(v) + eps: with a tiny eps, a gradient entry that is a near-cancelling sum
  # (float noise of the summation order, which sharding changes) becomes a full-size update. A
  # larger eps keeps the step a well-conditioned function of the gradients, so the comparison
  # below measures sharding errors, not Adam's amplification of rounding noise.
  c.optimizer.eps = 1e-3
  model_cfg = model_config_from(c, VOCAB)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, mesh, seed=0, loss_chunk_logits=loss_chunk_logits)
  return setup, init_train_state(setup, model_cfg, seed=0)


def _run(setup, state, batches, batch_size, accum=1):
  step = jit_train_step(setup, accum, batch_size)
  sh = mesh_lib.batch_sharding(setup.mesh, batch_size)
  metrics = []
  for b in batches:
    state, m = step(state, mesh_lib.global_batch(b, sh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def _assert_states_close(a, b, rtol=2e-4, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
  for x, y in zip(jax.tree.leaves(a.opt_state), jax.tree.leaves(b.opt_state)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def batches():
  """Two fresh random batches shared by the module's comparisons (seed printed on failure)."""
  seed = int.from_bytes(__import__("os").urandom(4), "little")
  print(f"test_step batches: numpy seed {seed}")
  rng = np.random.default_rng(seed)
  return [random_batch(rng, 8, 32, VOCAB) for _ in range(2)]


@pytest.fixture(scope="module")
def single_device_runs(batches):
  """The reference: the same two steps on one device, per optimizer (computed once)."""
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  cache = {}

  def get(optimizer):
    if optimizer not in cache:
      cache[optimizer] = _run(*_setup(optimizer, one), batches, 8)
    return cache[optimizer]
  return get


@pytest.mark.parametrize("layout,optimizer", [
    ((8, 1, 1), "adamw"), ((1, 8, 1), "orthoadam"), ((2, 2, 2), "orthoadam"),
    ((1, 2, 4), "adamw")])
def test_sharded_step_equals_single_device(layout, optimizer, batches, single_device_runs):
  """Two steps on a (data, fsdp, tensor) mesh of 8 CPU devices == the same on one device."""
  ref_state, ref_m = single_device_runs(optimizer)
  setup, state = _setup(optimizer, mesh_lib.make_mesh(*layout))
  # With fsdp or tensor axes, parameters really are split (not silently replicated).
  assert layout[1] * layout[2] == 1 or any(
      len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
      for x in jax.tree.leaves(state.params))
  got_state, got_m = _run(setup, state, batches, 8)
  for a, b in zip(got_m, ref_m):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  _assert_states_close(got_state, ref_state)


def test_gradient_accumulation_equals_one_big_batch(batches, single_device_runs):
  ref_state, ref_m = single_device_runs("adamw")
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  got_state, got_m = _run(*_setup("adamw", one), batches, 8, accum=4)
  for a, b in zip(got_m, ref_m):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  _assert_states_close(got_state, ref_state)


def _scan_lengths(jaxpr) -> list[int]:
  """Lengths of every ``lax.scan`` in ``jaxpr`` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append(eqn.params["length"])
    for sub in jaxprs_in_params(eqn.params):
      found += _scan_lengths(sub)
  return found


def test_loss_chunk_opt_in_changes_the_chunks_not_the_step(batches, single_device_runs):
  """``config.loss_chunk_logits`` reaches the step's loss, which then scans over more chunks and
  computes the same step as the default single chunk."""
  c = micro_config(optimizer="adamw", loss_chunk_logits=8 * 4 * VOCAB)
  assert build_run(c, devices=jax.devices()[:1])[3].loss_chunk_logits == 8 * 4 * VOCAB
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ref_state, ref_m = single_device_runs("adamw")
  setup, state = _setup("adamw", one, loss_chunk_logits=8 * 4 * VOCAB)
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  default_setup, _ = _setup("adamw", one)
  scans = lambda s: Counter(_scan_lengths(jax.make_jaxpr(in_mesh(make_train_step(s), one))(state, batch).jaxpr))
  # The loss's scans (forward and gradient) over 32 / 4 chunks instead of one.
  added, removed = scans(setup) - scans(default_setup), scans(default_setup) - scans(setup)
  assert set(added) == {32 // 4} and set(removed) == {1} and added[8] == removed[1]
  got_state, got_m = _run(setup, state, batches, 8)
  for a, b in zip(got_m, ref_m):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  _assert_states_close(got_state, ref_state)


def test_non_finite_step_is_skipped_and_counted(batches):
  mesh = mesh_lib.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  setup, state = _setup("adamw", mesh)
  before = jax.device_get(state)
  good = batches[0]
  bad = dict(good, weights=np.where(good["weights"] > 0, np.nan, 0).astype(np.float32))
  step = jit_train_step(setup, 1, 8)
  sh = mesh_lib.batch_sharding(mesh, 8)
  state, m1 = step(state, mesh_lib.global_batch(bad, sh))
  state, m2 = step(state, mesh_lib.global_batch(bad, sh))
  after = jax.device_get(state)
  assert (float(m1["finite"]), float(m2["finite"])) == (0.0, 0.0)
  assert int(after.nonfinite_streak) == 2 and int(after.nonfinite_total) == 2
  assert int(after.step) == 2
  for x, y in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  state, m3 = step(state, mesh_lib.global_batch(good, sh))
  assert float(m3["finite"]) == 1.0 and np.isfinite(float(m3["loss"]))
  assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2


def test_bf16_compute_with_remat_keeps_fp32_parameters_and_optimizer_state(batches):
  """Mixed precision: bf16 matmuls, fp32 master weights and moments; loss near the fp32 loss."""
  one = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  c = micro_config(optimizer="orthoadam")
  c.optimizer.warmup_steps = 0
  c.model.dtype, c.model.remat = "bfloat16", True
  model_cfg = model_config_from(c, VOCAB)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, one, seed=0)
  state, metrics = _run(setup, init_train_state(setup, model_cfg, seed=0), batches[:1], 8)
  for x in jax.tree.leaves(state.params):
    assert x.dtype == np.float32
  for x in jax.tree.leaves(state.opt_state):
    assert x.dtype != jnp.bfloat16
  ref_state, ref_m = _run(*_setup("orthoadam", one), batches[:1], 8)   # same init, fp32 compute
  np.testing.assert_allclose(metrics[0]["loss"], ref_m[0]["loss"], rtol=2e-2)
