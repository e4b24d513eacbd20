"""Markdown tables (the paper's Table 2 and Table 3 form) and PNG figures of the outlier analysis.

Metrics are flat ``dict[str, float]``: the scalars of ``outliers.finalize`` (``perplexity``,
``first_token_attention``, ``kurtosis_first``, ...) plus, per quantisation scheme ``S``,
``ppl_S`` and ``penalty_S`` (``PPL(quantised) - PPL(full precision)``).

Figures use matplotlib's object API on an Agg canvas (no pyplot, no global backend change), so
they render headless.

Example:
  >>> table = format_metrics_table({"tiny": {"perplexity": 12.3, "first_token_attention": 0.5}})
  >>> table.splitlines()[0][:18]
  '| Model | n | PPL '
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from softmax_one_jax.analysis import quantize
from softmax_one_jax.rundir import PathLike, workdir_path

# The headline int8 / int4 schemes of Table 2 (Table 3 lists every scheme that was run).
# Labels read weights/activations; activation "seq" is one scale per sequence.
HEADLINE_INT8 = "w8a8_tensor"
HEADLINE_INT4 = "w4_channel"

SCHEME_LABELS = {
    "w8_tensor": "W8 tensor",
    "w8_channel": "W8 channel",
    "w8a8_tensor": "W8A8 tensor/seq",
    "w8a8_token": "W8A8 channel/token",
    "w8a8_tensor_token": "W8A8 tensor/token",
    "w8a8_channel_tensor": "W8A8 channel/seq",
    "w4_channel": "W4 channel",
    "w4_g128": "W4 g128",
}


def _scheme_label(name: str) -> str:
  base, plus, rest = name.partition("+")
  return SCHEME_LABELS.get(base, base) + (f" +{rest}" if plus else "")


Value = float | Sequence[float] | None  # one run's value, or one value per seed of a group


def _fmt(value: Value, kind: str = "num") -> str:
  """One table cell: a number, or ``mean ± std`` (sample std) of a group's per-seed values."""
  if isinstance(value, Sequence):
    values = [v for v in value if v is not None and not math.isnan(v)]
    if len(values) < 2:
      return _fmt(values[0] if values else None, kind)
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    spread = f"{100.0 * std:.2f}" if kind == "pct" else _fmt(std)
    return f"{_fmt(mean, kind)} ± {spread}"
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  if kind == "pct":
    return f"{100.0 * value:.1f}"
  if kind == "signed":
    return f"{value:+.2f}" if abs(value) < 1e4 else f"{value:+.3g}"
  if abs(value) >= 1e5:
    return f"{value:.3g}"
  return f"{value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  rule = "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"
  lines = ["| " + " | ".join(header) + " |", rule]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _count(m: Mapping[str, Value]) -> int:
  """Runs behind a row: the longest per-seed list among its values (1 for a single run)."""
  return max([len(v) for v in m.values() if isinstance(v, Sequence)] or [1])


def format_metrics_table(runs: Mapping[str, Mapping[str, Value]]) -> str:
  """Table 2 form: perplexity, first-token attention, kurtosis, max |activation|, int8/int4.

  Args:
    runs: row name -> flat metrics of one run, or of a group of seeds (each value then a list,
      one per seed, printed as mean ± std). Missing entries print as "–".

  Returns:
    A Markdown table, one row per run or group, ``n`` runs each. "1st-token %" is the share of
    (layer, head, query) whose argmax key is the first token (query 0 excluded), "chance %" its
    value for a random choice among the visible keys (``layout.first_token_chance``); "int8" and
    "int4" are ``HEADLINE_INT8`` / ``HEADLINE_INT4`` perplexities with their penalty in brackets.

  Example:
    >>> format_metrics_table({"a": {"perplexity": [3.0, 3.2]}}).splitlines()[2][:23]
    '| a | 2 | 3.10 ± 0.14 |'
  """
  header = ["Model", "n", "PPL", "1st-token %", "1st-token prob %", "chance %",
            "Kurt. first", "Kurt. rest",
            "Max \\|act\\| first", "Max \\|act\\| rest",
            f"int8 PPL ({SCHEME_LABELS[HEADLINE_INT8]})",
            f"int4 PPL ({SCHEME_LABELS[HEADLINE_INT4]})"]
  rows = []
  for name, m in runs.items():
    quant = [_ppl_cell(m, scheme) for scheme in (HEADLINE_INT8, HEADLINE_INT4)]
    rows.append([
        name, str(_count(m)), _fmt(m.get("perplexity")),
        _fmt(m.get("first_token_attention"), "pct"), _fmt(m.get("first_token_prob"), "pct"),
        _fmt(m.get("first_token_chance"), "pct"), _fmt(m.get("kurtosis_first")),
        _fmt(m.get("kurtosis_rest")), _fmt(m.get("max_abs_first")), _fmt(m.get("max_abs_rest")),
        *quant,
    ])
  return _table(header, rows)


