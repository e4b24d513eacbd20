"""Validation loss, perplexity and outlier metrics of a model, during training and after it.

``validation_metrics`` and ``outlier_metrics_for`` serve the training loop's periodic
evaluations; ``evaluate`` is ``softmax-one eval``: the same numbers for a run's checkpoint.
Training does not import analysis: the outlier metrics come in as a callback
(``OutlierMetricsFn``; ``softmax_one_jax.analysis.outlier_metrics`` fits).

Example:
  >>> evaluate("runs/tiny")["val_ppl"]                                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from softmax_one_jax import rundir
from softmax_one_jax.data import BATCH_KEYS, get_tokenizer, validation_batches
from softmax_one_jax.errors import MissingFileError
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.state import TrainSetup, make_setup, merge_model
from softmax_one_jax.training.step import jit_eval_step

# ``fn(model, tokens_bt, *, segment_ids, positions, trigger_positions) -> {name: scalar}``: the
# outlier metrics of one batch ``[B, T]`` (``softmax_one_jax.analysis.outlier_metrics`` fits).
OutlierMetricsFn = Callable[..., Mapping[str, Any]]
# ``fn(name, metrics)``: shows a run's final metrics (``analysis.print_metrics_table`` fits).
ReportFn = Callable[[str, dict[str, float]], Any]



def global_from_full(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A batch every process holds in full -> global arrays (multi-host safe)."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def validation_batches_for(config: ml_collections.ConfigDict, tokenizer: Any, num_batches: int,
                        batch_size: int) -> list[dict[str, np.ndarray]]:
  """``num_batches`` full validation batches ``[batch_size, seq_len]`` of a run (numpy)."""
  if num_batches <= 0:
    return []
  return [{k: np.asarray(b[k]) for k in BATCH_KEYS} for b in validation_batches(
      config.data, tokenizer=tokenizer, seq_len=config.seq_len, batch_size=batch_size,
      num_batches=num_batches)]


def validation_metrics(setup: TrainSetup, params: Any, batches: Iterable[dict[str, np.ndarray]],
                       batch_size: int, eval_step: Any = None) -> dict[str, float]:
  """Weighted-token validation loss and perplexity over ``batches``.

  Args:
    setup, params: the model.
    batches: full (unsharded) validation batches ``[batch_size, T]``.
    batch_size: their rows.
    eval_step: a ``jit_eval_step(setup, batch_size)`` to reuse (its compilation) across calls.

  Returns:
    ``{"val_loss": ..., "val_ppl": ...}`` (empty if there are no batches).
  """
  eval_step = eval_step or jit_eval_step(setup, batch_size)
  b_sh = mesh_lib.batch_sharding(setup.mesh, batch_size)
  loss_sum, weight_sum = 0.0, 0.0
  for batch in batches:
    l, w = eval_step(params, global_from_full(batch, b_sh))
    loss_sum += float(l)
    weight_sum += float(w)
  if weight_sum == 0:
    return {}
  loss = loss_sum / weight_sum
  return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def outlier_metrics_for(setup: TrainSetup, params: Any, batch: dict[str, np.ndarray] | None,
                        outlier_metrics: OutlierMetricsFn | None,
                        trigger_ids: Sequence[int] = ()) -> dict[str, float]:
  """``outlier_metrics`` of the model on a fixed batch (empty without a batch or a function).

  ``trigger_ids`` (the tokenizer's, Bigram-Backcopy) add the first-token mass split into query
  positions whose input is a trigger and the others.

  Example:
    >>> outlier_metrics_for(setup, state.params, batch, analysis.outlier_metrics)  # doctest: +SKIP
    {'first_token_attention': 0.41, 'kurtosis': 12.3, ...}
  """
  if batch is None or outlier_metrics is None:
    return {}
  model = merge_model(setup, params)
  # Under the run's mesh the model runs its Pallas kernels per shard, as in the train step.
  with jax.set_mesh(setup.mesh):
    return {k: float(v) for k, v in outlier_metrics(
        model, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
        trigger_positions=np.isin(batch["inputs"], trigger_ids) if trigger_ids else None,
    ).items()}


def evaluation_setup(config: ml_collections.ConfigDict,
                     devices: Sequence[jax.Device] | None = None) -> tuple[Any, TrainSetup]:
  """The run's tokenizer and its model's setup for evaluation: no optimizer, every device on fsdp.

  Evaluation reads the parameters alone, so it builds none of the run's optimizer: one that can
  no longer be built, or whose state no longer matches the checkpoint's, does not stop it (an
  ``optax.identity()``, which keeps no state, stands in). No state depends on the training mesh.

  Args:
    config: the run's config (``config.json``).
    devices: the mesh's devices (default: all of this process's global devices).

  Example:
    >>> tokenizer, setup = evaluation_setup(rundir.read_config("runs/tiny"))  # doctest: +SKIP
    >>> setup.abstract_state.params                   # the restore target, with shardings
  """
  tokenizer = get_tokenizer(config.data)
  model_cfg = rundir.model_config_from(config, tokenizer.vocab_size)
  mesh = mesh_lib.make_mesh(1, -1, 1, devices=devices)
  setup = make_setup(model_cfg, optax.identity(), optax.constant_schedule(0.0), mesh,
                     int(config.seed), loss_chunk_logits=config.loss_chunk_logits or None)
  return tokenizer, setup


def evaluate(workdir: str | pathlib.Path, step: int | None = None, eval_batches: int | None = None,
             *, outlier_metrics: OutlierMetricsFn | None = None,
             report: ReportFn | None = None) -> dict[str, float]:
  """Validation loss / perplexity (and outlier metrics) of a run's checkpoint.

  Args:
    workdir: a run directory written by ``train``.
    step: checkpoint step (None = newest readable).
    eval_batches: number of validation batches (None = the run's ``eval_batches``).
    outlier_metrics: also computes these on the first validation batch (as in ``train``).
    report: called with the run's name and step and the metrics (``softmax-one eval`` prints a
      table); None shows nothing.

  Returns:
    ``{"val_loss", "val_ppl", ...outlier metrics, "step"}``.

  Example:
    >>> evaluate("runs/tiny")["val_ppl"]                            # doctest: +SKIP
  """
  workdir = rundir.workdir_path(workdir)
  config = rundir.read_config(workdir)
  validate_config(config)
  tokenizer, setup = evaluation_setup(config)
  restored = rundir.restore_params(workdir, setup.abstract_state.params, step)
  if restored is None:
    raise MissingFileError(f"No checkpoint in {workdir / rundir.CHECKPOINT_DIR}; train the run "
                           "first (`softmax-one train --workdir=...`).")
  params, restored_step = restored
  n = config.eval_batches if eval_batches is None else eval_batches
  batches = validation_batches_for(config, tokenizer, max(n, 1), config.eval_batch_size)
  metrics = validation_metrics(setup, params, batches, config.eval_batch_size)
  if outlier_metrics is not None:
    k = min(config.outlier_batch_size, config.eval_batch_size)
    trigger_ids = tuple(getattr(tokenizer, "trigger_ids", ()))
    metrics.update(outlier_metrics_for(setup, params,
                                       {k2: v[:k] for k2, v in batches[0].items()},
                                       outlier_metrics, trigger_ids))
  if report is not None:
    report(f"{config.get('name', workdir.name)} @ step {restored_step}", metrics)
  return {**metrics, "step": restored_step}


__all__ = ["OutlierMetricsFn", "ReportFn", "evaluate", "evaluation_setup", "global_from_full",
           "outlier_metrics_for", "validation_batches_for", "validation_metrics"]
