"""The Grain pipeline: documents -> token ids -> pieces -> shuffle -> pack (segment ids) -> batches.

Every document ``d`` becomes the framed stream ``[bos] + encode(d) + [eos]`` and, before packing,
its own (input, target) pairs: ``inputs = framed[:-1]``, ``targets = framed[1:]``. Packing puts
several documents into one row and marks them with segment ids ``1, 2, ...`` (0 = padding), so no
target ever comes from another document: ``weights`` is 1.0 exactly where ``segment_ids > 0``. A
document longer than a row continues in another row as a new segment (positions restart at 0) and
loses no pair.

In-memory sources ("default", "text") are tokenised once and cached as ``.npy`` keyed by corpus and
tokenizer hash. Their documents are cut into pieces of at most ``seq_len`` pairs and the *pieces*
are shuffled, so a batch mixes many documents even when documents are much longer than a row.
The ArrayRecord source ("arrayrecord"/"c4") shuffles whole documents (C4's are short) and packs
them the same way.

Order of operations (``build_train_iterator``)::

  MapDataset(pieces)[process_index::process_count]   each process reads only its shard
    .shuffle(seed).repeat()                           a new deterministic permutation each epoch
    .to_iter_dataset()
  ConcatThenSplitIterDataset(length seq_len)          packing; *_segment_ids, *_positions
    .batch(global_batch_size // process_count)
    .map(_finalize)                                   the contract's five arrays
    (mp_prefetch / thread prefetch)

Every stage is a grain dataset, so ``get_state()`` / ``set_state()`` restore exactly, also after
the state went through JSON (grain's ``CheckpointHandler``, Orbax): ``_JsonSafePackIterator`` fixes
grain 0.2.18's packer, whose state otherwise restores to different batches after JSON.

Rows that begin a document begin with BOS (``<|endoftext|>`` for GPT-2/BPE); a row that continues
a long document begins mid-text.

The synthetic source ("bigram_backcopy") generates one whole sequence per row instead of reading
documents (``synthetic.py``); it shares the seeds, the prefetching and the batch contract.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from absl import flags
import grain
from grain.experimental import ConcatThenSplitIterDataset
import ml_collections
import numpy as np

from softmax_one_jax.data import corpus
from softmax_one_jax.data import synthetic
from softmax_one_jax.data import tokenizers as tokenizers_lib
from softmax_one_jax.data.config import check_data_config
from softmax_one_jax.data.tokens import Batch
from softmax_one_jax.data.tokens import PieceSource
from softmax_one_jax.data.tokens import frame_record
from softmax_one_jax.data.tokens import piece_table
from softmax_one_jax.data.tokens import tokenized_documents
from softmax_one_jax.errors import ConfigError, DataError

_METADATA = "metadata.json"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Documents and tokenizer for a config.


def _documents(cfg: ml_collections.ConfigDict) -> list[str]:
  if cfg.source == "default":
    return corpus.default_documents()
  if cfg.source == "text":
    # Configs saved before ``document_separator`` existed read as the default.
    return corpus.read_text_documents(cfg.paths, cfg.get("document_separator", "blank_line"))
  raise ValueError(f"data.source={cfg.source!r} has no in-memory documents.")


def _train_documents(cfg: ml_collections.ConfigDict) -> list[str]:
  docs = _documents(cfg)
  train_idx, _ = corpus.split_train_validation(docs, cfg.validation_fraction)
  return [docs[i] for i in train_idx]


def _is_prepared(cfg: ml_collections.ConfigDict) -> bool:
  return cfg.source in ("arrayrecord", "c4")


def read_metadata(folder: str) -> dict[str, Any]:
  """The ``metadata.json`` of a folder written by ``softmax-one prepare``."""
  path = os.path.join(os.path.expanduser(folder), _METADATA)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: data.paths must be a folder written by `softmax-one prepare` "
        "(e.g. softmax-one prepare --source c4 --output_dir DIR).")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def get_tokenizer(cfg: ml_collections.ConfigDict) -> tokenizers_lib.Tokenizer:
  """The tokenizer named by ``cfg.tokenizer`` (see ``tokenizers.py``).

  The BPE trains on the *training* documents of the configured source (never the held-out ones);
  for a prepared folder it is the ``tokenizer.tiktoken`` that ``prepare`` saved there. The
  "bigram_backcopy" source has its own ``CharTokenizer`` (with ``trigger_ids``), whatever
  ``cfg.tokenizer`` says.

  Example:
    >>> cfg = default_data_config(); cfg.tokenizer = "bpe"; cfg.bpe_vocab_size = 2048
    >>> get_tokenizer(cfg).vocab_size
    2048
  """
  check_data_config(cfg)
  if cfg.source in synthetic.SYNTHETIC_SOURCES:
    return synthetic.tokenizer_for_config(cfg)
  tokenizer_path = cfg.tokenizer_path
  if _is_prepared(cfg) and cfg.tokenizer == "bpe" and not tokenizer_path:
    tokenizer_path = os.path.join(os.path.expanduser(cfg.paths), "tokenizer.tiktoken")
  return tokenizers_lib.make_tokenizer(
      cfg.tokenizer, tokenizer_path=tokenizer_path, bpe_vocab_size=cfg.bpe_vocab_size,
      train_docs=None if _is_prepared(cfg) else (lambda: _train_documents(cfg)),
      cache_dir=cfg.cache_dir or None, bpe_max_train_chars=cfg.bpe_max_train_chars)


# ---------------------------------------------------------------------------------------------
# Datasets.


def _check_prepared_tokenizer(meta: dict[str, Any], tok: tokenizers_lib.Tokenizer) -> None:
  if meta["tokenizer_fingerprint"] != tok.fingerprint:
    raise ConfigError(
        f"The prepared shards were tokenised with {meta['tokenizer']!r} "
        f"(fingerprint {meta['tokenizer_fingerprint'][:12]}), but the tokenizer given is "
        f"{tok.name!r} ({tok.fingerprint[:12]}); set data.tokenizer / data.tokenizer_path to match, "
        "or run `softmax-one prepare` again.")


def _document_dataset(
    cfg: ml_collections.ConfigDict, tok: tokenizers_lib.Tokenizer, seq_len: int, split: str
) -> tuple[grain.MapDataset, grain.ReadOptions]:
  """Pieces (in-memory sources) or framed documents (prepared shards) of one split, unshuffled."""
  if _is_prepared(cfg):
    folder = os.path.expanduser(cfg.paths)
    meta = read_metadata(folder)
    _check_prepared_tokenizer(meta, tok)
    files = [os.path.join(folder, f) for f in meta["splits"][split]["files"]]
    if not files:
      raise DataError(f"{folder} holds no {split} shards; prepare with a validation_fraction > 0.")
    source = grain.sources.ArrayRecordDataSource(files)
    ds = grain.MapDataset.source(source).map(frame_record(tok.bos_id, tok.eos_id, meta["dtype"]))
    return ds, grain.ReadOptions(num_threads=8, prefetch_buffer_size=256)
  texts = _documents(cfg)
  train_idx, val_idx = corpus.split_train_validation(texts, cfg.validation_fraction)
  docs = tokenized_documents(texts, tok, cfg.cache_dir or None)
  doc_ids = train_idx if split == "train" else val_idx
  if not doc_ids:
    raise DataError(
        f"No {split} documents: found {len(texts)} document(s), {len(val_idx)} of them "
        f"held out with data.validation_fraction={cfg.validation_fraction}. To "
        "get more, split one file into documents with data.document_separator='blank_line' (the "
        "default) or a literal separator such as '<|endoftext|>' (it is now "
        f"{cfg.get('document_separator', 'blank_line')!r}), or give more files, or change "
        "data.validation_fraction.")
  starts_p, lens_p = piece_table(docs.starts, doc_ids, seq_len)
  return (grain.MapDataset.source(PieceSource(docs.tokens_n, starts_p, lens_p)),
          grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _finalize(row: Batch) -> Batch:
  """Renames grain's packing outputs to the contract's names and adds ``weights``."""
  segment_ids = row["inputs_segment_ids"].astype(np.int32)
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "segment_ids": segment_ids,
      "positions": row["inputs_positions"].astype(np.int32),
      "weights": (segment_ids > 0).astype(np.float32),
  }


class _JsonSafePackIterator(grain.DatasetIterator):
  """Passes grain's packer through; restores its state after a JSON round trip.

  grain 0.2.18's ``ConcatThenSplit`` state holds ``remainder_slices`` as tuples and compares them
  with ``(-1, -1)``; JSON (grain's own ``CheckpointHandler``, Orbax) turns them into lists, and the
  restored iterator then silently yields different batches. Turning them back into tuples fixes it.
  """

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    state = dict(state)
    state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(state)


class _JsonSafePackIterDataset(grain.IterDataset):

  def __iter__(self) -> _JsonSafePackIterator:
    return _JsonSafePackIterator(self._parent.__iter__())


def pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Packs ``{"inputs", "targets"}`` elements into rows of ``seq_len`` with segment ids.

  Uses grain's ``ConcatThenSplitIterDataset``: elements are concatenated, a row is cut every
  ``seq_len`` tokens and an element that does not fit is split (its tail starts the next row at
  position 0). A finite input ends with one zero-padded row. Output keys: ``inputs``, ``targets``,
  ``{inputs,targets}_segment_ids`` and ``{inputs,targets}_positions``, each [seq_len].
  """
  return _JsonSafePackIterDataset(ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len}, split_full_length_features=False))


