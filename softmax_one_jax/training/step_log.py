"""The host side of training steps: progress bar, metrics records, tokens/s, the non-finite stop.

``StepLog`` runs one step behind the device, so reading a step's metrics never waits for the step
being computed; ``StepClock`` measures tokens per second without eval and checkpoint pauses.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from tqdm import tqdm

from softmax_one_jax.training.metrics import MetricsWriter


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class StepClock:
  """Tokens per second over each logging interval, eval and checkpoint pauses left out.

  Example:
    >>> clock = StepClock(tokens_per_step=2048)
    >>> clock.restart(0.0); clock.pause(1.0)
    >>> clock.tick(3.0)                 # one step in 3 s, 1 s of it a pause
    1024.0
  """

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.restart(0.0)

  def restart(self, now: float) -> None:
    self.t0, self.steps, self.paused = now, 0, 0.0

  def pause(self, seconds: float) -> None:
    self.paused += seconds

  def tick(self, now: float) -> float:
    """Counts one more step; the tokens/s since the last ``restart``."""
    self.steps += 1
    return self.tokens_per_step * self.steps / max(now - self.t0 - self.paused, 1e-9)


class StepLog:
  """The host side of finished steps, one step behind the device so that it never waits on it.

  ``push(done, metrics)`` hands over step ``done``'s device metrics and logs the step before it:
  progress bar, a metrics.jsonl record (every ``log_every_steps``, at the end, and at every step
  with extra metrics from ``add``), and the stop after ``max_nonfinite_steps`` non-finite steps.
  """

  def __init__(self, config: ml_collections.ConfigDict, start: int, workdir: pathlib.Path):
    self.config, self.start = config, start
    self.writer = MetricsWriter(workdir, resume_step=start)
    self.bar = tqdm(total=config.num_train_steps, initial=start, unit="step", dynamic_ncols=True,
                    disable=not (jax.process_index() == 0 and config.progress_bar))
    self.clock = StepClock(config.global_batch_size * config.seq_len)
    self.extras: dict[int, dict[str, float]] = {}
    self.last_loss = float("nan")
    self._pending: tuple[int, Any] | None = None

  def add(self, done: int, metrics: Mapping[str, float]) -> None:
    """Extra metrics (validation, outliers) for step ``done``'s record."""
    self.extras.setdefault(done, {}).update(metrics)

  def push(self, done: int, metrics: Any) -> None:
    if self._pending is not None:
      self._log(*self._pending)
    self._pending = (done, metrics)

  def flush(self) -> None:
    if self._pending is not None:
      self._log(*self._pending)
      self._pending = None

  def _log(self, done: int, metrics: Any) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if done == self.start + 1:                  # the first step includes compilation
      self.clock.restart(now)
      tok_s = float("nan")
    else:
      tok_s = self.clock.tick(now)
    self.last_loss = m["loss"]
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
    if (done % self.config.log_every_steps == 0 or done == self.config.num_train_steps
        or done in self.extras):
      self.writer.write(done, {"loss": m["loss"], "grad_norm": m["grad_norm"],
                               "learning_rate": m["learning_rate"], "tokens_per_sec": tok_s,
                               "nonfinite_total": int(m["nonfinite_total"]),
                               **self.extras.pop(done, {})})
      if self.clock.steps:
        self.clock.restart(now)                 # tokens/s over each logging interval
    if m["nonfinite_streak"] >= self.config.max_nonfinite_steps:
      raise NonFiniteError(
          f"Stopping at step {done}: {int(m['nonfinite_streak'])} consecutive steps had a "
          f"non-finite loss or gradient ({int(m['nonfinite_total'])} skipped in all); the "
          "parameters are those of the last finite step. Lower config.optimizer.learning_rate, "
          "set config.optimizer.grad_clip_norm, or check the data, then rerun the same command "
          "(it resumes from the last checkpoint).")
