"""Tokenizers: GPT-2 BPE (shipped file, tiktoken), a small BPE trained on the corpus, SentencePiece.

All three answer the same small protocol (``Tokenizer``): ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``eos_id``, ``bos_id``, ``name`` and a
``fingerprint`` (a hash of the vocabulary) that keys caches and is checked against prepared shards.

* ``"gpt2"``: the 50,257-token GPT-2 byte-level BPE from ``tokenizers/gpt2.tiktoken`` (package data,
  MIT, from openai-whisper), encoded by tiktoken offline. ``<|endoftext|>`` = 50256 is both EOS and
  BOS, as in GPT-2 training. ``tiktoken.get_encoding`` is never called: it downloads.
* ``"bpe"``: byte-level BPE with GPT-2's pre-tokeniser, trained by ``bpe.py`` on the training
  documents of the configured source, ``bpe_vocab_size`` tokens including ``<|endoftext|>`` (last
  id). Trained once, then cached as a ``.tiktoken`` file keyed by corpus and vocab size.
* ``"sentencepiece"``: a ``.model`` file at ``tokenizer_path``; needs ``pip install sentencepiece``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import tiktoken

from softmax_one_jax.data import bpe
from softmax_one_jax.errors import ConfigError, DataError, MissingFileError

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The r50k / GPT-2 pre-tokeniser (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# Bumped whenever training changes, so stale cached vocabularies are never reused.
_BPE_VERSION = 1

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  name: str
  vocab_size: int
  eos_id: int
  bos_id: int
  fingerprint: str

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class TiktokenTokenizer:
  """A byte-level BPE run by tiktoken, with ``<|endoftext|>`` as EOS and BOS.

  Text is encoded as ordinary text: a literal ``"<|endoftext|>"`` inside a document is spelled out
  in byte tokens, never turned into the special id.

  Example:
    >>> tok = gpt2_tokenizer()
    >>> tok.encode("Hello world")
    [15496, 995]
  """

  encoding: tiktoken.Encoding
  name: str
  fingerprint: str
  path: str = ""  # the ranks file it was read from

  @property
  def vocab_size(self) -> int:
    return self.encoding.n_vocab

  @property
  def eos_id(self) -> int:
    return self.encoding.eot_token

  @property
  def bos_id(self) -> int:
    return self.encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self.encoding.encode_ordinary(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.encoding.encode_ordinary_batch(list(texts), num_threads=4)

  def decode(self, ids: Sequence[int]) -> str:
    return self.encoding.decode([int(i) for i in ids])


def _sha256_file(path: str | os.PathLike[str]) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def gpt2_tokenizer_path() -> str:
  """Path of the shipped GPT-2 ranks file."""
  return str(importlib.resources.files("softmax_one_jax.data") / "tokenizers" / "gpt2.tiktoken")


def tiktoken_from_file(path: str | os.PathLike[str], name: str) -> TiktokenTokenizer:
  """A tokenizer from a ``.tiktoken`` ranks file, GPT-2's pre-tokeniser, ``<|endoftext|>`` last.

  Example:
    >>> tok = tiktoken_from_file(gpt2_tokenizer_path(), name="gpt2")
    >>> tok.vocab_size, tok.eos_id
    (50257, 50256)
  """
  ranks = bpe.read_ranks(path)
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise DataError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats.")
  encoding = tiktoken.Encoding(
      name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
      special_tokens={ENDOFTEXT: len(ranks)},
  )
  return TiktokenTokenizer(encoding=encoding, name=name, fingerprint=_sha256_file(path),
                           path=str(path))


def gpt2_tokenizer(path: str | None = None) -> TiktokenTokenizer:
  """GPT-2's tokenizer from the shipped file (or ``path``), checked against tiktoken's pinned hash."""
  path = path or gpt2_tokenizer_path()
  tok = tiktoken_from_file(path, name="gpt2")
  if path == gpt2_tokenizer_path() and tok.fingerprint != GPT2_SHA256:
    raise DataError(f"{path} is corrupt: sha256 {tok.fingerprint} != {GPT2_SHA256}; reinstall.")
  return tok


def default_cache_dir() -> str:
  """``$SOFTMAX_ONE_JAX_CACHE``, else ``$XDG_CACHE_HOME/softmax_one_jax``, else ``~/.cache/...``."""
  if os.environ.get("SOFTMAX_ONE_JAX_CACHE"):
    return os.environ["SOFTMAX_ONE_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "softmax_one_jax")


def corpus_fingerprint(docs: Sequence[str]) -> str:
  """sha256 over the documents and their boundaries."""
  h = hashlib.sha256()
  for d in docs:
    data = d.encode("utf-8")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


def bpe_tokenizer(
    docs: Sequence[str], vocab_size: int, cache_dir: str | None = None,
    max_train_chars: int = 0,
) -> TiktokenTokenizer:
  """Trains (or loads from the cache) a byte-level BPE with ``vocab_size`` ids on ``docs``.

  Args:
    docs: training documents (the held-out documents must not be among them).
    vocab_size: total ids including ``<|endoftext|>``; at least 257. Fewer come back when the
      corpus runs out of pairs seen twice.
    cache_dir: folder for ``bpe/<hash>.tiktoken``; ``default_cache_dir()`` when None or empty.
    max_train_chars: train on (about) the first this many characters of ``docs`` in their order;
      0 = all of them.

  Example:
    >>> tok = bpe_tokenizer(["the cat sat on the mat"] * 3, vocab_size=300, cache_dir="/tmp/c")
    >>> tok.decode(tok.encode("the mat")) == "the mat"
    True
  """
  if vocab_size < 257:
    raise ConfigError(f"bpe_vocab_size={vocab_size} must be >= 257 (256 bytes + <|endoftext|>).")
  if max_train_chars > 0:
    sample, total = [], 0
    for d in docs:
      if total >= max_train_chars:
        break
      sample.append(d[: max_train_chars - total])
      total += len(sample[-1])
    docs = sample
  key = hashlib.sha256(
      f"{corpus_fingerprint(docs)}|{vocab_size}|v{_BPE_VERSION}".encode()).hexdigest()[:24]
  path = pathlib.Path(cache_dir or default_cache_dir()) / "bpe" / f"{key}.tiktoken"
  if not path.exists():
    log.info("Training a %d-token BPE on %d documents into %s", vocab_size, len(docs), path)
    ranks = bpe.train_bpe_ranks(bpe.count_chunks(docs, GPT2_PAT_STR), vocab_size - 1)
    bpe.write_ranks(path, ranks)
  return tiktoken_from_file(path, name=f"bpe{vocab_size}")


@dataclasses.dataclass(frozen=True, eq=False)
class SentencePieceTokenizer:
  """A SentencePiece ``.model``; BOS/EOS are the model's own (``bos_id`` falls back to EOS)."""

  processor: Any
  name: str
  fingerprint: str

  @property
  def vocab_size(self) -> int:
    return int(self.processor.get_piece_size())

  @property
  def eos_id(self) -> int:
    return int(self.processor.eos_id())

  @property
  def bos_id(self) -> int:
    bos = int(self.processor.bos_id())
    return bos if bos >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return list(self.processor.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in self.processor.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([int(i) for i in ids])


def sentencepiece_tokenizer(path: str) -> SentencePieceTokenizer:
  """Loads a SentencePiece model file (e.g. Llama-2's ``tokenizer.model``).

  Raises:
    ImportError: ``sentencepiece`` is not installed (``pip install sentencepiece``).
    FileNotFoundError: no file at ``path``.
    ValueError: the model has no EOS piece.
  """
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "tokenizer='sentencepiece' needs the sentencepiece package: pip install sentencepiece"
    ) from e
  if not path or not os.path.isfile(path):
    raise MissingFileError(
        f"tokenizer_path={path!r} is not a file; point it at a SentencePiece .model file.")
  processor = sentencepiece.SentencePieceProcessor(model_file=path)
  tok = SentencePieceTokenizer(processor=processor, name="sentencepiece",
                               fingerprint=_sha256_file(path))
  if tok.eos_id < 0:
    raise DataError(f"{path}: the SentencePiece model defines no EOS piece; the packer needs one.")
  return tok


