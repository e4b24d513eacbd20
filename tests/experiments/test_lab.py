"""The extreme-token lab: its config grid, and the attention sink appearing for softmax + AdamW.

The end-to-end test runs ``experiments/run_lab.py`` for one condition and one seed (300 steps,
about a minute on 2 cores) on one CPU device, as a user would, and reads its ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import run_lab
from experiments.configs import bigram_backcopy
from softmax_one_jax.analysis.outliers import outlier_metrics
from softmax_one_jax.data import get_tokenizer
from softmax_one_jax.data.pipeline import validation_batches
from softmax_one_jax.models import Transformer
from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training.config import validate_config
from tests.training._micro import REPO, cpu_env


@pytest.mark.parametrize("arg", ["softmax,adamw", "softmax1,orthoadam,scalar_rmsnorm",
                                 "learned_sink,sgd,3", "softmax,sgd,rmsnorm,3,nobos"])
def test_every_lab_variant_is_a_valid_run_with_one_head_and_the_optimizers_own_lr(arg):
  softmax, optimizer, norm, layers, bos = bigram_backcopy.parse_lab_variant(arg)
  c = bigram_backcopy.get_config(arg)
  validate_config(c, num_devices=1, process_count=1)
  assert (c.model.softmax, c.optimizer.name, c.model.norm, c.model.num_layers, c.data.bb_bos) == (
      softmax, optimizer, norm, layers, bos)
  assert c.model.num_heads == 1 and c.model.d_model >= 64 and c.model.position == "learned"
  assert c.optimizer.learning_rate == bigram_backcopy.LEARNING_RATES[optimizer]


def test_the_norm_is_its_own_axis_not_set_by_the_optimizer():
  norms = {bigram_backcopy.get_config(f"softmax,{o}").model.norm
           for o in bigram_backcopy.OPTIMIZERS}
  assert norms == {"layernorm"}


@pytest.mark.parametrize("bad", ["softmax", "softmax,adam", "softmax2,adamw", "softmax,adamw,2",
                                 "softmax,adamw,layernorm,1,nobos,x"])
def test_a_bad_lab_variant_names_the_choices(bad):
  with pytest.raises(ValueError, match="SOFTMAX,OPTIMIZER"):
    bigram_backcopy.parse_lab_variant(bad)


def test_chance_first_token_mass_is_the_mean_of_one_over_visible_keys():
  t = np.arange(1, 128)
  assert run_lab.chance_first_token_mass(128) == pytest.approx(np.mean(1 / (t + 1)), rel=1e-12)


def test_mass_at_matched_loss_reads_the_first_validation_within_the_gap():
  series = [{"step": 100, "first_token_mass_non_trigger": 0.05},
            {"step": 200, "val_loss": 1.30, "first_token_mass_non_trigger": 0.10},
            {"step": 400, "val_loss": 1.09, "first_token_mass_non_trigger": 0.50},
            {"step": 600, "val_loss": 1.01, "first_token_mass_non_trigger": 0.90}]
  assert run_lab.mass_at_loss_gap(series, bayes=1.0, gap=0.1) == 0.50
  assert math.isnan(run_lab.mass_at_loss_gap(series, bayes=0.5, gap=0.1))   # never reached


def test_lab_conditions_change_one_factor_from_the_grid():
  grid = {(c.softmax, c.optimizer) for c in run_lab.conditions() if c.group == "grid"}
  assert len(grid) == 9
  base = run_lab.Condition("grid", "softmax", "adamw")
  for c in run_lab.conditions():
    if c.group == "grid":
      continue
    changed = [f for f in ("norm", "layers", "bos") if getattr(c, f) != getattr(base, f)]
    assert len(changed) == 1, c


@pytest.mark.slow
def test_softmax_adamw_grows_an_attention_sink_on_bigram_backcopy(tmp_path):
  # Before training, the first token gets about its uniform share.
  config = bigram_backcopy.get_config("softmax,adamw")
  tokenizer = get_tokenizer(config.data)
  batch = validation_batches(config.data, tokenizer, config.seq_len, 32, 1)[0]
  model = Transformer(model_config_from(config, tokenizer.vocab_size), rngs=nnx.Rngs(0))
  untrained = outlier_metrics(model, jnp.asarray(batch["inputs"]))
  chance = run_lab.chance_first_token_mass(config.seq_len)
  assert untrained["first_token_mass"] < 3 * chance
  assert untrained["sink_rate"] == 0.0

  out = tmp_path / "out"
  cmd = [sys.executable, str(REPO / "experiments" / "run_lab.py"), "--only=softmax-adamw-layernorm-L1",
         "--seeds=1", "--steps=300", f"--workdir={tmp_path / 'runs'}", f"--out={out}"]
  run = subprocess.run(cmd, env=cpu_env(1), capture_output=True, text=True, timeout=900, cwd=REPO)
  assert run.returncode == 0, run.stderr[-3000:]
  entry = json.loads((out / "metrics.json").read_text())["conditions"]["softmax-adamw-layernorm-L1"]
  final = entry["runs"]["0"]["final"]
  # The sink: one head, one layer, so a sink rate of 1 is the head putting > 0.3 of all its
  # queries' attention on BOS; on non-trigger queries far more (the bigram needs no context).
  assert final["sink_rate"] == 1.0
  assert final["first_token_mass_non_trigger"] > 10 * chance
  # Trigger queries must look two tokens back to copy, so they do not attend to the sink.
  assert final["first_token_mass_trigger"] < final["first_token_mass_non_trigger"] / 3
  assert final["val_loss"] < entry["bayes_loss"] + 0.15
  for name in ("table.md", "dynamics_grid.png", "attention_maps.png"):
    assert (out / name).stat().st_size > 0
  assert "softmax | adamw" in (out / "table.md").read_text()