def _mix_seed(*seeds: int) -> int:
  """A 32-bit shuffle seed from several ints (grain reseeds epoch ``e`` with ``seed + e``)."""
  return int(np.random.SeedSequence([int(s) % 2**63 for s in seeds]).generate_state(1)[0])


def train_dataset(
    cfg: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer, seq_len: int,
    batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
    num_epochs: int | None = None,
) -> grain.IterDataset:
  """The training ``IterDataset`` (``build_train_iterator`` is ``iter`` of this).

  Args:
    batch_size: rows per batch on this process.
    num_epochs: None = infinite; a number stops after that many passes (for tests and tools).
  """
  check_data_config(cfg)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if cfg.source in synthetic.SYNTHETIC_SOURCES:
    if num_epochs is not None:
      raise ValueError(f"data.source={cfg.source!r} is an endless generated stream without "
                       f"epochs; pass num_epochs=None (got {num_epochs}).")
    batched = synthetic.train_batches(cfg, tokenizer, seq_len, batch_size,
                                      _mix_seed(cfg.shuffle_seed, seed), process_index,
                                      process_count)
  else:
    ds, read_options = _document_dataset(cfg, tokenizer, seq_len, "train")
    if len(ds) < process_count:
      raise ValueError(
          f"{len(ds)} training pieces cannot be sharded over {process_count} processes.")
    ds = ds[process_index::process_count]
    ds = ds.shuffle(_mix_seed(cfg.shuffle_seed, seed)).repeat(num_epochs)
    packed = pack(ds.to_iter_dataset(read_options), seq_len)
    batched = packed.batch(batch_size, drop_remainder=True).map(_finalize)
  if cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app: defaults
      flags.FLAGS.mark_as_parsed()
    batched = batched.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  if cfg.prefetch_buffer_size > 0:
    batched = grain.experimental.ThreadPrefetchIterDataset(
        batched, prefetch_buffer_size=cfg.prefetch_buffer_size)
  return batched


