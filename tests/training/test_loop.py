"""End to end: a short micro run on the embedded corpus learns, logs, checkpoints and evaluates."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from softmax_one_jax.analysis import outlier_metrics, print_metrics_table
from softmax_one_jax.data import get_tokenizer, validation_batches
from softmax_one_jax.models.loss import weighted_cross_entropy
from softmax_one_jax.rundir import load_model
from softmax_one_jax.training import NonFiniteError, evaluate, train
from tests.training._micro import micro_config

OUTLIER_KEYS = ("first_token_attention", "kurtosis_first", "kurtosis_rest", "max_abs_first",
                "max_abs_rest")


@pytest.mark.slow
def test_micro_run_learns_logs_and_evaluates(tmp_path, capsys):
  c = micro_config(optimizer="orthoadam", num_train_steps=30, eval_every_steps=15,
                   outlier_every_steps=15)
  c.checkpoint.every_steps = 10
  summary = train(c, tmp_path, outlier_metrics=outlier_metrics, report=print_metrics_table)
  assert summary["status"] == "done" and summary["step"] == 30

  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  by_step = {r["step"]: r for r in records}
  assert sorted(by_step) == list(range(1, 31))
  for r in records:
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "nonfinite_total"} <= set(r)
  for step in (15, 30):
    assert {"val_loss", "val_ppl", *OUTLIER_KEYS} <= set(by_step[step])
    assert math.isclose(by_step[step]["val_ppl"], math.exp(by_step[step]["val_loss"]), rel_tol=1e-9)
    assert 0.0 <= by_step[step]["first_token_attention"] <= 1.0
  first, last5 = by_step[1]["loss"], np.mean([by_step[s]["loss"] for s in range(26, 31)])
  assert last5 < first - 0.3, (first, last5)           # it learns
  assert by_step[30]["val_loss"] < math.log(512)        # better than uniform on held-out text
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"] == 512
  assert "micro" in capsys.readouterr().out              # the final metrics table

  # `eval` on the checkpoint reproduces the final validation metrics.
  ev = evaluate(tmp_path, outlier_metrics=outlier_metrics)
  assert set(OUTLIER_KEYS) <= set(ev)
  assert ev["step"] == 30
  np.testing.assert_allclose(ev["val_loss"], summary["val_loss"], rtol=1e-6)

  # load_model (the analysis entry point) gives the trained model: same held-out loss, computed
  # here without the training code's eval step.
  model, config = load_model(tmp_path)
  tok = get_tokenizer(config.data)
  total, weight = 0.0, 0.0
  for b in validation_batches(config.data, tokenizer=tok, seq_len=config.seq_len,
                              batch_size=config.eval_batch_size, num_batches=config.eval_batches):
    logits = model(b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"])
    s, w = weighted_cross_entropy(logits, b["targets"], b["weights"])
    total, weight = total + float(s), weight + float(w)
  np.testing.assert_allclose(total / weight, summary["val_loss"], rtol=1e-5)

  # Rerunning the finished command resumes at the end and only re-evaluates; without an
  # outlier_metrics function (the plain `train(config, workdir)` call) there are none.
  again = train(c, tmp_path)
  assert again["step"] == 30
  np.testing.assert_allclose(again["val_loss"], summary["val_loss"], rtol=1e-6)
  assert not set(OUTLIER_KEYS) & set(again)


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
  c = micro_config(optimizer="adamw", num_train_steps=12, max_nonfinite_steps=3)
  c.optimizer.learning_rate = 1e30      # the first update blows the weights up to inf
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip_norm = 0.0
  c.checkpoint.every_steps = 0
  with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite loss"):
    train(c, tmp_path)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["nonfinite_total"] >= 2


def test_resuming_with_a_different_model_is_refused(tmp_path):
  c = micro_config(optimizer="adamw")
  (tmp_path / "config.json").write_text(json.dumps(micro_config(optimizer="adamw").to_dict()))
  c.model.num_layers = 2
  with pytest.raises(ValueError, match="num_layers: 1 -> 2"):
    train(c, tmp_path)


def test_a_resume_accepts_another_remat_policy_but_not_another_model(tmp_path):
  # A run saved when remat was a switch (config.json: false) resumes under any named policy:
  # remat changes what the backward pass keeps, not the state. A different width is refused.
  from softmax_one_jax import rundir  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training import loop  # pylint: disable=import-outside-toplevel
  saved = micro_config()
  saved.model.remat = False
  rundir.write_config(tmp_path, saved)
  workdir = rundir.workdir_path(tmp_path)
  for policy in ("none", "full", "save_dots"):
    resumed = micro_config()
    resumed.model.remat = policy
    loop._check_same_run(workdir, resumed)
  wider = micro_config()
  wider.model.d_model = 64
  with pytest.raises(ConfigError, match="d_model: 32 -> 64"):
    loop._check_same_run(workdir, wider)