TOKENIZERS = ("gpt2", "bpe", "sentencepiece")


def make_tokenizer(
    name: str, tokenizer_path: str = "", bpe_vocab_size: int = 4096,
    train_docs: Callable[[], Sequence[str]] | None = None, cache_dir: str | None = None,
    bpe_max_train_chars: int = 0,
) -> Tokenizer:
  """Builds a tokenizer by name; ``train_docs`` supplies the BPE's training documents lazily.

  For ``"bpe"`` a non-empty ``tokenizer_path`` names an existing ``.tiktoken`` file to load
  instead of training.
  """
  if name == "gpt2":
    return gpt2_tokenizer(tokenizer_path or None)
  if name == "bpe":
    if tokenizer_path:
      if not os.path.isfile(tokenizer_path):
        raise MissingFileError(f"tokenizer_path={tokenizer_path!r}: no such .tiktoken file.")
      tok = tiktoken_from_file(tokenizer_path, name="bpe")
      return dataclasses.replace(tok, name=f"bpe{tok.vocab_size}")
    if train_docs is None:
      raise ConfigError("tokenizer='bpe' needs documents to train on, or a tokenizer_path.")
    return bpe_tokenizer(train_docs(), bpe_vocab_size, cache_dir, bpe_max_train_chars)
  if name == "sentencepiece":
    return sentencepiece_tokenizer(tokenizer_path)
  raise ConfigError(f"tokenizer={name!r} is not one of {TOKENIZERS}.")
