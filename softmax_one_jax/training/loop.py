"""The training loop (``train``) and checkpoint evaluation (``evaluate``).

``train`` builds everything from one ml_collections config, resumes from the newest readable
checkpoint in ``workdir`` (the same command continues a run), and writes metrics.jsonl, TensorBoard
events, periodic validation loss / perplexity and, when given an ``outlier_metrics`` function,
outlier metrics. SIGTERM (or a JAX preemption notice on multi-host) saves a checkpoint at the next
step boundary and stops.

Training does not import analysis (they are siblings above ``softmax_one_jax.rundir``): the outlier
metrics and the final results table come in as callbacks, which ``softmax-one train`` supplies.

Example:
  >>> from experiments.configs import tiny
  >>> summary = train(tiny.get_config(), "runs/tiny")
  >>> summary["val_ppl"]
  >>> from softmax_one_jax.analysis import outlier_metrics, print_metrics_table
  >>> summary = train(tiny.get_config(), "runs/tiny", outlier_metrics=outlier_metrics,
  ...                 report=print_metrics_table)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from softmax_one_jax import rundir
from softmax_one_jax.data import BATCH_KEYS, get_tokenizer, validation_batches
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.rundir import model_config_from, padded_vocab_size
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.data_iter import ShardedIterator
from softmax_one_jax.training.state import (TrainSetup, init_train_state, merge_model,
                                            setup_for_run)
from softmax_one_jax.training.step import jit_eval_step, jit_train_step
from softmax_one_jax.training.step_log import NonFiniteError, StepLog
from softmax_one_jax.training.workdir_lock import hold_workdir

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped early and can be resumed

# ``fn(model, tokens_bt, *, segment_ids, positions, trigger_positions) -> {name: scalar}``: the
# outlier metrics of one batch ``[B, T]`` (``softmax_one_jax.analysis.outlier_metrics`` fits).
OutlierMetricsFn = Callable[..., Mapping[str, Any]]
# ``fn(name, metrics)``: shows a run's final metrics (``analysis.print_metrics_table`` fits).
ReportFn = Callable[[str, dict[str, float]], Any]


def _notice(msg: str) -> None:
  """A lifecycle message (resume, preemption) on stderr of process 0 and in the log."""
  log.info(msg)
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


class _StopRequest:
  """Set by SIGTERM (single process); the loop saves and stops at the next step boundary.

  Multi-process runs leave SIGTERM to JAX's preemption service (installed by
  ``jax.distributed.initialize``), which makes every process agree on the step to save at
  (``CheckpointManager.reached_preemption``); a local flag could make processes disagree.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _global_from_full(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A batch every process holds in full -> global arrays (multi-host safe)."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def _resolve(config: ml_collections.ConfigDict, tokenizer_vocab_size: int) -> ml_collections.ConfigDict:
  """A copy of the config with the model's vocabulary resolved (what config.json records)."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model.vocab_size = padded_vocab_size(config, tokenizer_vocab_size)
  return resolved


def _check_same_run(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose model or optimizer kind differ from the saved config.json."""
  if not (workdir / rundir.CONFIG_FILE).exists():
    return
  old = rundir.read_config(workdir)
  def shard_local(c: ml_collections.ConfigDict) -> bool:
    return c.optimizer.name == "orthoadam" and c.optimizer.shard_local
  def identity(c: ml_collections.ConfigDict, with_mesh: bool) -> dict[str, Any]:
    out = {**c.model.to_dict(), "optimizer.name": c.optimizer.name,
           "optimizer.rotation": c.optimizer.rotation}
    if with_mesh:   # shard-local rotations follow the mesh: another mesh, another state
      out.update({f"mesh.{a}": c.mesh.get(a) for a in mesh_lib.MESH_AXES})
    return out
  with_mesh = shard_local(old) and shard_local(config)
  a, b = identity(old, with_mesh), identity(config, with_mesh)
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if diff:
    raise ConfigError(
        f"{workdir} holds a run with a different model or optimizer "
        f"({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in diff)}); use a new "
        "--workdir, or the original config to resume.")


def _validation_batches(config: ml_collections.ConfigDict, tokenizer: Any, num_batches: int,
                        batch_size: int) -> list[dict[str, np.ndarray]]:
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
    l, w = eval_step(params, _global_from_full(batch, b_sh))
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


def build_run(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
           rotation_mesh: Any = None):
  """Tokenizer, resolved config, model config, mesh and setup of a run.

  Args:
    config: the run config.
    devices: the mesh's devices (default: all of this process's global devices); a compile-only
      topology's devices build the same setup for a slice this host does not have.
    rotation_mesh: the mesh OrthoAdam's shard-local rotations follow (default: the run's own).
  """
  tokenizer = get_tokenizer(config.data)
  config = _resolve(config, tokenizer.vocab_size)
  model_cfg = model_config_from(config, tokenizer.vocab_size)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=devices)
  for axis in mesh_lib.MESH_AXES:   # config.json records the mesh the run really used
    config.mesh[axis] = int(mesh.shape[axis])
  setup = setup_for_run(model_cfg, config.optimizer, config.num_train_steps, mesh, config.seed,
                        rotation_mesh=rotation_mesh)
  return tokenizer, config, model_cfg, setup


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          outlier_metrics: OutlierMetricsFn | None = None,
          report: ReportFn | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run described by ``config`` in ``workdir``.

  Args:
    config: a run config (experiments/configs/*.py); validated before anything is compiled.
    workdir: run directory; an existing run there is resumed from its newest readable checkpoint.
    outlier_metrics: computes the outlier metrics every ``config.outlier_every_steps`` steps and
      at the end (``softmax_one_jax.analysis.outlier_metrics``, which ``softmax-one train``
      passes); None trains without them.
    report: called once with the run's name and final metrics (``softmax-one train`` prints a
      table); None shows nothing.

  Returns:
    A summary dict: "step", "status" ("done" | "preempted"), final "loss", and the final
    validation / outlier metrics.

  Raises:
    ConfigError: an invalid config, or a workdir holding a different run.
    WorkdirBusyError: another live ``train`` holds the workdir.
    NonFiniteError: ``config.max_nonfinite_steps`` consecutive non-finite steps.
  """
  validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
  workdir = pathlib.Path(workdir)
  # Process 0 holds the workdir for the whole multi-process run; the others share it.
  with hold_workdir(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_holding_workdir(config, workdir, outlier_metrics, report)


def _train_holding_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                           outlier_metrics: OutlierMetricsFn | None,
                           report: ReportFn | None) -> dict[str, Any]:
  """``train`` once the workdir is this run's."""
  run = _open_run(config, workdir, outlier_metrics)
  steps = StepLog(run.config, run.start, workdir)
  try:
    with _StopRequest() as stop:
      state, status, summary, saved_step = _run_steps(run, steps, stop)
    final_step = int(jax.device_get(state.step))
    if final_step != saved_step:
      ckpt_lib.save(run.manager, final_step, state, run.train_iter)
    run.manager.wait_until_finished()
  finally:
    steps.bar.close()
    run.manager.close()
    steps.writer.close()

  if status == "done" and not summary:          # resumed a finished run: evaluate it again
    summary = _final_metrics(run, state.params)
  if status == "done" and summary and report is not None:
    report(run.config.get("name", workdir.name), summary)
  return {"step": final_step, "status": status, "loss": steps.last_loss, **summary}


@dataclasses.dataclass
class _Run:
  """What ``train`` builds before its first step.

  Attributes:
    config: the resolved config (as config.json records it).
    setup: model, optimizer, mesh and shardings.
    train_iter: the training batches (restored with the checkpoint).
    manager: the checkpoint manager on ``workdir/checkpoints``.
    state, start: the train state and its step (restored, or fresh at 0).
    val_batches: full validation batches ``[eval_batch_size, T]``.
    eval_step: the jitted validation step, compiled once for every evaluation.
    outlier_fn: the outlier metrics, or None when the run computes none.
    outlier_batch: the first rows of the first validation batch (None without one).
    trigger_ids: the tokenizer's trigger tokens (Bigram-Backcopy), else ().
  """

  config: ml_collections.ConfigDict
  setup: TrainSetup
  train_iter: ShardedIterator
  manager: Any
  state: Any
  start: int
  val_batches: list[dict[str, np.ndarray]]
  eval_step: Any
  outlier_fn: OutlierMetricsFn | None
  outlier_batch: dict[str, np.ndarray] | None
  trigger_ids: tuple[int, ...]


def _open_run(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              outlier_metrics: OutlierMetricsFn | None) -> _Run:
  """Builds the run, records its config, and restores its newest checkpoint (or starts it)."""
  tokenizer, config, model_cfg, setup = build_run(config)
  _check_same_run(workdir, config)
  rundir.write_config(workdir, config)
  train_iter = ShardedIterator(config, tokenizer, jax.process_index(), jax.process_count())
  manager = rundir.make_manager(workdir, config.checkpoint.max_to_keep,
                                config.checkpoint.async_save)
  state, start = _restore_or_init(manager, setup, model_cfg, config, train_iter, workdir)
  val_batches = _validation_batches(config, tokenizer, config.eval_batches, config.eval_batch_size)
  outlier_fn = outlier_metrics if config.outlier_every_steps else None
  if config.outlier_every_steps and outlier_metrics is None:
    log.info("config.outlier_every_steps=%d, but train() was given no outlier_metrics function: "
             "training without outlier metrics.", config.outlier_every_steps)
  outlier_batch = None
  if outlier_fn is not None and val_batches:
    n = min(config.outlier_batch_size, config.eval_batch_size)
    outlier_batch = {k: v[:n] for k, v in val_batches[0].items()}
  return _Run(config=config, setup=setup, train_iter=train_iter, manager=manager, state=state,
              start=start, val_batches=val_batches,
              eval_step=jit_eval_step(setup, config.eval_batch_size), outlier_fn=outlier_fn,
              outlier_batch=outlier_batch,
              trigger_ids=tuple(getattr(tokenizer, "trigger_ids", ())))


def _restore_or_init(manager: Any, setup: TrainSetup, model_cfg: Any,
                     config: ml_collections.ConfigDict, train_iter: ShardedIterator,
                     workdir: pathlib.Path) -> tuple[Any, int]:
  """``(state, step)`` of the newest readable checkpoint (iterator restored too), else step 0."""
  # Unreadable steps are moved aside: this run saves those steps again.
  restored = ckpt_lib.restore_latest(manager, setup.abstract_state, train_iter,
                                     move_aside_unreadable=True)
  if restored is None:
    return init_train_state(setup, model_cfg, config.seed), 0
  _notice(f"Resumed {workdir} from step {restored[1]}.")
  return restored


def _final_metrics(run: _Run, params: Any) -> dict[str, float]:
  """Validation loss / perplexity and, when on, the outlier metrics: the run's summary."""
  out = validation_metrics(run.setup, params, run.val_batches, run.config.eval_batch_size,
                           run.eval_step)
  if run.outlier_fn is not None:
    out.update(outlier_metrics_for(run.setup, params, run.outlier_batch, run.outlier_fn,
                                   run.trigger_ids))
  return out


def _periodic_metrics(run: _Run, done: int, params: Any) -> dict[str, float] | None:
  """The validation and outlier metrics due after step ``done`` (None when none is due).

  An evaluation that is due but has no batches gives ``{}``: the step is still logged.
  """
  c = run.config
  out = None
  if c.eval_every_steps and done % c.eval_every_steps == 0:
    out = validation_metrics(run.setup, params, run.val_batches, c.eval_batch_size, run.eval_step)
  if run.outlier_fn is not None and done % c.outlier_every_steps == 0:
    out = {**(out or {}), **outlier_metrics_for(run.setup, params, run.outlier_batch,
                                                 run.outlier_fn, run.trigger_ids)}
  return out


def _run_steps(run: _Run, steps: StepLog, stop: _StopRequest
               ) -> tuple[Any, str, dict[str, float], int]:
  """Steps from ``run.start`` to the end or a stop request.

  Returns:
    ``(state, status, summary, saved_step)``: status "done" | "preempted"; the summary (final
    metrics) is empty unless this call ran the last step; the last step saved.
  """
  c, n = run.config, run.config.num_train_steps
  step_fn = jit_train_step(run.setup, c.grad_accum_steps, c.global_batch_size)
  b_sh = mesh_lib.batch_sharding(run.setup.mesh, c.global_batch_size)
  state, status, summary, saved_step = run.state, "done", {}, run.start
  for step in range(run.start, n):
    state, metrics = step_fn(state, mesh_lib.global_batch(next(run.train_iter), b_sh))
    done = step + 1
    steps.push(done, metrics)
    t_pause = time.perf_counter()
    extra = _periodic_metrics(run, done, state.params) if done < n else None
    if done == n:
      summary = extra = _final_metrics(run, state.params)
    if extra is not None:
      steps.add(done, extra)
    preempted = stop.requested or (jax.process_count() > 1 and
                                   run.manager.reached_preemption(done))
    if _maybe_save(run, done, state, preempted):
      saved_step = done
    if extra is not None or saved_step == done:
      steps.clock.pause(time.perf_counter() - t_pause)
    if preempted:
      _notice(f"Stop requested (SIGTERM/preemption): saved step {done} in "
              f"{run.manager.directory}; rerun the same command to resume.")
      status = "preempted"
      break
  steps.flush()
  return state, status, summary, saved_step


def _maybe_save(run: _Run, done: int, state: Any, preempted: bool) -> bool:
  """Saves step ``done`` at the end, on a stop request and every ``checkpoint.every_steps``."""
  every = run.config.checkpoint.every_steps
  if done == run.config.num_train_steps or preempted or (every and done % every == 0):
    ckpt_lib.save(run.manager, done, state, run.train_iter)
    return True
  return False


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
  workdir = pathlib.Path(workdir)
  config = rundir.read_config(workdir)
  validate_config(config)
  # Evaluation runs on whatever devices are here, all of them on fsdp; OrthoAdam's state keeps
  # the shapes of the training mesh, which config.json records.
  training_mesh = mesh_lib.recorded_mesh(config)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  tokenizer, config, _, setup = build_run(config, rotation_mesh=training_mesh)
  manager = rundir.make_manager(workdir, read_only=True, async_save=False)
  try:
    restored = ckpt_lib.restore_latest(manager, setup.abstract_state, None, step)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f"No checkpoint in {workdir / rundir.CHECKPOINT_DIR}.")
  state, restored_step = restored
  n = config.eval_batches if eval_batches is None else eval_batches
  batches = _validation_batches(config, tokenizer, max(n, 1), config.eval_batch_size)
  metrics = validation_metrics(setup, state.params, batches, config.eval_batch_size)
  if outlier_metrics is not None:
    k = min(config.outlier_batch_size, config.eval_batch_size)
    trigger_ids = tuple(getattr(tokenizer, "trigger_ids", ()))
    metrics.update(outlier_metrics_for(setup, state.params,
                                       {k2: v[:k] for k2, v in batches[0].items()},
                                       outlier_metrics, trigger_ids))
  if report is not None:
    report(f"{config.get('name', workdir.name)} @ step {restored_step}", metrics)
  return {**metrics, "step": restored_step}


__all__ = ["NonFiniteError", "OutlierMetricsFn", "PREEMPTED_EXIT_CODE", "ReportFn", "build_run",
           "evaluate", "outlier_metrics_for", "train", "validation_metrics"]
