"""``softmax-one analyze`` and ``softmax-one compare``: the paper's tables and figures, one command.

``analyze_main`` loads a run (``workdir``, through ``softmax_one_jax.training.checkpoint``) or a
local Hugging Face checkpoint (``hf``), evaluates fixed validation batches, and writes into
``out`` (default ``RUN/analysis``):

* ``metrics.json``: flat scalars, per-layer / per-head / per-channel arrays, run metadata;
* ``table.md``: Table 2 form (perplexity, first-token attention, kurtosis, max |activation|,
  headline int8/int4) and Table 3 form (every quantisation scheme with its penalty);
* ``attention_maps.png``, ``first_token_per_layer.png``, ``kurtosis_per_layer.png``,
  ``max_abs_per_layer.png``, ``max_abs_channels.png``.

``compare_main`` reads (or first computes) each run's ``analysis/metrics.json`` and writes side by
side tables and figures; four runs covering softmax/softmax-1 x AdamW/OrthoAdam are laid out as
the paper's 2x2 grid.

Example:
  >>> analyze_main(workdir="runs/tiny")                             # doctest: +SKIP
  >>> compare_main(["runs/a", "runs/b", "runs/c", "runs/d"], out="runs/compare")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softmax_one_jax.analysis import layout, outliers, quantize, report, seeds
from softmax_one_jax.data import default_data_config, get_tokenizer, validation_batches
from softmax_one_jax.errors import ConfigError, MissingFileError
from softmax_one_jax.models.hf import load_hf
from softmax_one_jax.rundir import load_model

DEFAULT_NUM_BATCHES = 8
DEFAULT_BATCH_SIZE = 4
DEFAULT_HF_SEQ_LEN = 256
FIGURES = ("attention_maps.png", "first_token_per_layer.png", "kurtosis_per_layer.png",
           "max_abs_per_layer.png", "max_abs_channels.png")


# ----------------------------------------------------------------------------------------------
# Library-level analysis of one model.


def quant_metrics(
    model: nnx.Module,
    stacked: Mapping[str, np.ndarray],
    schemes: Sequence[quantize.QuantScheme],
    fp_perplexity: float,
) -> dict[str, float]:
  """``ppl_<scheme>`` and ``penalty_<scheme>`` (= PPL(quantised) - PPL(full precision)).

  Args:
    model: the full-precision Transformer (not modified).
    stacked: ``[NB, B, T]`` batches with ``targets`` (see ``outliers.stack_batches``).
    schemes: the quantisation schemes.
    fp_perplexity: the full-precision perplexity on the same batches.
  """
  out: dict[str, float] = {}
  for scheme in schemes:
    qmodel = quantize.quantize_model(model, scheme)
    sums = outliers.evaluate_sums(qmodel, stacked, outliers=False)
    ppl = outliers.finalize(sums).scalars["perplexity"]
    out[f"ppl_{scheme.name}"] = ppl
    out[f"penalty_{scheme.name}"] = ppl - fp_perplexity
  return out


def parse_heads(heads: str | Sequence[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
  """``"0:1,3:0"`` -> ``[(0, 1), (3, 0)]`` (layer:head pairs); None stays None.

  Example:
    >>> parse_heads("0:1, 3:0")
    [(0, 1), (3, 0)]
  """
  if heads is None or (isinstance(heads, str) and not heads.strip()):
    return None
  if not isinstance(heads, str):
    return [(int(l), int(h)) for l, h in heads]
  pairs = []
  for item in heads.split(","):
    try:
      layer, head = item.strip().split(":")
      pairs.append((int(layer), int(head)))
    except ValueError:
      raise ConfigError(
          f"--heads entry {item!r} is not 'layer:head' (e.g. --heads=0:1,3:0).") from None
  return pairs


def default_heads(per_head_share: np.ndarray, max_maps: int = 4) -> list[tuple[int, int]]:
  """Up to ``max_maps`` evenly spaced layers, each with its head of largest first-token share.

  Example:
    >>> default_heads(np.array([[0.1, 0.9], [0.8, 0.2]]))
    [(0, 1), (1, 0)]
  """
  num_layers = per_head_share.shape[0]
  spaced = np.linspace(0, num_layers - 1, min(max_maps, num_layers)).round().astype(int)
  layers = sorted(set(spaced.tolist()))
  return [(int(l), int(np.nanargmax(np.nan_to_num(per_head_share[l], nan=-1.0)))) for l in layers]


def attention_maps(
    model: nnx.Module, stacked: Mapping[str, np.ndarray], heads: Sequence[tuple[int, int]]
) -> list[tuple[str, np.ndarray]]:
  """``[T, T]`` attention probabilities of chosen (layer, head)s on the first validation row."""
  cfg = getattr(model, "config", None)
  for layer, head in heads:
    if cfg is not None and not (0 <= layer < cfg.num_layers and 0 <= head < cfg.num_heads):
      raise ConfigError(
          f"--heads entry {layer}:{head} is outside the model ({cfg.num_layers} layers, "
          f"{cfg.num_heads} heads)."
      )
  row = {k: jnp.asarray(stacked[k][0, :1]) for k in ("inputs", "segment_ids", "positions")
         if k in stacked}
  graphdef, state = nnx.split(model)
  probs_lbnts = np.asarray(_attention_probs(graphdef, state, row))
  return [(f"layer {l} head {h}", probs_lbnts[l, 0, h]) for l, h in heads]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _attention_probs(graphdef, state, row):
  model = nnx.merge(graphdef, state)
  _, inter = model(row["inputs"], segment_ids=row.get("segment_ids"),
                   positions=row.get("positions"), intermediates=("attention_probs",))
  return inter["attention_probs"]


def analyze_model(
    model: nnx.Module,
    stacked: Mapping[str, np.ndarray],
    *,
    schemes: Sequence[quantize.QuantScheme] = (),
    heads: Sequence[tuple[int, int]] | None = None,
    attention: str = "probs",
) -> tuple[dict[str, float], outliers.OutlierReport, list[tuple[str, np.ndarray]]]:
  """Outlier metrics, quantisation penalties and attention maps of one model.

  Args:
    model: the Transformer.
    stacked: ``[NB, B, T]`` batches (``inputs``, ``targets``, optional ``weights``,
      ``segment_ids``, ``positions``).
    schemes: quantisation schemes to evaluate.
    heads: (layer, head) pairs for the attention maps; None = ``default_heads``.
    attention: "probs" or "stats" (see ``outliers.model_batch_sums``).

  Returns:
    ``(flat metrics, the full OutlierReport, attention maps)``.
  """
  rep = outliers.finalize(outliers.evaluate_sums(model, stacked, attention=attention))
  metrics = dict(rep.scalars)
  nb, b, t = stacked["inputs"].shape
  segment_ids = stacked.get("segment_ids")
  metrics["first_token_chance"] = float(layout.first_token_chance(
      None if segment_ids is None else jnp.reshape(segment_ids, (nb * b, t)), nb * b, t))
  if schemes:
    metrics.update(quant_metrics(model, stacked, schemes, rep.scalars["perplexity"]))
  if heads is None:
    heads = default_heads(rep.per_head["first_token_attention"])
  return metrics, rep, attention_maps(model, stacked, heads)


def write_outputs(
    out: str | pathlib.Path,
    name: str,
    metrics: Mapping[str, float],
    rep: outliers.OutlierReport,
    maps: Sequence[tuple[str, np.ndarray]],
    meta: Mapping[str, Any],
) -> dict[str, pathlib.Path]:
  """Writes ``metrics.json``, ``table.md`` and the figures into ``out``; returns their paths."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"metrics": out / "metrics.json", "table": out / "table.md"}
  payload = {"name": name, "meta": dict(meta), "metrics": dict(metrics), "report": rep.to_json()}
  paths["metrics"].write_text(json.dumps(payload, indent=1, default=float))
  paths["table"].write_text(_tables_markdown({name: metrics}, meta_note=meta))
  if maps:
    paths["attention_maps"] = report.plot_attention_maps(maps, out / "attention_maps.png")
  pl = rep.per_layer
  paths["first_token"] = report.plot_per_layer(
      {"argmax on first token": pl["first_token_attention"],
       "probability on first token": pl["first_token_prob"]},
      out / "first_token_per_layer.png", ylabel="% of queries",
      title=f"{name}: first-token attention", percent=True)
  paths["kurtosis"] = report.plot_per_layer(
      {"first token": pl["kurtosis_first"], "other tokens": pl["kurtosis_rest"]},
      out / "kurtosis_per_layer.png", ylabel="kurtosis", title=f"{name}: hidden-state kurtosis",
      logy=True)
  paths["max_abs"] = report.plot_per_layer(
      {"first token": pl["max_abs_first"], "other tokens": pl["max_abs_rest"]},
      out / "max_abs_per_layer.png", ylabel="max |activation|", title=f"{name}: max |activation|",
      logy=True)
  pc = rep.per_channel
  paths["channels"] = report.plot_channel_max_abs(
      {f"{name}: first token": pc["max_abs_first"], f"{name}: other tokens": pc["max_abs_rest"]},
      out / "max_abs_channels.png")
  return paths


