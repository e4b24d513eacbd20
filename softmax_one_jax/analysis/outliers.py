"""The paper's outlier measurements: first-token attention, kurtosis, max |activation|, perplexity.

Definitions (Kaul et al., ICLR 2025, arXiv:2410.17174, Sec. 3 and Tables 2-3):

* **First-token attention** ("attention sink"): the share of (layer, head, query) triples whose
  most-attended key (argmax over keys) is the first token, and the mean attention probability on
  the first token. *Query 0 is excluded*: under causal masking it can only see key 0, so it would
  count as a hit for every model. With packed documents (``segment_ids``) "the first token" is the
  first token of the query's own document and each document's first query is excluded likewise;
  padding (segment id 0) is excluded everywhere.
* **Kurtosis**: the raw fourth standardised moment ``E[(x - mu)^4] / sigma^4`` over the hidden
  dimension of one token of one block output (the residual stream after each block; a Gaussian
  vector gives about 3). Per layer, it is *averaged over tokens first* (first tokens and the rest
  separately), then the per-layer values are averaged over layers.
* **Max |activation|**: ``max |x|`` of a block output, over the hidden dimension and over the
  tokens of each group (first tokens / the rest), per layer; the headline value is its mean over
  layers. The per-(layer, channel) maxima feed the figures.
* **Perplexity**: ``exp`` of the mean next-token negative log-likelihood over weighted targets,
  with the ordinary softmax over the vocabulary.

Everything is computed as *sums* (``softmax_one_jax.analysis.sums``) that add up over batches and
are turned into means once at the end (``finalize``), so many validation batches run in one jitted
``lax.scan`` (``evaluate_sums``). Two sources for the attention statistics: the ``[L, B, N, T, T]``
probabilities (``sums.first_token_sums_from_probs``) or per-query statistics from
``softmax_one_jax.attention.first_token_stats`` / ``attention_stats``
(``sums.first_token_sums_from_flags`` / ``sums.first_token_sums_from_stats``) that need no
``T x T`` array.

Whether the first token is a query's argmax follows the tie rule of
``softmax_one_jax.attention.stats``: the score of the query's first visible key (under the
model's causal, document-masked attention: the first token of its document) is >= every visible
key's (ties go to it), decided from the logits where the row max is computed, the same on the
xla, chunked and Pallas paths. Probabilities cannot decide it: exp rounding can merge a
near-tie, and a softmax-1 row that underflows to all zeros is all ties. So both model-level
sources take every counted query's hit from those logit-decided flags; the "probs" source reads
only the mass from the probabilities. The two sources therefore count the same hits on the same
queries, every document included (documents are runs of equal segment ids, as packed data
yields them: the first token of a run is the first key its queries may see).

Example:
  >>> m = outlier_metrics(model, tokens_bt)                         # doctest: +SKIP
  >>> m["first_token_attention"], m["kurtosis_rest"]                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softmax_one_jax.analysis import extreme_tokens
from softmax_one_jax.analysis.layout import attention_intermediates, first_token_chance
from softmax_one_jax.analysis.sums import (Sums, combine_sums, first_token_sums_from_flags,
                                           first_token_sums_from_probs, hidden_state_sums,
                                           nll_sums, token_kurtosis)
from softmax_one_jax.data import BATCH_KEYS
from softmax_one_jax.models.intermediates import with_intermediates

# The kurtosis this module's docstring defines, importable from here too.
__all__ = ["OutlierReport", "evaluate_sums", "finalize", "model_batch_sums", "outlier_metrics",
           "stack_batches", "token_kurtosis"]


def model_batch_sums(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    outliers: bool = True,
    attention: str = "probs",
) -> Sums:
  """All sums for one batch: one forward pass with the intermediates the metrics need.

  Args:
    model: a ``softmax_one_jax.models.Transformer`` (or a model whose layers sow the same
      intermediates; see ``models.intermediates``).
    batch: ``inputs`` ``[B, T]``; optional ``targets``, ``weights``, ``segment_ids``, ``positions``
      (``[B, T]``, as ``softmax_one_jax.data`` yields them). Without ``targets`` no perplexity.
    outliers: also compute the hidden-state and attention metrics (else logits only).
    attention: "probs" (the ``attention_probs`` intermediate for the mass, with the
      ``attention_stats`` flags deciding every query's hit), "stats" (the ``attention_stats``
      intermediate, no ``T x T`` array: ``argmax_first`` and ``prob_first`` of
      ``attention.first_token_stats``, each ``[L, B, N, T]``) or "none" (no first-token
      metrics); see ``layout.ATTENTION_SOURCES``.

  Returns:
    A dict of sums (see ``sums.hidden_state_sums``, ``sums.first_token_sums_from_probs``,
    ``sums.nll_sums``).
  """
  wanted = attention_intermediates(attention)  # an unknown source fails here
  tokens_bt = batch["inputs"]
  seg_bt = batch.get("segment_ids")
  kwargs = {"segment_ids": seg_bt, "positions": batch.get("positions")}
  sums: Sums = {}
  if outliers:
    logits_btv, inter = with_intermediates(model, tokens_bt, wanted, **kwargs)
    sums.update(hidden_state_sums(inter["hidden"], seg_bt))
    if attention == "probs":
      sums.update(first_token_sums_from_probs(inter["attention_probs"], seg_bt,
                                              inter["attention_stats"]["argmax_first"]))
    elif attention == "stats":  # the model's attention_stats: attention.first_token_stats
      st = inter["attention_stats"]
      sums.update(first_token_sums_from_flags(st["argmax_first"], st["prob_first"], seg_bt))
  else:
    logits_btv = model(tokens_bt, **kwargs)
  if batch.get("targets") is not None:
    sums.update(nll_sums(logits_btv, batch["targets"], batch.get("weights")))
  return sums


@functools.partial(jax.jit, static_argnames=("graphdef", "outliers", "attention"))
def _scan_sums(graphdef, state, stacked, *, outliers: bool, attention: str) -> Sums:
  def one(batch):
    model = nnx.merge(graphdef, state)
    return model_batch_sums(model, batch, outliers=outliers, attention=attention)

  # Zeros are the identity of both + and max (|x| >= 0): the model is traced once, in the body.
  first = jax.tree.map(lambda x: x[0], stacked)
  init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, first))

  def body(carry, batch):
    return combine_sums(carry, one(batch)), None

  out, _ = jax.lax.scan(body, init, stacked)
  return out


def stack_batches(
    batches: Iterable[Mapping[str, Any]], num_batches: int | None = None
) -> dict[str, np.ndarray]:
  """Stacks up to ``num_batches`` batches (dicts of ``[B, T]`` arrays) into ``[NB, B, T]`` arrays.

  Only the keys the metrics read are kept (``inputs``, ``targets``, ``weights``,
  ``segment_ids``, ``positions``).

  Example:
    >>> stack_batches([{"inputs": np.zeros((2, 4), np.int32)}] * 3)["inputs"].shape
    (3, 2, 4)
  """
  rows: list[dict[str, np.ndarray]] = []
  for batch in batches:
    if num_batches is not None and len(rows) >= num_batches:
      break
    if "inputs" not in batch:
      raise ValueError(f"a batch needs an 'inputs' entry; got keys {sorted(batch)}.")
    rows.append({k: np.asarray(batch[k]) for k in BATCH_KEYS if batch.get(k) is not None})
  if not rows:
    raise ValueError("no batches to evaluate: the validation iterator yielded nothing.")
  keys = set(rows[0])
  if any(set(r) != keys for r in rows):
    raise ValueError("every batch must carry the same entries (inputs, targets, ...).")
  return {k: np.stack([r[k] for r in rows]) for k in sorted(keys)}


def evaluate_sums(
    model: nnx.Module,
    batches: Iterable[Mapping[str, Any]] | Mapping[str, Any],
    *,
    num_batches: int | None = None,
    outliers: bool = True,
    attention: str = "probs",
) -> Sums:
  """Runs ``model_batch_sums`` over many batches in one jitted ``lax.scan``; returns the totals.

  Args:
    model: the Transformer.
    batches: an iterable of batches (dicts of ``[B, T]`` arrays), or one already stacked dict of
      ``[NB, B, T]`` arrays (see ``stack_batches``).
    num_batches: take at most this many from the iterable.
    outliers: compute the outlier metrics (else only the perplexity sums).
    attention: see ``model_batch_sums``.

  Returns:
    Host (numpy) sums; pass them to ``finalize``.
  """
  if isinstance(batches, Mapping):
    stacked = {k: np.asarray(v) for k, v in batches.items() if k in BATCH_KEYS}
  else:
    stacked = stack_batches(batches, num_batches)
  graphdef, state = nnx.split(model)
  sums = _scan_sums(graphdef, state, stacked, outliers=outliers, attention=attention)
  return jax.tree.map(np.asarray, sums)


@dataclasses.dataclass
class OutlierReport:
  """Finalised metrics: scalars in ``scalars`` and per-layer / per-head / per-channel arrays.

  Attributes:
    scalars: ``perplexity``, ``first_token_attention``, ``first_token_prob``, ``kurtosis_first``,
      ``kurtosis_rest``, ``max_abs_first``, ``max_abs_rest`` (those that were computed).
    per_layer: ``[L]`` arrays: ``first_token_attention``, ``first_token_prob``,
      ``kurtosis_first``, ``kurtosis_rest``, ``max_abs_first``, ``max_abs_rest``.
    per_head: ``[L, N]`` arrays: ``first_token_attention``, ``first_token_prob``.
    per_channel: ``[L, D]`` arrays: ``max_abs_first``, ``max_abs_rest``.
  """

  scalars: dict[str, float]
  per_layer: dict[str, np.ndarray]
  per_head: dict[str, np.ndarray]
  per_channel: dict[str, np.ndarray]

  def to_json(self) -> dict[str, Any]:
    """A JSON-serialisable dict (arrays as nested lists)."""
    return {
        "scalars": dict(self.scalars),
        "per_layer": {k: np.asarray(v).tolist() for k, v in self.per_layer.items()},
        "per_head": {k: np.asarray(v).tolist() for k, v in self.per_head.items()},
        "per_channel": {k: np.asarray(v).tolist() for k, v in self.per_channel.items()},
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "OutlierReport":
    """Inverse of ``to_json``."""
    arr = lambda m: {k: np.asarray(v, np.float64) for k, v in m.items()}
    return cls(dict(d["scalars"]), arr(d["per_layer"]), arr(d["per_head"]), arr(d["per_channel"]))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def finalize(sums: Mapping[str, Any]) -> OutlierReport:
  """Turns summed statistics (one batch's or many) into the reported means.

  Example:
    >>> s = nll_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))
    >>> round(finalize(s).scalars["perplexity"], 3)
    4.0
  """
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  scalars: dict[str, float] = {}
  per_layer: dict[str, np.ndarray] = {}
  per_head: dict[str, np.ndarray] = {}
  per_channel: dict[str, np.ndarray] = {}
  if "nll" in s:
    mean_nll = float(_ratio(s["nll"], s["nll_weight"]))
    scalars["nll"] = mean_nll
    scalars["perplexity"] = float(np.exp(mean_nll))
  if "ft_hits" in s:
    for name, key in (("first_token_attention", "ft_hits"), ("first_token_prob", "ft_mass")):
      per_head[name] = _ratio(s[key], s["ft_count"])
      per_layer[name] = _ratio(s[key].sum(-1), s["ft_count"].sum(-1))
      scalars[name] = float(_ratio(s[key].sum(), s["ft_count"].sum()))
  if "kurt_first" in s:
    for part in ("first", "rest"):
      per_layer[f"kurtosis_{part}"] = _ratio(s[f"kurt_{part}"], s[f"n_{part}"])
      per_layer[f"max_abs_{part}"] = s[f"max_{part}"]
      per_channel[f"max_abs_{part}"] = s[f"max_chan_{part}"]
      scalars[f"kurtosis_{part}"] = float(np.mean(per_layer[f"kurtosis_{part}"]))
      scalars[f"max_abs_{part}"] = float(np.mean(s[f"max_{part}"]))
  return OutlierReport(scalars, per_layer, per_head, per_channel)


def outlier_metrics(
    model: nnx.Module,
    tokens_bt: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    targets: jax.Array | None = None,
    weights: jax.Array | None = None,
    attention: str = "probs",
    trigger_positions: jax.Array | None = None,
    per_layer: bool = False,
) -> dict[str, Any]:
  """The paper's outlier metrics and the extreme-token metrics of one batch, as floats.

  ``first_token_attention`` is the share of counted queries (every document's, each document's
  first query and padding excepted) whose first-token argmax flag, decided from the logits, is
  set: the same on every ``attention`` source and the same number ``softmax-one analyze``
  reports. ``first_token_chance`` is its chance level on this token layout
  (``layout.first_token_chance``). ``first_token_mass`` is the same mean as
  ``first_token_prob``; it comes with the trigger split.

  Args:
    model: the Transformer.
    tokens_bt: ``[B, T]`` int tokens.
    segment_ids: optional ``[B, T]`` document ids (0 = padding).
    positions: optional ``[B, T]`` positions within each document.
    targets: optional ``[B, T]`` next tokens; adds ``perplexity`` and ``nll``.
    weights: optional ``[B, T]`` target weights.
    attention: "probs", "stats" or "none" (see ``model_batch_sums``).
    trigger_positions: optional ``[B, T]`` bool; adds ``first_token_mass_trigger`` and
      ``first_token_mass_non_trigger``.
    per_layer: also return the ``*_per_layer`` lists (else floats only, as training logs them).

  Returns:
    ``first_token_attention``, ``first_token_prob`` (and ``first_token_chance`` unless
    ``attention="none"``), ``kurtosis_first``, ``kurtosis_rest``,
    ``max_abs_first``, ``max_abs_rest``, ``first_token_mass``, ``sink_rate``, ``null_mass``
    (softmax-1, learned sinks), ``value_drain_ratio``, ``residual_peak_ratio`` (and
    ``perplexity``, ``nll`` with targets; see ``extreme_tokens`` for the definitions).

  Example:
    >>> m = outlier_metrics(model, jnp.zeros((2, 16), jnp.int32))   # doctest: +SKIP
  """
  batch = {"inputs": tokens_bt, "segment_ids": segment_ids, "positions": positions,
           "targets": targets, "weights": weights}
  batch = {k: jnp.asarray(v)[None] for k, v in batch.items() if v is not None}
  out: dict[str, Any] = dict(finalize(evaluate_sums(model, batch, attention=attention)).scalars)
  if "first_token_attention" in out:
    b, t = jnp.shape(tokens_bt)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    out["first_token_chance"] = float(first_token_chance(seg, b, t))
  extreme = extreme_tokens.extreme_token_metrics(
      model, tokens_bt, segment_ids, positions=positions, trigger_positions=trigger_positions,
      attention=attention)
  # extreme_tokens' first_token_attention is the same share of the same flags: keep this one.
  out.update({k: v for k, v in extreme.items()
              if k != "first_token_attention" and (per_layer or not k.endswith("_per_layer"))})
  return out