def print_metrics_table(name: str, metrics: Mapping[str, float]) -> str:
  """Prints (process 0) and returns the ``format_metrics_table`` row of one run's final metrics.

  The training loop's ``val_ppl`` stands in for ``perplexity`` when the metrics have none; this is
  the ``report`` callback ``softmax-one train`` and ``eval`` give the loop.

  Example:
    >>> print_metrics_table("tiny", {"val_ppl": 12.3}).splitlines()[2][:22]   # doctest: +SKIP
    '| tiny | 1 | 12.30 |'
  """
  if "val_ppl" in metrics and "perplexity" not in metrics:
    metrics = {**metrics, "perplexity": metrics["val_ppl"]}
  table = format_metrics_table({name: metrics})
  if jax.process_index() == 0:
    print(table, flush=True)
  return table


def _ppl_cell(m: Mapping[str, float], scheme: str) -> str:
  ppl = m.get(f"ppl_{scheme}")
  return "–" if ppl is None else f"{_fmt(ppl)} ({_fmt(m.get(f'penalty_{scheme}'), 'signed')})"


def format_quant_table(
    runs: Mapping[str, Mapping[str, Value]],
    schemes: Sequence[str] | None = None,
    *,
    notes: bool = True,
) -> str:
  """Table 3 form: full-precision perplexity and, per scheme, quantised perplexity (penalty).

  Args:
    runs: row name -> flat metrics with ``ppl_<scheme>`` / ``penalty_<scheme>`` entries (one
      run's, or a list per metric for a group of seeds, printed as mean ± std).
    schemes: scheme names (columns); by default every scheme found in any run, in order.
    notes: follow the table with ``quant_notes`` (what each scheme quantises).

  Returns:
    Markdown: the table, then (with ``notes``) a blank line and the footnotes.

  Example:
    >>> print(format_quant_table({"a": {"perplexity": 3.0, "ppl_w4_g128": 3.5,
    ...                                 "penalty_w4_g128": 0.5}}, notes=False))
    | Model | FP PPL | W4 g128 |
    |---|---:|---:|
    | a | 3.00 | 3.50 (+0.50) |
  """
  if schemes is None:
    seen: dict[str, None] = {}
    for m in runs.values():
      for k in m:
        if k.startswith("ppl_"):
          seen.setdefault(k[4:])
    schemes = list(seen)
  header = ["Model", "FP PPL"] + [_scheme_label(s) for s in schemes]
  rows = []
  for name, m in runs.items():
    row = [name, _fmt(m.get("perplexity"))]
    for s in schemes:
      ppl = m.get(f"ppl_{s}")
      row.append("–" if ppl is None else f"{_fmt(ppl)} ({_fmt(m.get(f'penalty_{s}'), 'signed')})")
    rows.append(row)
  table = _table(header, rows)
  return f"{table}\n\n{quant_notes(schemes)}" if notes else table


