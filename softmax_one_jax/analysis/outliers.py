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

Everything is computed as *sums* (``batch_sums``) that add up over batches and are turned into
means once at the end (``finalize``), so many validation batches run in one jitted ``lax.scan``
(``evaluate``). Two sources for the attention statistics: the ``[L, B, N, T, T]`` probabilities
(``first_token_sums_from_probs``) or per-query statistics from
``softmax_one_jax.attention.first_token_stats`` / ``attention_stats``
(``first_token_sums_from_flags`` / ``first_token_sums_from_stats``) that need no ``T x T`` array.

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
from softmax_one_jax.analysis.layout import counted_queries, document_layout, first_token_chance
from softmax_one_jax.models.loss import weighted_cross_entropy

Sums = dict[str, jax.Array]
ATTENTION_SOURCES = ("probs", "stats", "none")


# ----------------------------------------------------------------------------------------------
# Per-batch sums. Each returns arrays whose sum (or max, for "max_" keys) over batches is exact.


def first_token_sums_from_probs(
    probs_lbnts: jax.Array,
    segment_ids_bt: jax.Array | None = None,
    argmax_first_lbnt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from attention probabilities.

  A query's hit: with ``argmax_first_lbnt``, its flag (its first visible key, the first token
  of its document, has a logit >= every visible logit, ties to it:
  ``attention.first_token_stats``); without, ``argmax`` over its probabilities names its
  document's first token (ties go to the earliest key, so a near-tie that exp rounding merged
  counts as a hit, and a row of all-zero probabilities names key 0). The mass is always the
  probability on the document's first token.

  Args:
    probs_lbnts: ``[L, B, N, T, T]`` attention probabilities (rows may sum to < 1: softmax-1).
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).
    argmax_first_lbnt: optional ``[L, B, N, T]`` bool, the logit-decided first-key argmax flags
      of the same attention; they decide every query's hit.

  Returns:
    ``ft_hits`` ``[L, N]`` (queries whose argmax key is their first token), ``ft_mass`` ``[L, N]``
    (summed probability on the first token) and ``ft_count`` ``[L, N]`` (queries counted).

  Example:
    >>> p = jnp.tril(jnp.ones((4, 4)))[None, None, None] / jnp.arange(1, 5)[:, None]
    >>> first_token_sums_from_probs(p)["ft_count"].tolist()
    [[3.0]]
  """
  _, b, n, t, _ = probs_lbnts.shape
  first_key_bt, counted_bt = counted_queries(segment_ids_bt, b, t)
  key_idx = first_key_bt[None, :, None, :, None]
  mass_lbnt = jnp.take_along_axis(probs_lbnts, key_idx, axis=-1)[..., 0].astype(jnp.float32)
  if argmax_first_lbnt is None:
    hit_lbnt = jnp.argmax(probs_lbnts, axis=-1) == first_key_bt[None, :, None, :]
  else:
    hit_lbnt = argmax_first_lbnt
  w_lbnt = jnp.broadcast_to(counted_bt[None, :, None, :], hit_lbnt.shape).astype(jnp.float32)
  return {
      "ft_hits": jnp.sum(hit_lbnt * w_lbnt, axis=(1, 3)),
      "ft_mass": jnp.sum(mass_lbnt * w_lbnt, axis=(1, 3)),
      "ft_count": jnp.sum(w_lbnt, axis=(1, 3)),
  }


def first_token_sums_from_stats(
    first_logit_lbnt: jax.Array,
    row_max_lbnt: jax.Array,
    lse_lbnt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from per-query kernel statistics (no ``T x T`` array).

  Tie rule: the query's first visible key (the first token of its document) is the argmax iff
  ``first_logit >= row_max`` (ties go to it, as ``argmax`` does). ``attention.attention_stats``
  returns its three arrays so that this comparison reproduces the decision its implementation
  made from the scores themselves (see its docstring); arrays from elsewhere should come from
  one computation of the logits. The probability is ``exp(first_logit - lse)`` where ``lse`` is
  the row's log-normaliser (for softmax-1 it includes the virtual zero logit,
  ``log(1 + sum exp)``; for learned sinks the head's sink logit).

  ``softmax_one_jax.attention.attention_stats`` gives the logit on each query's first visible
  key, which under causal attention with ``segment_ids`` is the first token of its document:
  every document's queries are counted, as in ``first_token_sums_from_probs``.

  Args:
    first_logit_lbnt: ``[L, B, N, T]`` logit of each query on its first visible key.
    row_max_lbnt: ``[L, B, N, T]`` maximum logit over the visible keys (not counting the null key).
    lse_lbnt: ``[L, B, N, T]`` log-normaliser of each row.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding).

  Returns:
    The same ``ft_hits`` / ``ft_mass`` / ``ft_count`` ``[L, N]`` sums as
    ``first_token_sums_from_probs``.

  Example:
    >>> z = jnp.zeros((1, 1, 1, 3))
    >>> first_token_sums_from_stats(z, z, z)["ft_hits"].tolist()
    [[2.0]]
  """
  first = first_logit_lbnt.astype(jnp.float32)
  seen = ~jnp.isneginf(first)
  hit_lbnt = seen & (first >= row_max_lbnt.astype(jnp.float32))
  log_mass = jnp.where(seen, first - lse_lbnt.astype(jnp.float32), 0.0)
  mass_lbnt = jnp.where(seen, jnp.exp(log_mass), 0.0)
  return first_token_sums_from_flags(hit_lbnt, mass_lbnt, segment_ids_bt)