def _tables_markdown(
    runs: Mapping[str, Mapping[str, report.Value]], meta_note: Mapping[str, Any] | None = None
) -> str:
  parts = ["# Outlier analysis", ""]
  if meta_note:
    parts += ["Evaluated on " + ", ".join(f"{k}={v}" for k, v in meta_note.items()
                                         if k in ("source", "data", "tokenizer", "num_batches",
                                                  "batch_size", "seq_len", "tokens")) + ".", ""]
  parts += [
      "## Outliers (Table 2 form)", "",
      report.format_metrics_table(runs), "",
      "n: runs in the row, differing only in seed; with n > 1 each cell is the mean ± sample "
      "std over them. 1st-token %: share of (layer, head, query) whose most-attended key is the "
      "first token (each document's first query excluded; ties go to the first token); "
      "1st-token prob %: mean attention probability on it; chance %: both metrics' value for a "
      "query choosing uniformly among the keys it sees, on this batch's token layout. Kurtosis "
      "and max |act| of block outputs, averaged over layers (kurtosis: per token, averaged over "
      "tokens first). Penalty = PPL(quantised) - PPL(full precision).", "",
  ]
  if any(k.startswith("ppl_") for m in runs.values() for k in m):
    parts += ["## Round-to-nearest quantisation (Table 3 form)", "",
              report.format_quant_table(runs), ""]
  return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Loading models and data.