def build_train_iterator(
    cfg: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer, seq_len: int,
    global_batch_size: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator over this process's packed training batches.

  Args:
    cfg: ``default_data_config()``-shaped ConfigDict.
    tokenizer: from ``get_tokenizer(cfg)``.
    seq_len: T, tokens per row.
    global_batch_size: B, rows per step over all processes; this process gets
      ``B // process_count`` rows from its own shard of the documents.
    seed: folded with ``cfg.shuffle_seed`` into the shuffle seed.
    process_index, process_count: ``jax.process_index()``, ``jax.process_count()``.

  Returns:
    A grain ``DatasetIterator``; ``next(it)`` gives a dict of numpy arrays, b = B // process_count:
    ``inputs`` int32 [b, T], ``targets`` int32 [b, T] (the next token of the same document),
    ``segment_ids`` int32 [b, T] (1, 2, ... per packed document, 0 = padding),
    ``positions`` int32 [b, T] (within the segment, from 0), ``weights`` float32 [b, T]
    (1.0 where ``segment_ids > 0``). ``it.get_state()`` is a JSON-able dict;
    ``it.set_state(state)`` on a fresh iterator continues with exactly the same batches.

  Example:
    >>> cfg = default_data_config()
    >>> it = build_train_iterator(cfg, get_tokenizer(cfg), seq_len=128, global_batch_size=8)
    >>> next(it)["inputs"].shape
    (8, 128)
  """
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                     f"process_count={process_count}.")
  return iter(train_dataset(cfg, tokenizer, seq_len, global_batch_size // process_count, seed,
                            process_index, process_count))


def validation_batches(
    cfg: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer, seq_len: int,
    batch_size: int, num_batches: int | None = None,
) -> list[Batch]:
  """Held-out batches: the same list on every call and every process (shard it yourself).

  The held-out documents, in order, unshuffled, packed like the training data. The last batch is
  padded with all-zero rows (weight 0), so every batch is ``[batch_size, seq_len]``.

  Args:
    num_batches: at most this many batches (the first ones); None = all held-out data. Fewer come
      back (with a log line) when the held-out documents run out. The synthetic source gives
      exactly ``num_batches``, or ``data.bb_validation_sequences`` sequences for None.

  Returns:
    A list of dicts with the same keys, dtypes and shapes as training batches.
  """
  check_data_config(cfg)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive.")
  if cfg.source in synthetic.SYNTHETIC_SOURCES:
    return synthetic.validation_batches(cfg, tokenizer, seq_len, batch_size, num_batches)
  ds, read_options = _document_dataset(cfg, tokenizer, seq_len, "validation")
  rows = iter(pack(ds.to_iter_dataset(read_options), seq_len).map(_finalize))
  batches: list[Batch] = []
  while num_batches is None or len(batches) < num_batches:
    chunk = [row for _, row in zip(range(batch_size), rows)]
    if not chunk:
      break
    pad = [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
    batches.append({k: np.stack([r[k] for r in chunk + pad]) for k in chunk[0]})
    if len(chunk) < batch_size:
      break
  if num_batches is not None and len(batches) < num_batches:
    log.warning("validation_batches: only %d of %d batches of held-out data.", len(batches),
                num_batches)
  return batches