def first_token_sums_from_flags(
    argmax_first_lbnt: jax.Array,
    prob_first_lbnt: jax.Array,
    segment_ids_bt: jax.Array | None = None,
) -> Sums:
  """First-token attention sums from per-query flags (``attention.first_token_stats`` output).

  Nothing is decided here: the flags carry the tie rule of ``attention.stats`` (the query's
  first visible key's score >= every visible key's, ties to it), decided where the row max was
  computed.

  Args:
    argmax_first_lbnt: ``[L, B, N, T]`` bool, the query's first visible key (the first token of
      its document) is its argmax.
    prob_first_lbnt: ``[L, B, N, T]`` probability on that key.
    segment_ids_bt: optional ``[B, T]`` document ids (0 = padding); every document's queries
      count except its first (``layout.counted_queries``).

  Returns:
    ``ft_hits`` / ``ft_mass`` / ``ft_count`` ``[L, N]``.

  Example:
    >>> s = first_token_sums_from_flags(jnp.ones((1, 1, 1, 3), bool), jnp.ones((1, 1, 1, 3)))
    >>> s["ft_count"].tolist()
    [[2.0]]
  """
  _, b, _, t = argmax_first_lbnt.shape
  _, counted_bt = counted_queries(segment_ids_bt, b, t)
  w_lbnt = jnp.broadcast_to(counted_bt[None, :, None, :], argmax_first_lbnt.shape)
  w_lbnt = w_lbnt.astype(jnp.float32)
  return {
      "ft_hits": jnp.sum(argmax_first_lbnt.astype(jnp.float32) * w_lbnt, axis=(1, 3)),
      "ft_mass": jnp.sum(prob_first_lbnt.astype(jnp.float32) * w_lbnt, axis=(1, 3)),
      "ft_count": jnp.sum(w_lbnt, axis=(1, 3)),
  }


def token_kurtosis(x_td: jax.Array) -> jax.Array:
  """Raw fourth standardised moment over the last axis: ``E[(x - mu)^4] / sigma^4``.

  Computed in float32 as ``mean(z^4)`` with ``z = (x - mu) / sigma`` (no ``x^4`` overflow). A
  constant vector (``sigma = 0``) gives 0.

  Args:
    x_td: ``[..., D]``.

  Returns:
    ``[...]`` kurtosis (about 3 for a Gaussian vector, up to ``D`` for one spike).

  Example:
    >>> float(token_kurtosis(jnp.array([0.0, 0.0, 0.0, 4.0])))  # one spike: D - 2 + 1/(D-1)
    2.333...
  """
  x = x_td.astype(jnp.float32)
  c = x - jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(c * c, axis=-1, keepdims=True)
  safe = jnp.where(var > 0, var, 1.0)
  z = c * jax.lax.rsqrt(safe)
  return jnp.where(var[..., 0] > 0, jnp.mean(z**4, axis=-1), 0.0)


def hidden_state_sums(hidden_lbtd: jax.Array, segment_ids_bt: jax.Array | None = None) -> Sums:
  """Kurtosis and max |activation| sums of block outputs, first tokens vs the rest.

  Args:
    hidden_lbtd: ``[L, B, T, D]`` block outputs (residual stream after each block).
    segment_ids_bt: optional ``[B, T]`` document ids; "first" = a document's first token.

  Returns:
    ``kurt_first`` / ``kurt_rest`` ``[L]`` (summed per-token kurtosis), ``n_first`` / ``n_rest``
    (token counts, scalars), ``max_first`` / ``max_rest`` ``[L]`` (max |x|) and
    ``max_chan_first`` / ``max_chan_rest`` ``[L, D]`` (max |x| per channel).

  Example:
    >>> s = hidden_state_sums(jnp.ones((2, 1, 3, 8)))
    >>> float(s["n_first"]), float(s["n_rest"])
    (1.0, 2.0)
  """
  _, b, t, _ = hidden_lbtd.shape
  _, is_first_bt, valid_bt = document_layout(segment_ids_bt, b, t)
  first_bt = is_first_bt.astype(jnp.float32)
  rest_bt = (valid_bt & ~is_first_bt).astype(jnp.float32)
  kurt_lbt = token_kurtosis(hidden_lbtd)
  abs_lbtd = jnp.abs(hidden_lbtd.astype(jnp.float32))

  def chan_max(w_bt):
    return jnp.max(jnp.where(w_bt[None, :, :, None] > 0, abs_lbtd, 0.0), axis=(1, 2))

  max_chan_first, max_chan_rest = chan_max(first_bt), chan_max(rest_bt)
  return {
      "kurt_first": jnp.sum(kurt_lbt * first_bt[None], axis=(1, 2)),
      "kurt_rest": jnp.sum(kurt_lbt * rest_bt[None], axis=(1, 2)),
      "n_first": jnp.sum(first_bt),
      "n_rest": jnp.sum(rest_bt),
      "max_first": jnp.max(max_chan_first, axis=-1),
      "max_rest": jnp.max(max_chan_rest, axis=-1),
      "max_chan_first": max_chan_first,
      "max_chan_rest": max_chan_rest,
  }


