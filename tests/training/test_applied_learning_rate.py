"""The logged learning rate is the one optax applied: skipped non-finite steps do not advance it.

A non-finite step keeps the old optimizer state, so optax's own count (which the schedule reads)
stops while the train state's step goes on. Each step's "learning_rate" must be the schedule at
the number of updates applied before it, here computed in closed form (linear warm-up, cosine
decay) from the finite steps, never from the jitted code.
"""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import optax
import pytest

from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training import loop
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training import train
from softmax_one_jax.training.state import build_optimizer, init_train_state, make_setup
from softmax_one_jax.training.step import applied_learning_rate, jit_train_step
from tests.training._micro import micro_config, random_batch

PEAK, WARMUP, STEPS, END = 3e-3, 4, 8, 0.1
VOCAB = 512


def _config(optimizer: str):
  """The micro run with a warm-up and decay over STEPS: its rate changes at every step."""
  c = micro_config(optimizer=optimizer, num_train_steps=STEPS)
  c.optimizer.update(learning_rate=PEAK, warmup_steps=WARMUP, end_lr_fraction=END)
  return c


def _closed_form_lr(count: int) -> float:
  """Linear warm-up to PEAK over WARMUP updates, then cosine decay to END * PEAK at STEPS."""
  if count <= WARMUP:
    return PEAK * count / WARMUP
  frac = min((count - WARMUP) / (STEPS - WARMUP), 1.0)
  return PEAK * (END + (1 - END) * 0.5 * (1 + np.cos(np.pi * frac)))


def _updates_before(finite: list[bool]) -> list[int]:
  """For each step, the number of earlier steps whose update was applied."""
  return [int(sum(finite[:i])) for i in range(len(finite))]


def _poison(batch):
  """The batch with every weight NaN: its loss, hence its step, is non-finite."""
  return dict(batch, weights=np.full_like(batch["weights"], np.nan))


def test_each_optimizers_schedule_count_is_found():
  # Every optimizer of build_optimizer applies its schedule through a ScaleByScheduleState.
  params = {"w": np.ones((2, 2), np.float32)}
  schedule = optax.linear_schedule(0.0, 1.0, 10)
  for tx in (optax.adamw(schedule), optax.chain(optax.clip_by_global_norm(1.0),
                                                optax.sgd(schedule, momentum=0.9))):
    state = tx.init(params)
    for _ in range(3):
      _, state = tx.update(params, state, params)
    assert float(applied_learning_rate(schedule, state, 99)) == pytest.approx(0.3)
  # No such count (a constant rate): the train state's step names it.
  assert float(applied_learning_rate(schedule, optax.sgd(0.1).init(params), 5)) == 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "orthoadam"])
def test_step_metrics_name_the_rate_of_optaxs_own_count(optimizer):
  mesh = mesh_lib.make_mesh(1, 2, 1, devices=jax.devices()[:2])
  c = _config(optimizer)
  model_cfg = model_config_from(c, VOCAB)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, mesh, seed=0)
  state = init_train_state(setup, model_cfg, seed=0)
  rng = np.random.default_rng(0)
  finite = [True, False, False, True, True, False, True]
  step = jit_train_step(setup, 1, 8)
  sh = mesh_lib.batch_sharding(mesh, 8)
  logged = []
  for ok in finite:
    batch = random_batch(rng, 8, 32, VOCAB)
    state, m = step(state, mesh_lib.global_batch(batch if ok else _poison(batch), sh))
    assert float(m["finite"]) == float(ok)
    logged.append(float(m["learning_rate"]))
  want = [_closed_form_lr(n) for n in _updates_before(finite)]
  np.testing.assert_allclose(logged, want, rtol=1e-6, atol=1e-12)
  # The schedule at the train state's step (what was logged before) differs after a skip.
  assert not np.allclose(logged, [_closed_form_lr(s) for s in range(len(finite))])


def test_a_run_with_a_skipped_step_logs_the_rate_optax_applied(tmp_path, monkeypatch):
  bad_steps = {3}
  real = loop.jit_train_step

  def poisoning_jit_train_step(*args, **kwargs):
    step_fn, calls = real(*args, **kwargs), itertools.count(1)

    def step(state, batch):
      if next(calls) in bad_steps:
        batch = dict(batch, weights=batch["weights"] * np.float32(np.nan))
      return step_fn(state, batch)
    return step

  monkeypatch.setattr(loop, "jit_train_step", poisoning_jit_train_step)
  c = _config("adamw")
  c.checkpoint.every_steps = 0
  assert train(c, tmp_path)["step"] == STEPS
  records = {r["step"]: r for r in map(json.loads,
                                       (tmp_path / "metrics.jsonl").read_text().splitlines())}
  finite = [s not in bad_steps for s in range(1, STEPS + 1)]
  assert [records[s]["nonfinite_total"] for s in range(1, STEPS + 1)] == list(
      np.cumsum([not f for f in finite]))
  logged = [records[s]["learning_rate"] for s in range(1, STEPS + 1)]
  np.testing.assert_allclose(logged, [_closed_form_lr(n) for n in _updates_before(finite)],
                             rtol=1e-6, atol=1e-12)
