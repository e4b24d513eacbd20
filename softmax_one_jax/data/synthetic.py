"""Grain datasets of the ``bigram_backcopy`` source: sequences generated on the fly, never read.

Every row is one whole sequence (``bigram_backcopy.sample_sequences``): ``inputs = x[:-1]``,
``targets = x[1:]``, ``segment_ids`` 1, ``positions`` ``0 .. T-1`` and ``weights`` 1 everywhere.

Training step ``s`` of a global batch of ``B`` rows holds the training stream's examples
``s * B .. s * B + B - 1``; process (data shard) ``p`` of ``P`` holds rows
``p * b .. (p + 1) * b - 1`` of it, ``b = B / P``. The concatenated global batch is therefore the
same for any number of processes or data shards. The grain state is the step counter, so
``get_state`` / ``set_state`` (also through JSON) resume exactly.

The held-out batches come from the validation stream (``VALIDATION_STREAM``, seed 0): the same
sequences for every run of a task, whatever its seeds, and never a training sequence's uniforms.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from softmax_one_jax.data import corpus
from softmax_one_jax.data.bigram_backcopy import (TRAIN_STREAM, VALIDATION_STREAM,
                                                  BigramBackcopyTask, CharTokenizer,
                                                  char_tokenizer, sample_sequences,
                                                  task_from_documents)
from softmax_one_jax.data.tokens import Batch

SYNTHETIC_SOURCES = ("bigram_backcopy",)
_VALIDATION_SEED = 0


@functools.lru_cache(maxsize=8)
def _task(bb_corpus: str, num_triggers: int) -> BigramBackcopyTask:
  docs = corpus.read_text_documents(bb_corpus) if bb_corpus else corpus.default_documents()
  return task_from_documents(docs, num_triggers)


def task_for_config(cfg: ml_collections.ConfigDict) -> BigramBackcopyTask:
  """The Bigram-Backcopy task of a data config (``bb_corpus``, ``bb_triggers``), cached.

  Example:
    >>> from softmax_one_jax.data import default_data_config
    >>> cfg = default_data_config(); cfg.source = "bigram_backcopy"
    >>> task = task_for_config(cfg)
    >>> [task.chars[i] for i in task.trigger_ids]
    [' ', 'e', 't']
  """
  return _task(str(cfg.get("bb_corpus", "")), int(cfg.get("bb_triggers", 3)))


def tokenizer_for_config(cfg: ml_collections.ConfigDict) -> CharTokenizer:
  """The ``CharTokenizer`` of ``task_for_config(cfg)``."""
  return char_tokenizer(task_for_config(cfg))


def sequences_to_batch(x_nt: np.ndarray) -> Batch:
  """int [n, T + 1] whole sequences -> the contract's five arrays, each [n, T].

  Example:
    >>> sequences_to_batch(np.array([[3, 2, 1, 2]]))["positions"]
    array([[0, 1, 2]], dtype=int32)
  """
  n, t = x_nt.shape[0], x_nt.shape[1] - 1
  return {
      "inputs": x_nt[:, :-1].astype(np.int32),
      "targets": x_nt[:, 1:].astype(np.int32),
      "segment_ids": np.ones((n, t), np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
      "weights": np.ones((n, t), np.float32),
  }


class _StepBatch:
  """Maps a step counter to this shard's rows of that step (a class: worker processes pickle it)."""

  def __init__(self, task: BigramBackcopyTask, seed: int, seq_len: int, batch_size: int,
               global_batch_size: int, first_row: int, bos: bool = True):
    self._task, self._seed, self._seq_len, self._bos = task, seed, seq_len, bos
    self._batch_size, self._global, self._first = batch_size, global_batch_size, first_row

  def __call__(self, step: int) -> Batch:
    start = int(step) * self._global + self._first
    indices = range(start, start + self._batch_size)
    return sequences_to_batch(
        sample_sequences(self._task, self._seed, indices, self._seq_len, TRAIN_STREAM,
                         bos=self._bos))


def _check_tokenizer(cfg: ml_collections.ConfigDict, tokenizer: Any) -> BigramBackcopyTask:
  task = task_for_config(cfg)
  if getattr(tokenizer, "fingerprint", None) != char_tokenizer(task).fingerprint:
    raise ValueError(
        f"data.source={cfg.source!r} generates the ids of its own character tokenizer, but "
        f"{getattr(tokenizer, 'name', tokenizer)!r} was given; pass get_tokenizer(config.data).")
  return task


def train_batches(
    cfg: ml_collections.ConfigDict, tokenizer: Any, seq_len: int, batch_size: int, seed: int,
    process_index: int = 0, process_count: int = 1,
) -> grain.IterDataset:
  """This process's infinite stream of ``[batch_size, seq_len]`` training batches.

  Args:
    cfg: a data config with ``source="bigram_backcopy"``.
    tokenizer: ``get_tokenizer(cfg)`` (checked: the ids must be the task's).
    seq_len: T, targets per row.
    batch_size: b, rows on this process; the global batch is ``b * process_count``.
    seed: the training stream's seed, in ``[0, 2**64)``.
    process_index, process_count: this shard and the number of shards.

  Returns:
    A grain ``IterDataset`` of batches (dicts of numpy arrays, see ``sequences_to_batch``).

  Example:
    >>> from softmax_one_jax.data import default_data_config
    >>> cfg = default_data_config(); cfg.source = "bigram_backcopy"
    >>> ds = train_batches(cfg, tokenizer_for_config(cfg), seq_len=64, batch_size=8, seed=0)
    >>> next(iter(ds))["inputs"].shape
    (8, 64)
  """
  task = _check_tokenizer(cfg, tokenizer)
  fn = _StepBatch(task, seed, seq_len, batch_size, batch_size * process_count,
                  process_index * batch_size, bos=bool(cfg.get("bb_bos", True)))
  ds = grain.MapDataset.range(sys.maxsize).map(fn)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def validation_batches(
    cfg: ml_collections.ConfigDict, tokenizer: Any, seq_len: int, batch_size: int,
    num_batches: int | None = None,
) -> list[Batch]:
  """Held-out batches: sequences ``0, 1, ...`` of the validation stream, in order.

  Args:
    num_batches: exactly this many full batches; None = ``cfg.bb_validation_sequences``
      sequences, the last batch padded with all-zero rows (weight 0).

  Returns:
    A list of dicts with the keys, dtypes and shapes of training batches.

  Example:
    >>> from softmax_one_jax.data import default_data_config
    >>> cfg = default_data_config(); cfg.source = "bigram_backcopy"
    >>> cfg.bb_validation_sequences = 10
    >>> [b["weights"].sum() for b in validation_batches(cfg, tokenizer_for_config(cfg), 16, 8)]
    [np.float32(128.0), np.float32(32.0)]
  """
  task = _check_tokenizer(cfg, tokenizer)
  if num_batches is None:
    total = int(cfg.get("bb_validation_sequences", 1024))
    num_batches = -(-total // batch_size)
  else:
    total = num_batches * batch_size
  batches = []
  for b in range(num_batches):
    indices = range(b * batch_size, min((b + 1) * batch_size, total))
    x_nt = sample_sequences(task, _VALIDATION_SEED, indices, seq_len, VALIDATION_STREAM,
                            bos=bool(cfg.get("bb_bos", True)))
    batch = sequences_to_batch(x_nt)
    pad = batch_size - x_nt.shape[0]
    batches.append({k: np.pad(v, ((0, pad), (0, 0))) for k, v in batch.items()})
  return batches
