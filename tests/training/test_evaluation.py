"""``softmax-one eval`` restores the parameters only: an optimizer that does not match the
checkpoint, or cannot be built at all, does not stop it, and its loss is the full-state one."""

from __future__ import annotations

import json

import jax
import pytest

from softmax_one_jax import rundir
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import evaluate, state, train
from softmax_one_jax.training.evaluation import validation_batches_for, validation_metrics
from tests.training._micro import micro_config


def _full_state_val_loss(workdir, config) -> float:
  """The validation loss the way ``evaluate`` computed it before: the whole ``TrainState``
  (parameters, optimizer state, counters) restored with the run's optimizer, on all devices."""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  tokenizer, config, _, setup = state.build_run(config)
  manager = rundir.make_manager(workdir, read_only=True, async_save=False)
  try:
    full, _ = ckpt_lib.restore_latest(manager, setup.abstract_state)
  finally:
    manager.close()
  assert jax.tree.leaves(full.opt_state)       # the optimizer's state was read as well
  batches = validation_batches_for(config, tokenizer, config.eval_batches, config.eval_batch_size)
  return validation_metrics(setup, full.params, batches, config.eval_batch_size)["val_loss"]


@pytest.fixture(scope="module")
def orthoadam_run(tmp_path_factory):
  """A 2-step OrthoAdam micro run with its one checkpoint, and its full-state validation loss."""
  workdir = tmp_path_factory.mktemp("run")
  c = micro_config(optimizer="orthoadam", num_train_steps=2)
  train(c, workdir)
  return workdir, _full_state_val_loss(workdir, rundir.read_config(workdir))


def test_eval_loss_equals_the_full_state_one(orthoadam_run):
  workdir, full_loss = orthoadam_run
  ev = evaluate(workdir)
  assert ev["step"] == 2
  assert ev["val_loss"] == pytest.approx(full_loss, rel=1e-6)


def test_a_checkpoint_saved_with_another_optimizer_still_evaluates(orthoadam_run):
  workdir, full_loss = orthoadam_run
  config_file = workdir / rundir.CONFIG_FILE
  saved = config_file.read_text()
  try:
    config = json.loads(saved)
    config["optimizer"]["name"] = "adamw"            # the checkpoint holds OrthoAdam's state
    config_file.write_text(json.dumps(config))
    # The full TrainState of an AdamW run does not fit this checkpoint...
    with pytest.raises(Exception):
      _full_state_val_loss(workdir, rundir.read_config(workdir))
    # ...its parameters do.
    assert evaluate(workdir)["val_loss"] == pytest.approx(full_loss, rel=1e-6)
  finally:
    config_file.write_text(saved)


def test_eval_builds_no_optimizer(orthoadam_run, monkeypatch):
  workdir, full_loss = orthoadam_run

  def unbuildable(*args, **kwargs):
    raise ValueError("this optimizer can no longer be built")

  monkeypatch.setattr(state, "build_optimizer", unbuildable)
  assert evaluate(workdir)["val_loss"] == pytest.approx(full_loss, rel=1e-6)