def quant_notes(schemes: Sequence[str]) -> str:
  """Footnotes of the scheme table: what is quantised, the activation scales, each scheme.

  Args:
    schemes: scheme names (``quantize.SCHEMES`` keys, optionally with ``+emb``).

  Returns:
    Markdown: ``quantize.COVERAGE_RULE`` and ``quantize.ACT_SCALE_RULE`` as one paragraph, then
    one bullet per scheme (``QuantScheme.describe``); names this version does not know are
    marked so.

  Example:
    >>> quant_notes(["w4_g128+emb"]).splitlines()[-1]
    '- W4 g128 +emb (`w4_g128+emb`): weights int4 zero-point, one scale per 128 inputs of an \
output channel; inputs float; embedding lookup quantised as the head.'
  """
  lines = [f"{quantize.COVERAGE_RULE} {quantize.ACT_SCALE_RULE}", ""]
  for name in schemes:
    try:
      (scheme,) = quantize.resolve_schemes([name])
      what = scheme.describe()
    except ValueError:
      what = "not a scheme of this version of softmax_one_jax"
    lines.append(f"- {_scheme_label(name)} (`{name}`): {what}.")
  return "\n".join(lines)


# How far each OrthoAdam rotation family mixes a parameter's coordinates (the same on every mesh).
_MIXING = {
    "hadamard": "every axis mixed whole (block-diagonal only on an axis whose odd part exceeds "
                "1024)",
    "kronecker": "every axis mixed whole",
    "dense": "the whole flattened parameter mixed",
    "block": "blocks of 64 consecutive elements mixed",
    "identity": "no rotation (Adam's basis)",
}


def training_note(config: Mapping[str, Any]) -> str:
  """One line on a run's optimizer, OrthoAdam rotation and mixing width, and norm.

  Args:
    config: the run's flattened config (``seeds.flatten_config``), as analyses keep it.

  Example:
    >>> training_note({"optimizer.name": "orthoadam", "optimizer.rotation": "dense",
    ...                "model.norm": "scalar_layernorm"})
    'orthoadam, rotation dense (the whole flattened parameter mixed), norm scalar_layernorm'
  """
  name = config.get("optimizer.name")
  parts = [str(name)] if name else []
  if name == "orthoadam":
    rotation = config.get("optimizer.rotation") or "hadamard"
    parts.append(f"rotation {rotation} ({_MIXING.get(rotation, 'see its family')})")
  if config.get("model.norm"):
    parts.append(f"norm {config['model.norm']}")
  return ", ".join(parts) or "not a training run"


def format_analysis_markdown(
    runs: Mapping[str, Mapping[str, Value]], meta_note: Mapping[str, Any] | None = None,
    trained: Mapping[str, str] | None = None,
) -> str:
  """``table.md``: the Table 2 form, its reading notes and (with ``ppl_*``) the Table 3 form.

  Args:
    runs: row label -> flat metrics (lists of per-seed values for groups of seeds).
    meta_note: run metadata; its data fields head the page.
    trained: row label -> how it was trained (``training_note``), listed under the tables.

  Example:
    >>> format_analysis_markdown({"a": {"perplexity": 3.0}}).splitlines()[0]
    '# Outlier analysis'
  """
  parts = ["# Outlier analysis", ""]
  if meta_note:
    parts += ["Evaluated on " + ", ".join(f"{k}={v}" for k, v in meta_note.items()
                                         if k in ("source", "data", "tokenizer", "num_batches",
                                                  "batch_size", "seq_len", "tokens")) + ".", ""]
  parts += [
      "## Outliers (Table 2 form)", "",
      format_metrics_table(runs), "",
      "n: runs in the row, differing only in seed; with n > 1 each cell is the mean ± sample "
      "std over them. 1st-token %: share of (layer, head, query) whose most-attended key is the "
      "first token (each document's first query excluded; ties go to the first token); "
      "1st-token prob %: mean attention probability on it; chance %: both metrics' value for a "
      "query choosing uniformly among the keys it sees, on this batch's token layout. Kurtosis "
      "and max |act| of block outputs, averaged over layers (kurtosis: per token, averaged over "
      "tokens first). Penalty = PPL(quantised) - PPL(full precision).", "",
  ]
  if trained:
    parts += ["Trained with:", ""] + [f"- {label}: {note}" for label, note in trained.items()]
    parts += [""]
  if any(k.startswith("ppl_") for m in runs.values() for k in m):
    parts += ["## Round-to-nearest quantisation (Table 3 form)", "",
              format_quant_table(runs), ""]
  return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Figures.


