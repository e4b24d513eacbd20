"""The analysis of one model on fixed batches: outlier metrics, quantisation, maps, outputs.

``analyze_model`` evaluates the outlier metrics (``outliers``), the perplexity of each
quantisation scheme (``quant_metrics``) and attention maps of chosen heads; ``write_outputs``
writes ``metrics.json``, ``table.md`` and the ``FIGURES``. ``softmax-one analyze``
(``analysis.cli.analyze_main``) loads the model and the batches and calls both.

Example:
  >>> metrics, rep, maps = analyze_model(model, stacked, schemes=[SCHEMES["w8_tensor"]])  # doctest: +SKIP
  >>> write_outputs("out", "softmax1", metrics, rep, maps, meta={})  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from softmax_one_jax.analysis import layout, outliers, quantize, report
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.models.intermediates import with_intermediates
from softmax_one_jax.rundir import PathLike, workdir_path

FIGURES = ("attention_maps.png", "first_token_per_layer.png", "kurtosis_per_layer.png",
           "max_abs_per_layer.png", "max_abs_channels.png")


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

  Example:
    >>> quant_metrics(model, stacked, [quantize.SCHEMES["w8_tensor"]], 30.0)  # doctest: +SKIP
    {'ppl_w8_tensor': 30.2, 'penalty_w8_tensor': 0.2}
  """
  out: dict[str, float] = {}
  for scheme in schemes:
    qmodel = quantize.quantize_model(model, scheme)
    sums = outliers.evaluate_sums(qmodel, stacked, outliers=False)
    ppl = outliers.finalize(sums).scalars["perplexity"]
    out[f"ppl_{scheme.name}"] = ppl
    out[f"penalty_{scheme.name}"] = ppl - fp_perplexity
  return out


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
  """``[T, T]`` attention probabilities of chosen (layer, head)s on the first validation row.

  Args:
    model: the Transformer.
    stacked: ``[NB, B, T]`` batches; the maps are of ``inputs[0, 0]``.
    heads: (layer, head) pairs, each inside the model.

  Returns:
    ``[(label, [T, T] probabilities)]``, one per pair.

  Example:
    >>> maps = attention_maps(model, stacked, [(0, 1)])               # doctest: +SKIP
  """
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
  _, inter = with_intermediates(model, row["inputs"], ["attention_probs"],
                                segment_ids=row.get("segment_ids"), positions=row.get("positions"))
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

  Example:
    >>> metrics, rep, maps = analyze_model(model, stacked)            # doctest: +SKIP
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
    out: PathLike,
    name: str,
    metrics: Mapping[str, float],
    rep: outliers.OutlierReport,
    maps: Sequence[tuple[str, np.ndarray]],
    meta: Mapping[str, Any],
) -> dict[str, epath.Path]:
  """Writes ``metrics.json``, ``table.md`` and the figures (``FIGURES``) into ``out``.

  Returns:
    ``{"metrics", "table", "attention_maps" (with maps), "first_token", "kurtosis", "max_abs",
    "channels"}`` -> the written paths.

  Example:
    >>> write_outputs("out", "softmax1", metrics, rep, maps, meta)     # doctest: +SKIP
  """
  out = workdir_path(out)
  out.mkdir(parents=True, exist_ok=True)
  paths = {"metrics": out / "metrics.json", "table": out / "table.md"}
  payload = {"name": name, "meta": dict(meta), "metrics": dict(metrics), "report": rep.to_json()}
  paths["metrics"].write_text(json.dumps(payload, indent=1, default=float))
  trained = {name: report.training_note(meta["config"])} if meta.get("config") else None
  paths["table"].write_text(report.format_analysis_markdown({name: metrics}, meta_note=meta,
                                                            trained=trained))
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