def nll_sums(
    logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array | None = None
) -> Sums:
  """Summed next-token negative log-likelihood (ordinary softmax over the vocabulary).

  Args:
    logits_btv: ``[B, T, V]``.
    targets_bt: ``[B, T]`` int target ids.
    weights_bt: optional ``[B, T]`` target weights (0 = ignore); all ones by default.

  Returns:
    ``nll`` (weighted sum) and ``nll_weight`` (sum of weights), scalars.

  Example:
    >>> s = nll_sums(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2), jnp.int32))
    >>> float(jnp.exp(s["nll"] / s["nll_weight"]))  # uniform over 4 tokens
    4.0...
  """
  if weights_bt is None:
    weights_bt = jnp.ones(targets_bt.shape, jnp.float32)
  nll, weight = weighted_cross_entropy(logits_btv, targets_bt, weights_bt)
  return {"nll": nll, "nll_weight": weight}


def combine_sums(a: Sums, b: Sums) -> Sums:
  """Adds two batches' sums (maximum for the ``max_*`` entries).

  Example:
    >>> c = combine_sums({"n_rest": 1.0, "max_rest": 2.0}, {"n_rest": 2.0, "max_rest": 1.0})
    >>> float(c["n_rest"]), float(c["max_rest"])
    (3.0, 2.0)
  """
  if set(a) != set(b):
    raise ValueError(f"cannot combine sums with different entries: {sorted(a)} vs {sorted(b)}.")
  return {k: (jnp.maximum if k.startswith("max_") else jnp.add)(a[k], b[k]) for k in a}


# ----------------------------------------------------------------------------------------------
# Model-facing pieces.


def model_batch_sums(
    model: nnx.Module,
    batch: Mapping[str, jax.Array],
    *,
    outliers: bool = True,
    attention: str = "probs",
) -> Sums:
  """All sums for one batch: one forward pass with the intermediates the metrics need.

  Args:
    model: a ``softmax_one_jax.models.Transformer`` (or anything with its call signature).
    batch: ``inputs`` ``[B, T]``; optional ``targets``, ``weights``, ``segment_ids``, ``positions``
      (``[B, T]``, as ``softmax_one_jax.data`` yields them). Without ``targets`` no perplexity.
    outliers: also compute the hidden-state and attention metrics (else logits only).
    attention: "probs" (the ``attention_probs`` intermediate for the mass, with the
      ``attention_stats`` flags deciding every query's hit),
      "stats" (the ``attention_stats`` intermediate, no ``T x T`` array: a dict of
      ``argmax_first`` and ``prob_first``, or of ``first_logit``, ``row_max`` and ``lse``, each
      ``[L, B, N, T]``) or "none" (no first-token metrics).

  Returns:
    A dict of sums (see ``hidden_state_sums``, ``first_token_sums_from_probs``, ``nll_sums``).
  """
  if attention not in ATTENTION_SOURCES:
    raise ValueError(f"attention={attention!r} is not known; expected one of {ATTENTION_SOURCES}.")
  tokens_bt = batch["inputs"]
  seg_bt = batch.get("segment_ids")
  kwargs = {"segment_ids": seg_bt, "positions": batch.get("positions")}
  sums: Sums = {}
  if outliers:
    # The probabilities path also takes the logit-decided flags: probabilities cannot break ties.
    wanted = ("hidden",) + {"probs": ("attention_probs", "attention_stats"),
                            "stats": ("attention_stats",), "none": ()}[attention]
    logits_btv, inter = model(tokens_bt, intermediates=wanted, **kwargs)
    sums.update(hidden_state_sums(inter["hidden"], seg_bt))
    if attention == "probs":
      sums.update(first_token_sums_from_probs(inter["attention_probs"], seg_bt,
                                              inter["attention_stats"]["argmax_first"]))
    elif attention == "stats":
      st = inter["attention_stats"]
      if "argmax_first" in st:  # attention.first_token_stats, stacked over layers
        sums.update(first_token_sums_from_flags(st["argmax_first"], st["prob_first"], seg_bt))
      else:  # attention.attention_stats: (lse, row_max, first_logit), stacked over layers
        sums.update(
            first_token_sums_from_stats(st["first_logit"], st["row_max"], st["lse"], seg_bt))
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


_BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


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
    rows.append({k: np.asarray(batch[k]) for k in _BATCH_KEYS if batch.get(k) is not None})
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
    stacked = {k: np.asarray(v) for k, v in batches.items() if k in _BATCH_KEYS}
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
