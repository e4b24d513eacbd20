"""Run metrics: ``workdir/metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

Only process 0 writes. On resume, records after the restored step are dropped from
``metrics.jsonl`` so the file reads like one uninterrupted run.

Example:
  >>> w = MetricsWriter("runs/tiny", resume_step=0)
  >>> w.write(10, {"loss": 3.2, "learning_rate": 1e-3})
  >>> w.close()
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)          # JSON has no NaN/inf; keep the file standard
  return value


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl`` in file order."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """Appends step records to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / METRICS_FILE
    self._tb = None
    if not self._active:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= resume_step]
    self._path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / TENSORBOARD_DIR))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Writes one record ``{"step": step, **metrics}``."""
    if not self._active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
