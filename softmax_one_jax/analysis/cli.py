"""``softmax-one analyze`` and ``softmax-one compare``: load what the flags name, then analyse.

``analyze_main`` loads a run (``workdir``, through ``softmax_one_jax.rundir.load_model``) or a
local Hugging Face checkpoint (``hf``), evaluates fixed validation batches
(``analyze.analyze_model``), and writes into ``out`` (default ``RUN/analysis``,
``analyze.write_outputs``):

* ``metrics.json``: flat scalars, per-layer / per-head / per-channel arrays, run metadata;
* ``table.md``: Table 2 form (perplexity, first-token attention, kurtosis, max |activation|,
  headline int8/int4) and Table 3 form (every quantisation scheme with its penalty);
* the ``analyze.FIGURES``: attention maps, first-token share, kurtosis and max |activation| per
  layer, max |activation| per channel.

``compare_main`` reads (or first computes) each run's ``analysis/metrics.json`` and writes side by
side tables and figures (``compare.write_comparison``); four runs covering softmax/softmax-1 x
AdamW/OrthoAdam are laid out as the paper's 2x2 grid.

Example:
  >>> analyze_main(workdir="runs/tiny")                             # doctest: +SKIP
  >>> compare_main(["runs/a", "runs/b", "runs/c", "runs/d"], out="runs/compare")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from flax import nnx

from softmax_one_jax.analysis import outliers, quantize, seeds
from softmax_one_jax.analysis.analyze import FIGURES, analyze_model, write_outputs
from softmax_one_jax.analysis.compare import load_analysis, write_comparison
from softmax_one_jax.data import default_data_config, get_tokenizer, validation_batches
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.models.hf import load_hf
from softmax_one_jax.rundir import load_model, workdir_path

DEFAULT_NUM_BATCHES = 8
DEFAULT_BATCH_SIZE = 4
DEFAULT_HF_SEQ_LEN = 256
__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_HF_SEQ_LEN", "DEFAULT_NUM_BATCHES", "FIGURES",
           "analyze_main", "compare_main", "parse_heads"]


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


# ----------------------------------------------------------------------------------------------
# What ``analyze`` evaluates: the model, its data config and defaults.


@dataclasses.dataclass
class _Source:
  """A loaded model with its data config (None: none to read), metadata and defaults.

  ``seq_len`` / ``num_batches`` / ``batch_size`` are a run's own evaluation sizes (None for a
  Hugging Face checkpoint).
  """

  model: nnx.Module
  data_cfg: Any
  meta: dict[str, Any]
  out_dir: epath.Path
  default_name: str
  seq_len: int | None = None
  num_batches: int | None = None
  batch_size: int | None = None


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


def _set_fields(cfg: Any, overrides: Mapping[str, Any]) -> None:
  for k, v in overrides.items():
    if v is not None:
      setattr(cfg, k, v)


def _run_source(workdir: str, out: str | None, step: int | None,
                data_overrides: Mapping[str, Any]) -> _Source:
  """A training run: its weights, its own data config (overridden) and evaluation sizes."""
  root = workdir_path(workdir)
  model, run_config = load_model(root, step=step)
  data_cfg = _lookup(run_config, "data")
  if data_cfg is not None:
    _set_fields(data_cfg, data_overrides)
  meta = {"source": str(root), "optimizer": _lookup(run_config, "optimizer.name"),
          "config": seeds.flatten_config(run_config.to_dict())}
  return _Source(model, data_cfg, meta, workdir_path(out) if out else root / "analysis",
                 root.name, _lookup(run_config, "seq_len"), _lookup(run_config, "eval_batches"),
                 _lookup(run_config, "eval_batch_size"))


def _hf_data_config(hf: pathlib.Path, model_type: str | None, overrides: Mapping[str, Any]) -> Any:
  cfg = default_data_config()
  if model_type == "gpt2":
    cfg.tokenizer = "gpt2"
  elif (hf / "tokenizer.model").is_file():
    cfg.tokenizer, cfg.tokenizer_path = "sentencepiece", str(hf / "tokenizer.model")
  _set_fields(cfg, overrides)
  return cfg


def _hf_source(hf: str, out: str | None, data_overrides: Mapping[str, Any], *,
               need_data: bool) -> _Source:
  """A local Hugging Face checkpoint, with the default data read by its own tokenizer."""
  root = pathlib.Path(hf).expanduser().resolve()
  model = load_hf(root)
  model_type = json.loads((root / "config.json").read_text()).get("model_type")
  data_cfg = _hf_data_config(root, model_type, data_overrides) if need_data else None
  meta = {"source": str(root), "optimizer": None, "model_type": model_type}
  return _Source(model, data_cfg, meta,
                 workdir_path(out if out else pathlib.Path("analysis") / root.name), root.name)


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


def _evaluation_batches(
    src: _Source,
    batches: Iterable[Mapping[str, Any]] | None,
    *,
    seq_len: int | None,
    num_batches: int | None,
    batch_size: int | None,
) -> dict[str, np.ndarray]:
  """``[NB, B, T]`` batches with targets: ``batches``, or the source's validation data.

  Sizes default to the source's own, then to ``DEFAULT_*``; ``src.meta`` records what was read.
  """
  cfg = src.model.config
  seq_len = int(seq_len or src.seq_len or min(DEFAULT_HF_SEQ_LEN, cfg.max_seq_len))
  num_batches = int(num_batches or src.num_batches or DEFAULT_NUM_BATCHES)
  batch_size = int(batch_size or src.batch_size or DEFAULT_BATCH_SIZE)
  if batches is not None:
    stacked = outliers.stack_batches(batches, num_batches)
  else:
    data_cfg = src.data_cfg
    if data_cfg is None:
      raise ConfigError(f"{src.meta['source']}: the run's config has no 'data' section to read "
                        "validation data from.")
    stacked = _load_batches(data_cfg, seq_len=seq_len, batch_size=batch_size,
                            num_batches=num_batches, vocab_size=cfg.vocab_size)
    src.meta["data"] = f"{data_cfg.source}{':' + data_cfg.paths if data_cfg.paths else ''}"
    src.meta["tokenizer"] = data_cfg.tokenizer
  nb, b, t = stacked["inputs"].shape
  src.meta.update(num_batches=nb, batch_size=b, seq_len=t, tokens=int(nb * b * t))
  if "targets" not in stacked:
    raise ConfigError("the validation batches carry no 'targets'; perplexity needs them.")
  return stacked


# ----------------------------------------------------------------------------------------------
# The commands.


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
    name: row label; default "<softmax> + <optimizer>" for a run, else the directory name.

  Returns:
    ``{"metrics": flat metrics, "paths": written files, "meta": run metadata}``.
  """
  if (workdir is None) == (hf is None):
    raise ConfigError("pass exactly one of --workdir=RUN or --hf=PATH to `softmax-one analyze`.")
  if attention not in ("probs", "stats"):
    raise ConfigError(f"--attention={attention!r} is not known; expected 'probs' or 'stats'.")
  head_pairs = parse_heads(heads)  # flag errors before anything is loaded or compiled
  scheme_list = quantize.resolve_schemes(schemes) if schemes != "" else []
  overrides = dict(data_overrides or {})
  src = (_run_source(workdir, out, step, overrides) if workdir is not None else
         _hf_source(hf, out, overrides, need_data=batches is None))
  cfg = src.model.config
  src.meta.update(softmax=cfg.softmax, num_layers=cfg.num_layers, num_heads=cfg.num_heads)
  stacked = _evaluation_batches(src, batches, seq_len=seq_len, num_batches=num_batches,
                                batch_size=batch_size)
  metrics, rep, maps = analyze_model(src.model, stacked, schemes=scheme_list, heads=head_pairs,
                                     attention=attention)
  if name is None:
    optimizer = src.meta["optimizer"]
    name = f"{cfg.softmax} + {optimizer}" if optimizer else src.default_name
  paths = write_outputs(src.out_dir, name, metrics, rep, maps, src.meta)
  return {"metrics": metrics, "paths": paths, "meta": src.meta, "name": name}


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
  as mean ± sample std over the seeds, with ``n`` (``compare.write_comparison``).

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
  return write_comparison(seeds.group_by_seed(entries, list(runs)), out or "compare")
