"""The training-side view of the data: a fixed number of data shards, whatever the process count.

``softmax_one_jax.data.build_train_iterator`` gives one process the rows of its own shard of the
documents. To make a run's global batches independent of how many processes read them (so a
2-process run reproduces a 1-process run, and a run resumes on another process count),
training fixes ``config.data_shards`` (0 = the process count): the global batch is the
concatenation of one ``B / data_shards``-row batch per shard, and process ``p`` reads shards
``p * k ... (p + 1) * k - 1`` with ``k = data_shards / process_count``.

A checkpoint holds one iterator state per shard (``training.checkpoint`` writes
``data/shard_{s}-of-{S}.json``), so any process count that divides ``data_shards`` restores it:
each process sets the states of the shards it reads (``shard_ids``, ``set_shard_states``).

Example:
  >>> it = ShardedIterator(config, tokenizer, process_index=0, process_count=1)
  >>> next(it)["inputs"].shape          # this process's rows, [B / process_count, T]
  (16, 128)
  >>> it.shard_ids, it.num_shards       # config.data_shards == 2, one process
  ((0, 1), 2)
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

  Attributes:
    shard_ids: the data shards this process reads, in batch order (``(2, 3)`` for process 1 of 2
      with ``config.data_shards == 4``).
    num_shards: ``config.data_shards`` resolved (S).

  ``get_shard_states()`` gives one JSON-able Grain iterator state per shard of ``shard_ids``;
  ``set_shard_states(states)`` continues exactly where they were taken, whichever process count
  took them (``training.checkpoint`` saves and restores them, one file per shard).
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any, process_index: int,
               process_count: int):
    self.num_shards = num_data_shards(config, process_count)
    per_process = self.num_shards // process_count
    self.shard_ids = tuple(range(process_index * per_process, (process_index + 1) * per_process))
    self._iterators = [
        build_train_iterator(config.data, tokenizer=tokenizer, seq_len=config.seq_len,
                             global_batch_size=config.global_batch_size, seed=config.seed,
                             process_index=shard, process_count=self.num_shards)
        for shard in self.shard_ids]

  def __iter__(self) -> "ShardedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

  def get_shard_states(self) -> list[Any]:
    """One JSON-able iterator state per shard of ``shard_ids``, in that order."""
    return [it.get_state() for it in self._iterators]

  def set_shard_states(self, states: list[Any]) -> None:
    """Continues each shard of ``shard_ids`` from its state (as ``get_shard_states`` gave it)."""
    if len(states) != len(self._iterators):
      raise ConfigError(
          f"The checkpoint's data state has {len(states)} shard(s) for this process but it reads "
          f"{len(self._iterators)} (config.data_shards={self.num_shards}); resume with the "
          "config.data_shards of the run that saved it.")
    for it, s in zip(self._iterators, states):
      it.set_state(s)