def _lookup(config: Any, dotted: str) -> Any:
  cur = config
  for part in dotted.split("."):
    try:
      cur = cur[part]
    except (KeyError, TypeError, IndexError, AttributeError):
      cur = getattr(cur, part, None)
    if cur is None:
      return None
  return cur


def _optimizer_name(config: Any) -> str | None:
  for key in ("optimizer.name", "optim.name", "optimizer", "optim", "train.optimizer"):
    v = _lookup(config, key)
    if isinstance(v, str):
      return v
  return None


def _load_batches(
    data_cfg: Any, *, seq_len: int, batch_size: int, num_batches: int, vocab_size: int
) -> dict[str, np.ndarray]:
  tok = get_tokenizer(data_cfg)
  if tok.vocab_size > vocab_size:
    raise ConfigError(
        f"the tokenizer has {tok.vocab_size} ids but the model only {vocab_size}; choose the "
        "model's own tokenizer (--tokenizer / --tokenizer_path)."
    )
  batches = validation_batches(data_cfg, tokenizer=tok, seq_len=seq_len, batch_size=batch_size,
                               num_batches=num_batches)
  return outliers.stack_batches(batches, num_batches)


def _hf_data_config(hf: pathlib.Path, model_type: str | None, overrides: Mapping[str, Any]) -> Any:
  cfg = default_data_config()
  if model_type == "gpt2":
    cfg.tokenizer = "gpt2"
  elif (hf / "tokenizer.model").is_file():
    cfg.tokenizer, cfg.tokenizer_path = "sentencepiece", str(hf / "tokenizer.model")
  for k, v in overrides.items():
    if v is not None:
      setattr(cfg, k, v)
  return cfg


