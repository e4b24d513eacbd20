"""Runs side by side: read each run's analysis, group seeds, write one table and the figures.

Runs whose configs differ only in seed (``seeds.group_by_seed``) share one row: each metric as
mean ± sample std over the seeds, with ``n``. Rows follow the paper's grid: softmax, softmax-1,
learned sinks, each with AdamW before OrthoAdam. ``softmax-one compare``
(``analysis.cli.compare_main``) analyses missing runs first, then calls ``write_comparison``.

Example:
  >>> entries = [load_analysis(r) for r in ("runs/a", "runs/b")]     # doctest: +SKIP
  >>> write_comparison(seeds.group_by_seed(entries, ["runs/a", "runs/b"]), "cmp")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from softmax_one_jax.analysis import outliers, report, seeds
from softmax_one_jax.errors import MissingFileError
from softmax_one_jax.rundir import PathLike, workdir_path


def load_analysis(run: PathLike) -> dict[str, Any]:
  """Reads ``RUN/analysis/metrics.json`` (or ``RUN/metrics.json`` if RUN is an analysis folder).

  Raises:
    MissingFileError: neither holds an analysis.

  Example:
    >>> load_analysis("runs/tiny")["metrics"]["perplexity"]          # doctest: +SKIP
  """
  run = workdir_path(run)
  for p in (run / "analysis" / "metrics.json", run / "metrics.json"):
    if p.is_file():
      d = json.loads(p.read_text())
      if "report" in d:
        return d
  raise MissingFileError(
      f"{run} has no analysis/metrics.json; run `softmax-one analyze --workdir={run}`.")


def _grid_order(groups: list[seeds.SeedGroup]) -> list[seeds.SeedGroup]:
  """softmax, softmax-1, learned sinks (rows), AdamW before OrthoAdam (columns), others after."""
  def key(g):
    meta = g.runs[0]["meta"]
    soft = {"softmax": 0, "softmax1": 1, "learned_sink": 2}.get(meta.get("softmax"), 3)
    opt = str(meta.get("optimizer") or "").lower()
    return (soft, 0 if "adamw" in opt else 1 if "ortho" in opt else 2, g.label)
  return sorted(groups, key=key)


def _group_summary(g: seeds.SeedGroup) -> dict[str, Any]:
  values = g.metric_values()
  return {"n": g.n, "runs": g.sources, "seeds": g.seeds,
          "mean": {k: float(np.mean(v)) for k, v in values.items()},
          "std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
          "values": values}


def _per_layer_means(reps: dict[str, list[outliers.OutlierReport]], metric: str
                     ) -> dict[str, np.ndarray]:
  """Row label -> the per-layer ``metric`` averaged over the row's runs (seeds)."""
  return {n: np.mean([np.asarray(r.per_layer[metric]) for r in rs], axis=0)
          for n, rs in reps.items()}


def _write_figures(reps: dict[str, list[outliers.OutlierReport]], out_dir: epath.Path,
                   seeded: bool) -> dict[str, epath.Path]:
  """The per-layer figures (means over seeds) and the per-channel one (each row's first run)."""
  of_seeds = " (mean over seeds)" if seeded else ""
  paths = {}
  paths["first_token"] = report.plot_per_layer(
      _per_layer_means(reps, "first_token_attention"), out_dir / "first_token_per_layer.png",
      ylabel="% of queries", percent=True,
      title=f"argmax attention on the first token{of_seeds}")
  paths["kurtosis"] = report.plot_per_layer(
      _per_layer_means(reps, "kurtosis_rest"), out_dir / "kurtosis_per_layer.png",
      ylabel="kurtosis (non-first tokens)", logy=True, title=f"hidden-state kurtosis{of_seeds}")
  paths["max_abs"] = report.plot_per_layer(
      _per_layer_means(reps, "max_abs_rest"), out_dir / "max_abs_per_layer.png",
      ylabel="max |activation| (non-first tokens)", logy=True,
      title=f"max |activation|{of_seeds}")
  # Channels do not correspond across seeds: the figure shows each row's first run.
  paths["channels"] = report.plot_channel_max_abs(
      {n + (" (first seed)" if seeded else ""):
       np.maximum(rs[0].per_channel["max_abs_first"], rs[0].per_channel["max_abs_rest"])
       for n, rs in reps.items()}, out_dir / "max_abs_channels.png", ncols=2)
  return paths


def write_comparison(groups: list[seeds.SeedGroup], out: PathLike) -> dict[str, Any]:
  """Writes ``table.md``, ``metrics.json`` and the figures of runs grouped by seed into ``out``.

  Args:
    groups: the runs' analyses (``load_analysis``) grouped by ``seeds.group_by_seed``.
    out: output directory (created).

  Returns:
    ``{"metrics": {row: metrics (a list per metric for groups of seeds)}, "groups": {row:
    {"n", "runs", "seeds", "mean", "std", "values"}}, "paths": written files}``, rows in grid
    order.

  Example:
    >>> write_comparison(groups, "runs/compare")["paths"]["table"]    # doctest: +SKIP
  """
  groups = _grid_order(groups)
  out_dir = workdir_path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  table = {g.label: (g.runs[0]["metrics"] if g.n == 1 else g.metric_values()) for g in groups}
  reps = {g.label: [outliers.OutlierReport.from_json(r["report"]) for r in g.runs]
          for g in groups}
  paths = {"table": out_dir / "table.md"}
  configs = {g.label: g.runs[0].get("meta", {}).get("config") for g in groups}
  trained = {label: report.training_note(c) for label, c in configs.items() if c}
  paths["table"].write_text(report.format_analysis_markdown(table, trained=trained))
  paths.update(_write_figures(reps, out_dir, seeded=any(g.n > 1 for g in groups)))
  summary = {g.label: _group_summary(g) for g in groups}
  (out_dir / "metrics.json").write_text(json.dumps(
      {"groups": summary, "runs": {src: r["metrics"] for g in groups
                                   for src, r in zip(g.sources, g.runs)}},
      indent=1, default=float))
  return {"metrics": table, "groups": summary, "paths": paths}
