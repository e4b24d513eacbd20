"""Token ids of documents: framing, the on-disk cache, and cutting into pieces of a row.

A framed document is ``[bos] + encode(text) + [eos]``; its (input, target) pairs are
``(framed[i], framed[i + 1])``. Pieces hold at most ``seq_len`` consecutive pairs of one document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import uuid
from collections.abc import Sequence

import grain
import numpy as np

from softmax_one_jax.data import tokenizers as tokenizers_lib

Batch = dict[str, np.ndarray]
# The entries of a batch, each ``[B, T]``: what the pipelines yield and the steps and metrics read.
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
  """Framed documents back to back.

  Attributes:
    tokens_n: uint16/uint32 [N], document ``d`` is ``tokens_n[starts[d]:starts[d + 1]]`` =
      ``[bos] + encode(text) + [eos]``.
    starts: int64 [num_docs + 1].
  """

  tokens_n: np.ndarray
  starts: np.ndarray

  @property
  def num_documents(self) -> int:
    return len(self.starts) - 1

  def document(self, d: int) -> np.ndarray:
    return self.tokens_n[self.starts[d]:self.starts[d + 1]]


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id fits, else uint32."""
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def frame_documents(texts: Sequence[str], tok: tokenizers_lib.Tokenizer) -> TokenizedDocuments:
  """Encodes ``texts`` as ``[bos] + ids + [eos]`` each, concatenated."""
  dtype = token_dtype(tok.vocab_size)
  framed = [np.asarray([tok.bos_id, *ids, tok.eos_id], dtype)
            for ids in tok.encode_batch(list(texts))]
  lengths = np.array([len(f) for f in framed], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens_n = np.concatenate(framed) if framed else np.zeros((0,), dtype)
  return TokenizedDocuments(tokens_n=tokens_n, starts=starts)


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npy")  # unique across hosts too
  np.save(tmp, array)
  os.replace(tmp, path)


def tokenized_documents(
    texts: Sequence[str], tok: tokenizers_lib.Tokenizer, cache_dir: str | None = None
) -> TokenizedDocuments:
  """``frame_documents`` through an on-disk cache keyed by the texts and the tokenizer."""
  key = hashlib.sha256(
      f"{tokenizers_lib.corpus_fingerprint(texts)}|{tok.fingerprint}|{tok.bos_id}|{tok.eos_id}"
      f"|v{_CACHE_VERSION}".encode()).hexdigest()[:24]
  folder = pathlib.Path(cache_dir or tokenizers_lib.default_cache_dir()) / "tokens"
  tokens_path, starts_path = folder / f"{key}.tokens.npy", folder / f"{key}.starts.npy"
  if tokens_path.exists() and starts_path.exists():
    return TokenizedDocuments(tokens_n=np.load(tokens_path), starts=np.load(starts_path))
  docs = frame_documents(texts, tok)
  folder.mkdir(parents=True, exist_ok=True)
  _save_npy(tokens_path, docs.tokens_n)
  _save_npy(starts_path, docs.starts)
  return docs


def piece_table(
    starts: np.ndarray, doc_ids: Sequence[int], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts documents into pieces of at most ``seq_len`` (input, target) pairs.

  A framed document of ``n`` tokens has ``n - 1`` pairs; piece ``k`` holds pairs
  ``k * seq_len ...``. Documents appear in ``doc_ids`` order, pieces in document order.

  Returns:
    ``(piece_start_p, piece_len_p)``: int64 offsets into the token array and int64 pair counts.

  Example:
    >>> piece_table(np.array([0, 7, 10]), [0, 1], seq_len=4)  # 6 pairs, then 2 pairs
    (array([0, 4, 7]), array([4, 2, 2]))
  """
  piece_starts, piece_lens = [], []
  for d in doc_ids:
    s, e = int(starts[d]), int(starts[d + 1])
    pairs = e - s - 1
    offsets = np.arange(0, pairs, seq_len, dtype=np.int64)
    piece_starts.append(s + offsets)
    piece_lens.append(np.minimum(seq_len, pairs - offsets))
  if not piece_starts:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return np.concatenate(piece_starts), np.concatenate(piece_lens)


class PieceSource(grain.sources.RandomAccessDataSource):
  """Random access to pieces: ``{"inputs": int32 [n], "targets": int32 [n]}``, ``n <= seq_len``."""

  def __init__(self, tokens_n: np.ndarray, piece_start_p: np.ndarray, piece_len_p: np.ndarray):
    self._tokens_n = tokens_n
    self._start_p = piece_start_p
    self._len_p = piece_len_p

  def __len__(self) -> int:
    return len(self._start_p)

  def __getitem__(self, index: int) -> Batch:
    s, n = int(self._start_p[index]), int(self._len_p[index])
    window = self._tokens_n[s:s + n + 1].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:]}

  def __repr__(self) -> str:
    return f"PieceSource(num_pieces={len(self)})"


def frame_record(bos_id: int, eos_id: int, dtype: str):
  """Maps an ArrayRecord record (raw ids) to the pairs of its framed document."""

  def frame(record: bytes) -> Batch:
    ids = np.frombuffer(record, dtype=dtype).astype(np.int32)
    framed = np.concatenate([[bos_id], ids, [eos_id]]).astype(np.int32)
    return {"inputs": framed[:-1], "targets": framed[1:]}

  return frame
