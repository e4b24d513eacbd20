"""OrthoAdam's state does not depend on the mesh: the run records its mesh, analysis reads the
checkpoint on another device count, and the run resumes on another mesh."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest

from softmax_one_jax.rundir import load_model
from softmax_one_jax.training import evaluate
from tests.training._micro import MICRO, cpu_env, train_command


@pytest.mark.slow
def test_orthoadam_run_on_four_devices_loads_on_eight_and_resumes_on_two(tmp_path):
  flags = ("--config.num_train_steps=4", "--config.checkpoint.every_steps=4")
  config = f"{MICRO}:orthoadam"
  run = subprocess.run(train_command(tmp_path, *flags, config=config), env=cpu_env(4),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  recorded = json.loads((tmp_path / "config.json").read_text())["mesh"]
  assert (recorded["data"], recorded["fsdp"], recorded["tensor"]) == (1, 4, 1)

  # This process has 8 devices; the checkpoint was written by 4.
  assert jax.device_count() == 8
  model, _ = load_model(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model))
  assert evaluate(tmp_path)["step"] == 4

  resumed = subprocess.run(
      train_command(tmp_path, "--config.num_train_steps=6", config=config), env=cpu_env(2),
      capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "from step 4" in resumed.stdout + resumed.stderr
  assert json.loads((tmp_path / "config.json").read_text())["mesh"]["fsdp"] == 2
  assert evaluate(tmp_path)["step"] == 6
