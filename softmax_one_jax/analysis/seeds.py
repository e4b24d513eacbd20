"""Runs that differ only in their seed, grouped, and their metrics as mean +- std over seeds.

``softmax-one compare`` reports one row per group of runs whose configs are equal once the seed
fields and bookkeeping fields are set aside:

* seed fields (``SEED_FIELDS``): ``seed`` (initialisation and data order) and ``optimizer.seed``
  (OrthoAdam's rotations);
* bookkeeping (``BOOKKEEPING_FIELDS``): the run's name, progress bar, logging and checkpoint
  cadence, which change no number a run computes.

Every other field (model, optimizer, data, steps, evaluation) must match for two runs to share a
row. A run whose analysis carries no config (a Hugging Face checkpoint, an older analysis) is a
group of its own.

Example:
  >>> a = {"seed": 0, "optimizer.seed": 0, "model.softmax": "softmax1"}
  >>> b = dict(a, seed=1, **{"optimizer.seed": 1})
  >>> group_key(a) == group_key(b)
  True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

SEED_FIELDS = ("seed", "optimizer.seed")
BOOKKEEPING_FIELDS = ("name", "progress_bar", "log_every_steps", "max_nonfinite_steps",
                      "checkpoint.every_steps", "checkpoint.max_to_keep", "checkpoint.async_save")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested config as ``{"a.b": value}`` with JSON-able leaves.

  Example:
    >>> flatten_config({"optimizer": {"name": "adamw", "b1": 0.9}, "seed": 0})
    {'optimizer.name': 'adamw', 'optimizer.b1': 0.9, 'seed': 0}
  """
  flat: dict[str, Any] = {}
  for key, value in config.items():
    dotted = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, prefix=f"{dotted}."))
    else:
      flat[dotted] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
  return flat


def group_key(flat_config: Mapping[str, Any] | None) -> str | None:
  """The part of a run's flat config that must match within a group (None: no config)."""
  if flat_config is None:
    return None
  ignored = SEED_FIELDS + BOOKKEEPING_FIELDS
  kept = {k: v for k, v in flat_config.items() if k not in ignored}
  return json.dumps(kept, sort_keys=True, default=str)


def seed_of(flat_config: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
  """The run's seed fields, in ``SEED_FIELDS`` order."""
  return None if flat_config is None else tuple(flat_config.get(k) for k in SEED_FIELDS)


@dataclasses.dataclass
class SeedGroup:
  """Runs of one configuration.

  Attributes:
    label: the row label (the runs' shared name, plus the fields that tell it apart from other
      groups of that name).
    runs: the analysis entries (``metrics``, ``meta``, ``name``, ...), one per run.
    sources: run directories, one per run.
  """

  label: str
  runs: list[dict[str, Any]]
  sources: list[str]

  @property
  def n(self) -> int:
    return len(self.runs)

  @property
  def seeds(self) -> list[Any]:
    return [seed_of(r["meta"].get("config")) for r in self.runs]

  def metric_values(self) -> dict[str, list[float]]:
    """Each metric's finite values over the runs (runs missing a metric are left out)."""
    values: dict[str, list[float]] = {}
    for run in self.runs:
      for key, value in run["metrics"].items():
        if isinstance(value, (int, float)) and math.isfinite(value):
          values.setdefault(key, []).append(float(value))
    return values


def _distinguishing_fields(configs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Fields (seed and bookkeeping aside) whose value is not the same in every config."""
  ignored = set(SEED_FIELDS + BOOKKEEPING_FIELDS)
  keys = sorted({k for c in configs for k in c} - ignored)
  return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def group_by_seed(entries: Sequence[dict[str, Any]], sources: Sequence[str]) -> list[SeedGroup]:
  """Groups analysis entries of one name whose configs differ only in seed (first-seen order).

  Args:
    entries: analyses as ``cli.load_analysis`` returns them (``meta["config"]`` is the run's
      flat config when the analysis came from a training run).
    sources: the run directory of each entry.

  Returns:
    Groups; labels are unique: groups sharing a name are told apart by the config fields in
    which they differ (e.g. ``softmax1 + orthoadam (model.norm=scalar_layernorm)``).
  """
  by_key: dict[Any, SeedGroup] = {}
  for i, (entry, source) in enumerate(zip(entries, sources)):
    config_key = group_key(entry["meta"].get("config"))
    # Runs are grouped under one name only: rows a user named apart stay apart.
    key = ("run", i) if config_key is None else (entry["name"], config_key)
    group = by_key.setdefault(key, SeedGroup(label=entry["name"], runs=[], sources=[]))
    group.runs.append(entry)
    group.sources.append(str(source))
  groups = list(by_key.values())
  by_label: dict[str, list[SeedGroup]] = {}
  for g in groups:
    by_label.setdefault(g.label, []).append(g)
  for same in by_label.values():
    if len(same) < 2:
      continue
    configs = [g.runs[0]["meta"].get("config") or {} for g in same]
    fields = _distinguishing_fields(configs)
    for g, c in zip(same, configs):
      detail = ", ".join(f"{k}={c.get(k)}" for k in fields) or g.sources[0]
      g.label = f"{g.label} ({detail})"
  return groups