def analyze_main(
    workdir: str | None = None,
    hf: str | None = None,
    out: str | None = None,
    *,
    step: int | None = None,
    num_batches: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    schemes: str | Sequence[str] | None = None,
    heads: str | Sequence[tuple[int, int]] | None = None,
    attention: str = "probs",
    data_overrides: Mapping[str, Any] | None = None,
    batches: Iterable[Mapping[str, Any]] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
  """``softmax-one analyze``: tables and figures for a run or a local HF checkpoint.

  Args:
    workdir: a training run directory (exactly one of ``workdir`` / ``hf``).
    hf: a local Hugging Face GPT-2 / Llama checkpoint directory.
    out: output directory; default ``WORKDIR/analysis`` or ``./analysis/<checkpoint name>``.
    step: checkpoint step of the run (default: the latest good one).
    num_batches, batch_size: validation batches to evaluate; for a run, default the run's own
      ``eval_batches`` / ``eval_batch_size`` (so the perplexity matches the one training logged),
      else ``DEFAULT_NUM_BATCHES`` / ``DEFAULT_BATCH_SIZE``.
    seq_len: tokens per row; default the run's ``seq_len`` (HF: min(256, max_seq_len)).
    schemes: quantisation schemes (comma-separated names of ``quantize.SCHEMES``); None = all;
      "" = none.
    heads: "layer:head,..." for the attention maps; default one head per evenly spaced layer.
    attention: "probs" or "stats" (kernel statistics; needs the model's ``attention_stats``).
    data_overrides: data-config fields to set (``source``, ``paths``, ``tokenizer``,
      ``tokenizer_path``, ...); for runs they change the run's own data config.
    batches: evaluate these batches instead of loading validation data (library use, tests).
    name: row label; default from the run's softmax/optimizer or the directory name.

  Returns:
    ``{"metrics": flat metrics, "paths": written files, "meta": run metadata}``.
  """
  if (workdir is None) == (hf is None):
    raise ConfigError("pass exactly one of --workdir=RUN or --hf=PATH to `softmax-one analyze`.")
  if attention not in ("probs", "stats"):
    raise ConfigError(f"--attention={attention!r} is not known; expected 'probs' or 'stats'.")
  head_pairs = parse_heads(heads)  # flag errors before anything is loaded or compiled
  scheme_list = quantize.resolve_schemes(schemes) if schemes != "" else []
  data_overrides = dict(data_overrides or {})
  meta: dict[str, Any] = {}
  if workdir is not None:
    root = pathlib.Path(workdir).expanduser().resolve()
    model, run_config = load_model(str(root), step=step)
    data_cfg = _lookup(run_config, "data")
    if data_cfg is not None:
      for k, v in data_overrides.items():
        if v is not None:
          setattr(data_cfg, k, v)
    seq_len = seq_len or _lookup(run_config, "seq_len")
    num_batches = num_batches or _lookup(run_config, "eval_batches")
    batch_size = batch_size or _lookup(run_config, "eval_batch_size")
    meta.update(source=str(root), optimizer=_optimizer_name(run_config),
                config=seeds.flatten_config(run_config.to_dict()))
    out_dir = pathlib.Path(out) if out else root / "analysis"
    default_name = root.name
  else:
    root = pathlib.Path(hf).expanduser().resolve()
    model = load_hf(root)
    model_type = json.loads((root / "config.json").read_text()).get("model_type")
    data_cfg = None if batches is not None else _hf_data_config(root, model_type, data_overrides)
    meta.update(source=str(root), optimizer=None, model_type=model_type)
    out_dir = pathlib.Path(out) if out else pathlib.Path("analysis") / root.name
    default_name = root.name
  cfg = model.config
  seq_len = int(seq_len or min(DEFAULT_HF_SEQ_LEN, cfg.max_seq_len))
  num_batches = int(num_batches or DEFAULT_NUM_BATCHES)
  batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
  meta.update(softmax=cfg.softmax, num_layers=cfg.num_layers, num_heads=cfg.num_heads)
  if batches is not None:
    stacked = outliers.stack_batches(batches, num_batches)
  else:
    if data_cfg is None:
      raise ConfigError(
          f"{workdir}: the run's config has no 'data' section to read validation data from.")
    stacked = _load_batches(data_cfg, seq_len=seq_len, batch_size=batch_size,
                            num_batches=num_batches, vocab_size=cfg.vocab_size)
    meta["data"] = f"{data_cfg.source}{':' + data_cfg.paths if data_cfg.paths else ''}"
    meta["tokenizer"] = data_cfg.tokenizer
  nb, b, t = stacked["inputs"].shape
  meta.update(num_batches=nb, batch_size=b, seq_len=t, tokens=int(nb * b * t))
  if "targets" not in stacked:
    raise ConfigError("the validation batches carry no 'targets'; perplexity needs them.")
  metrics, rep, maps = analyze_model(model, stacked, schemes=scheme_list, heads=head_pairs,
                                     attention=attention)
  if name is None:
    name = f"{cfg.softmax} + {meta['optimizer']}" if meta.get("optimizer") else default_name
  paths = write_outputs(out_dir, name, metrics, rep, maps, meta)
  return {"metrics": metrics, "paths": paths, "meta": meta, "name": name}


def load_analysis(run: str | pathlib.Path) -> dict[str, Any]:
  """Reads ``RUN/analysis/metrics.json`` (or ``RUN/metrics.json`` if RUN is an analysis folder)."""
  run = pathlib.Path(run)
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


def compare_main(
    runs: Sequence[str],
    out: str | None = None,
    *,
    names: Sequence[str] | None = None,
    analyze_missing: bool = True,
    **analyze_kwargs: Any,
) -> dict[str, Any]:
  """``softmax-one compare RUN1 RUN2 ...``: runs side by side (tables and figures).

  Runs whose configs differ only in seed (``seeds.group_by_seed``) share one row: each metric
  as mean ± sample std over the seeds, with ``n`` (figures show the per-layer means; the
  per-channel figure shows each group's first run, as channels do not correspond across seeds).

  Args:
    runs: run directories (or analysis folders holding ``metrics.json``).
    out: output directory (default ``./compare``).
    names: row labels, one per run; default each run's analysis name.
    analyze_missing: run ``analyze_main`` first for runs without an analysis.
    **analyze_kwargs: passed to ``analyze_main`` for those runs.

  Returns:
    ``{"metrics": {row: metrics (a list per metric for groups of seeds)}, "groups": {row:
    {"n", "runs", "seeds", "mean", "std", "values"}}, "paths": written files}``.
  """
  if not runs:
    raise ConfigError("`softmax-one compare` needs at least one run directory.")
  if names is not None and len(names) != len(runs):
    raise ConfigError(f"got {len(names)} names for {len(runs)} runs; give one name per run.")
  entries = []
  for i, run in enumerate(runs):
    try:
      d = load_analysis(run)
    except FileNotFoundError:
      if not analyze_missing:
        raise
      analyze_main(workdir=run, **analyze_kwargs)
      d = load_analysis(run)
    if names is not None:
      d["name"] = names[i]
    entries.append(d)
  groups = _grid_order(seeds.group_by_seed(entries, list(runs)))
  out_dir = pathlib.Path(out or "compare")
  out_dir.mkdir(parents=True, exist_ok=True)
  table = {g.label: (g.runs[0]["metrics"] if g.n == 1 else g.metric_values()) for g in groups}
  reps = {g.label: [outliers.OutlierReport.from_json(r["report"]) for r in g.runs]
          for g in groups}

  def per_layer(metric: str) -> dict[str, np.ndarray]:
    return {n: np.mean([np.asarray(r.per_layer[metric]) for r in rs], axis=0)
            for n, rs in reps.items()}

  seeded = any(g.n > 1 for g in groups)
  of_seeds = " (mean over seeds)" if seeded else ""
  paths = {"table": out_dir / "table.md"}
  paths["table"].write_text(_tables_markdown(table))
  paths["first_token"] = report.plot_per_layer(
      per_layer("first_token_attention"), out_dir / "first_token_per_layer.png",
      ylabel="% of queries", percent=True,
      title=f"argmax attention on the first token{of_seeds}")
  paths["kurtosis"] = report.plot_per_layer(
      per_layer("kurtosis_rest"), out_dir / "kurtosis_per_layer.png",
      ylabel="kurtosis (non-first tokens)", logy=True, title=f"hidden-state kurtosis{of_seeds}")
  paths["max_abs"] = report.plot_per_layer(
      per_layer("max_abs_rest"), out_dir / "max_abs_per_layer.png",
      ylabel="max |activation| (non-first tokens)", logy=True,
      title=f"max |activation|{of_seeds}")
  paths["channels"] = report.plot_channel_max_abs(
      {n + (" (first seed)" if seeded else ""):
       np.maximum(rs[0].per_channel["max_abs_first"], rs[0].per_channel["max_abs_rest"])
       for n, rs in reps.items()}, out_dir / "max_abs_channels.png", ncols=2)
  summary = {g.label: _group_summary(g) for g in groups}
  (out_dir / "metrics.json").write_text(json.dumps(
      {"groups": summary, "runs": {src: r["metrics"] for g in groups
                                   for src, r in zip(g.sources, g.runs)}},
      indent=1, default=float))
  return {"metrics": table, "groups": summary, "paths": paths}
