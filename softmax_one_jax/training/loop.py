"""The training loop (``train``); evaluation is ``training.evaluation``.

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
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from softmax_one_jax import rundir
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.training import checkpoint as ckpt_lib
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.data_iter import ShardedIterator
from softmax_one_jax.training.evaluation import (OutlierMetricsFn, ReportFn, outlier_metrics_for,
                                                 validation_batches_for, validation_metrics)
from softmax_one_jax.training.state import TrainSetup, build_run, init_train_state
from softmax_one_jax.training.step import jit_eval_step, jit_train_step
from softmax_one_jax.training.step_log import NonFiniteError, StepLog
from softmax_one_jax.training.workdir_lock import hold_workdir

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: the run stopped early and can be resumed

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


def _check_same_run(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose model or optimizer kind differ from the saved config.json."""
  if not (workdir / rundir.CONFIG_FILE).exists():
    return
  old = rundir.read_config(workdir)
  def identity(c: ml_collections.ConfigDict) -> dict[str, Any]:
    # No mesh here: the state (OrthoAdam's included) is the same on every mesh. No remat policy
    # either: it changes what the backward pass keeps, not the state.
    model = {k: v for k, v in c.model.to_dict().items() if k != "remat"}
    return {**model, "optimizer.name": c.optimizer.name,
            "optimizer.rotation": c.optimizer.rotation, "optimizer.seed": c.optimizer.seed}
  a, b = identity(old), identity(config)
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if diff:
    raise ConfigError(
        f"{workdir} holds a run with a different model or optimizer "
        f"({', '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in diff)}); use a new "
        "--workdir, or the original config to resume.")


def train(config: ml_collections.ConfigDict, workdir: rundir.PathLike, *,
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
  validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count(),
                  num_slices=mesh_lib.num_slices(jax.devices()))
  workdir = rundir.workdir_path(workdir)
  # Process 0 holds the workdir for the whole multi-process run; the others share it.
  with hold_workdir(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train_holding_workdir(config, workdir, outlier_metrics, report)


def _train_holding_workdir(config: ml_collections.ConfigDict, workdir: epath.Path,
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


def _open_run(config: ml_collections.ConfigDict, workdir: epath.Path,
              outlier_metrics: OutlierMetricsFn | None) -> _Run:
  """Builds the run, records its config, and restores its newest checkpoint (or starts it)."""
  tokenizer, config, model_cfg, setup = build_run(config)
  _check_same_run(workdir, config)
  rundir.write_config(workdir, config)
  train_iter = ShardedIterator(config, tokenizer, jax.process_index(), jax.process_count())
  manager = rundir.make_manager(workdir, config.checkpoint.max_to_keep,
                                config.checkpoint.async_save)
  state, start = _restore_or_init(manager, setup, model_cfg, config, train_iter, workdir)
  val_batches = validation_batches_for(config, tokenizer, config.eval_batches,
                                       config.eval_batch_size)
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
                     workdir: epath.Path) -> tuple[Any, int]:
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
      # The records up to a checkpoint are written with it (an object store's metrics.jsonl is
      # uploaded here): a resume from it logs only the steps after it.
      steps.flush()
      steps.writer.flush()
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


__all__ = ["NonFiniteError", "PREEMPTED_EXIT_CODE", "train"]
