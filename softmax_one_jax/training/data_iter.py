"""The training-side view of the data: a fixed number of data shards, whatever the process count.

``softmax_one_jax.data.build_train_iterator`` gives one process the rows of its own shard of the
documents. To make a run's global batches independent of how many processes read them (so a
2-process run reproduces a 1-process run, and a run can resume on a different host count),
training fixes ``config.data_shards`` (0 = the process count): the global batch is the
concatenation of one ``B / data_shards``-row batch per shard, and process ``p`` reads shards
``p * k ... (p + 1) * k - 1`` with ``k = data_shards / process_count``.

Example:
  >>> it = ShardedIterator(config, tokenizer, process_index=0, process_count=1)
  >>> next(it)["inputs"].shape          # this process's rows, [B / process_count, T]
  (16, 128)
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from softmax_one_jax.data import build_train_iterator
from softmax_one_jax.errors import ConfigError


def num_data_shards(config: ml_collections.ConfigDict, process_count: int) -> int:
  """``config.data_shards`` resolved (0 -> process count) and checked."""
  shards = int(config.data_shards or process_count)
  if shards % process_count:
    raise ConfigError(f"config.data_shards={shards} is not a multiple of the process count "
                      f"{process_count}; use a multiple, or 0 for one shard per process.")
  if config.global_batch_size % shards:
    raise ConfigError(f"config.global_batch_size={config.global_batch_size} is not a multiple of "
                      f"config.data_shards={shards}.")
  return shards


class ShardedIterator:
  """This process's data shards as one checkpointable iterator of ``[B / process_count, T]`` rows.

  ``get_state()`` is a JSON-able dict holding every shard's Grain iterator state;
  ``set_state(state)`` continues exactly where that state was taken.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, process_index: int,
               process_count: int):
    shards = num_data_shards(config, process_count)
    per_process = shards // process_count
    self._iterators = [
        build_train_iterator(config.data, tokenizer=tokenizer, seq_len=config.seq_len,
                             global_batch_size=config.global_batch_size, seed=config.seed,
                             process_index=shard, process_count=shards)
        for shard in range(process_index * per_process, (process_index + 1) * per_process)]

  def __iter__(self) -> "ShardedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self._iterators]}

  def set_state(self, state: dict[str, Any]) -> None:
    shards = state.get("shards")
    if shards is None or len(shards) != len(self._iterators):
      raise ConfigError(
          f"The checkpoint's data state has {0 if shards is None else len(shards)} shard(s) for "
          f"this process but the run reads {len(self._iterators)}; resume with the same "
          "config.data_shards (or process count) as the run that saved it.")
    for it, s in zip(self._iterators, shards):
      it.set_state(s)
