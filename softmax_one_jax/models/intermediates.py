"""What a model records while it runs, for analysis: a sow config and the call that collects it.

The layers record intermediates with ``nnx.sow`` when their ``sow_config`` asks for them, as
flax's gemma does; every flag is off in a model as built, so training never records anything.
``with_intermediates`` switches flags on in a view of the model (the parameters are shared, not
copied), runs the one forward pass, pops the ``nnx.Intermediate`` state and stacks it by layer.

What each name holds, per layer ``l`` (stacked to a leading ``[L]`` axis):

* ``hidden``: the block's output ``[B, T, D]``, float32.
* ``values``: the value states attention mixes, ``[B, T, K * H]``, float32 (values take no
  rotary embedding).
* ``attention_probs``: ``[B, N, T, T]`` float32, from the reference attention path, the one that
  forms the probabilities.
* ``attention_stats``: a dict of first-token statistics, each ``[B, N, T]``: ``prob_first``,
  ``argmax_first`` and, for softmax-1 and learned sinks, ``null_mass``; no ``T x T`` buffer.

Example:
  >>> logits, inter = with_intermediates(model, tokens_bt, ("hidden", "attention_stats"))
  >>> inter["hidden"].shape                      # [L, B, T, D]
  (2, 1, 16, 128)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

@dataclasses.dataclass(frozen=True)
class SowConfig:
  """Which intermediates the layers record (``nnx.sow``); all off by default.

  Attributes:
    hidden: each block's output.
    values: each attention layer's value states.
    attention_probs: each attention layer's probabilities (switches it to the reference path).
    attention_stats: each attention layer's first-token statistics.
  """

  hidden: bool = False
  values: bool = False
  attention_probs: bool = False
  attention_stats: bool = False

  @classmethod
  def of(cls, names: Iterable[str]) -> "SowConfig":
    """The config that records exactly ``names`` (a subset of ``INTERMEDIATES``).

    Example:
      >>> SowConfig.of(["hidden"])
      SowConfig(hidden=True, values=False, attention_probs=False, attention_stats=False)
    """
    names = tuple(names)
    unknown = sorted(set(names) - set(INTERMEDIATES))
    if unknown:
      raise ValueError(f"unknown intermediates {unknown}; expected some of {INTERMEDIATES}.")
    return cls(**{name: True for name in names})


# The names ``with_intermediates`` accepts: SowConfig's fields.
INTERMEDIATES = tuple(field.name for field in dataclasses.fields(SowConfig))


def sowing(model: nnx.Module, sow_config: SowConfig) -> nnx.Module:
  """A view of ``model`` whose layers record what ``sow_config`` names.

  The view shares the parameters (``nnx.split`` then ``nnx.merge``: no array is copied) and
  leaves ``model`` as it was. Modules without a ``sow_config`` attribute are left alone.

  Example:
    >>> view = sowing(model, SowConfig(hidden=True))
    >>> logits = view(tokens_bt)
    >>> nnx.pop(view, nnx.Intermediate)          # the recorded block outputs
  """
  view = nnx.merge(*nnx.split(model))
  view.set_attributes(sow_config=sow_config, raise_if_not_found=False)
  return view


def stack_by_layer(recorded: nnx.State) -> dict[str, Any]:
  """``{name: [L, ...]}`` from popped ``nnx.Intermediate`` state, layers in path order.

  Each recorded value is the one-element tuple ``nnx.sow`` keeps; a name recorded by several
  layers is stacked along a new leading axis in the order of the layers' paths (``blocks.0``,
  ``blocks.1``, ...).
  """
  by_name: dict[str, list[tuple[tuple[Any, ...], Any]]] = {}
  for path, variable in nnx.to_flat_state(recorded):
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    by_name.setdefault(str(path[-1]), []).append((tuple(path[:-1]), value[-1]))
  out = {}
  for name, entries in by_name.items():
    entries.sort(key=lambda e: [(isinstance(p, str), p) for p in e[0]])  # blocks.2 < blocks.10
    out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *[value for _, value in entries])
  return out


def with_intermediates(
    model: nnx.Module,
    tokens_bt: jax.Array,
    names: Iterable[str],
    **call_kwargs: Any,
) -> tuple[jax.Array, dict[str, Any]]:
  """Runs ``model(tokens_bt, **call_kwargs)`` once and returns ``(logits, intermediates)``.

  Args:
    model: a ``Transformer`` (or any model whose layers carry a ``sow_config``).
    tokens_bt: int ``[B, T]``.
    names: which of ``INTERMEDIATES`` to record.
    **call_kwargs: passed to the model (``positions=``, ``segment_ids=``).

  Returns:
    The model's float32 logits ``[B, T, V]`` and ``{name: [L, ...]}`` (see the module docstring).

  Example:
    >>> _, inter = with_intermediates(model, tokens_bt, ["attention_probs"], segment_ids=seg_bt)
    >>> inter["attention_probs"].shape          # [L, B, N, T, T]
  """
  view = sowing(model, SowConfig.of(names))
  logits_btv = view(tokens_bt, **call_kwargs)
  return logits_btv, stack_by_layer(nnx.pop(view, nnx.Intermediate))