def _save(fig: Figure, path: PathLike) -> epath.Path:
  """Writes ``fig`` to ``path`` (a local path or an object-store URI; format from its suffix)."""
  path = workdir_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  with path.open("wb") as f:
    fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110)
  return path


def plot_attention_maps(
    maps: Sequence[tuple[str, np.ndarray]], path: PathLike, *, max_tokens: int = 64
) -> epath.Path:
  """Heatmaps of attention probabilities, one panel per (title, ``[T, T]`` map).

  Args:
    maps: ``(title, probs_tt)`` pairs; rows are queries, columns keys.
    path: PNG file to write.
    max_tokens: show only the first ``max_tokens`` queries and keys (readability).

  Returns:
    The written path.
  """
  if not maps:
    raise ValueError("no attention maps to plot.")
  n = len(maps)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig = Figure(figsize=(3.4 * cols + 0.8, 3.2 * rows), layout="constrained")
  for i, (title, probs_tt) in enumerate(maps):
    ax = fig.add_subplot(rows, cols, i + 1)
    p = np.asarray(probs_tt)[:max_tokens, :max_tokens]
    im = ax.imshow(p, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.colorbar(im, ax=fig.axes, shrink=0.8, label="attention probability")
  return _save(fig, path)


def plot_per_layer(
    series: Mapping[str, np.ndarray],
    path: PathLike,
    *,
    ylabel: str,
    title: str,
    logy: bool = False,
    percent: bool = False,
) -> epath.Path:
  """One line per label over layers (e.g. first-token share, kurtosis first/rest, runs).

  Args:
    series: label -> ``[L]`` values.
    path: PNG file to write.
    ylabel, title: axis label and title.
    logy: logarithmic y axis (kurtosis, max |activation|) when the values span more than a
      factor of 20; linear otherwise.
    percent: multiply values by 100.

  Returns:
    The written path.
  """
  fig = Figure(figsize=(5.5, 3.6), layout="constrained")
  ax = fig.add_subplot(1, 1, 1)
  for label, values in series.items():
    v = np.asarray(values, np.float64) * (100.0 if percent else 1.0)
    ax.plot(np.arange(len(v)), v, marker="o", ms=3, label=label)
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  finite = np.concatenate([np.asarray(v, np.float64).ravel() for v in series.values()])
  finite = finite[np.isfinite(finite)] * (100.0 if percent else 1.0)
  if logy and finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
    ax.set_yscale("log")  # only when the values span orders of magnitude
  elif percent:
    ax.set_ylim(0.0, min(100.0, 1.2 * finite.max() + 1.0) if finite.size else 100.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_channel_max_abs(
    panels: Mapping[str, np.ndarray], path: PathLike, *, ncols: int = 2
) -> epath.Path:
  """Heatmaps of max |activation| per (layer, channel), log colour scale, one panel per entry.

  Args:
    panels: title -> ``[L, D]`` maxima (e.g. "first token" / "other tokens", or one per run).
    path: PNG file to write.
    ncols: panels per row (2 gives the softmax/softmax-1 x AdamW/OrthoAdam grid for 4 runs).

  Returns:
    The written path.
  """
  if not panels:
    raise ValueError("no panels to plot.")
  vals = [np.asarray(v, np.float64) for v in panels.values()]
  pos = np.concatenate([v[v > 0].ravel() for v in vals] + [np.array([1e-6])])
  norm = LogNorm(vmin=max(pos.min(), 1e-3), vmax=max(pos.max(), 1e-3 * 10))
  n = len(vals)
  cols = min(n, ncols)
  rows = -(-n // cols)
  fig = Figure(figsize=(5.0 * cols + 0.8, 2.8 * rows), layout="constrained")
  for i, (title, v) in enumerate(zip(panels, vals)):
    ax = fig.add_subplot(rows, cols, i + 1)
    im = ax.imshow(np.maximum(v, norm.vmin), aspect="auto", cmap="magma", norm=norm,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("channel", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
  fig.colorbar(im, ax=fig.axes, shrink=0.8, label="max |activation|")
  return _save(fig, path)
