"""``softmax-one prepare``: tokenise a corpus once into ArrayRecord shards (the at-scale path).

Output folder::

  metadata.json                 format, token dtype, tokenizer name + fingerprint, shard lists
  tokenizer.tiktoken            (tokenizer="bpe" only) the trained vocabulary, loaded back at train time
  train-00000.array_record ...  one record per document: its token ids (no BOS/EOS) as raw
  validation-00000.array_record little-endian uint16 (vocab <= 65536) or uint32

Training reads it with ``source="arrayrecord"``, ``paths=<folder>`` through
``grain.sources.ArrayRecordDataSource``. ``metadata.json`` is written last, so a folder without it
is an unfinished run.

Sources: "default" (embedded corpus), "text" (``paths``), and "c4": Hugging Face ``datasets``
streaming ``allenai/c4`` (needs ``pip install datasets`` and network), its train split for
training and its own validation split for validation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from softmax_one_jax.data import corpus
from softmax_one_jax.data import tokenizers as tokenizers_lib
from softmax_one_jax.data.config import SOURCES
from softmax_one_jax.data.synthetic import SYNTHETIC_SOURCES
from softmax_one_jax.data.tokens import token_dtype
from softmax_one_jax.errors import ConfigError, OutputExistsError

FORMAT = "softmax_one_jax.tokens.v1"
# The run's sources that are text to tokenize: not "arrayrecord" (what prepare writes), nor the
# synthetic tasks (generated on the fly).
PREPARE_SOURCES = tuple(s for s in SOURCES if s not in ("arrayrecord", *SYNTHETIC_SOURCES))
# Characters a BPE trains on by default when the corpus is streamed ("c4", "text").
_BPE_STREAM_CHARS = 50_000_000
log = logging.getLogger(__name__)


def _load_c4_split(c4_name: str, split: str) -> Iterable[str]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "source='c4' streams C4 through Hugging Face datasets: pip install datasets "
        "(and run with network access), or prepare local files with --source text.") from e
  stream = datasets.load_dataset("allenai/c4", c4_name, split=split, streaming=True)
  return (example["text"] for example in stream)


def _write_shards(
    output_dir: str, prefix: str, texts: Iterable[str], tok: tokenizers_lib.Tokenizer,
    records_per_shard: int, encode_batch_size: int = 1024,
) -> dict[str, Any]:
  """Tokenises ``texts`` into ``{prefix}-NNNNN.array_record`` files; returns the split's entry."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  dtype = token_dtype(tok.vocab_size)
  files: list[str] = []
  writer, in_shard = None, 0
  num_docs = num_tokens = 0
  texts_iter = iter(texts)
  try:
    while batch := list(itertools.islice(texts_iter, encode_batch_size)):
      for ids in tok.encode_batch(batch):
        if writer is None or in_shard == records_per_shard:
          if writer is not None:
            writer.close()
          files.append(f"{prefix}-{len(files):05d}.array_record")
          writer, in_shard = ArrayRecordWriter(os.path.join(output_dir, files[-1]), "group_size:1"), 0
        writer.write(np.asarray(ids, dtype).tobytes())
        in_shard += 1
        num_docs += 1
        num_tokens += len(ids)
  finally:
    if writer is not None:
      writer.close()
  return {"files": files, "num_documents": num_docs, "num_tokens": num_tokens}


def prepare(
    output_dir: str, *, source: str = "default", paths: str = "", tokenizer: str = "gpt2",
    tokenizer_path: str = "", bpe_vocab_size: int = 4096, bpe_max_train_chars: int = 0,
    validation_fraction: float = 0.05, records_per_shard: int = 100_000, max_documents: int = 0,
    max_validation_documents: int = 10_000, c4_name: str = "en", cache_dir: str = "",
    document_separator: str = "blank_line",
) -> dict[str, Any]:
  """Tokenises a corpus into train/validation ArrayRecord shards; returns the metadata written.

  Args:
    output_dir: folder to create (must not hold a finished ``metadata.json``).
    source: "default" | "text" | "c4".
    paths: files or globs for "text".
    tokenizer, tokenizer_path, bpe_vocab_size, bpe_max_train_chars: as in ``default_data_config``.
      For "c4" and "text" the BPE trains on the first ``bpe_max_train_chars`` (default 50M)
      characters of the training documents.
    validation_fraction: held-out fraction for "default"/"text" (same split as the in-memory
      pipeline: by document hash). "c4" uses C4's own validation split instead.
    records_per_shard: documents per ``.array_record`` file.
    max_documents: stop after this many training documents (0 = all).
    max_validation_documents: "c4" only: validation documents to keep.
    c4_name: the C4 configuration ("en", "realnewslike", ...).
    cache_dir: where a trained BPE is cached ("" = default).
    document_separator: "text" only: "blank_line" | "file" | a literal separator, as
      ``data.document_separator`` (see ``corpus.iter_text_documents``).

  "text" is streamed: a first pass keeps only each document's 16-byte ``document_key`` to choose
  the held-out documents, and each later pass (BPE sample, train shards, validation shards) reads
  the files again, so the corpus is never held in memory (16 bytes per document are).

  Example:
    >>> meta = prepare("/tmp/austen_gpt2", source="default", tokenizer="gpt2")
    >>> meta["splits"]["train"]["num_documents"]
    255
  """
  if source not in PREPARE_SOURCES:
    raise ConfigError(f"source={source!r} is not one of {PREPARE_SOURCES}.")
  if records_per_shard < 1:
    raise ConfigError(f"records_per_shard={records_per_shard} must be positive.")
  if os.path.exists(os.path.join(output_dir, "metadata.json")):
    raise OutputExistsError(f"{output_dir} already holds a prepared dataset; pick a new folder.")
  os.makedirs(output_dir, exist_ok=True)

  if source == "c4":
    train_texts: Iterable[str] = _load_c4_split(c4_name, "train")
    val_texts: Iterable[str] = itertools.islice(
        _load_c4_split(c4_name, "validation"), max_validation_documents)
    bpe_docs = lambda: list(_take_chars(_load_c4_split(c4_name, "train"),  # noqa: E731
                                        bpe_max_train_chars or _BPE_STREAM_CHARS))
  elif source == "default":
    docs = corpus.default_documents()
    train_idx, val_idx = corpus.split_train_validation(docs, validation_fraction)
    train_texts, val_texts = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    bpe_docs = lambda: train_texts  # noqa: E731
  else:
    train_texts, val_texts, bpe_docs = _streamed_text_splits(
        paths, document_separator, validation_fraction, bpe_max_train_chars or _BPE_STREAM_CHARS)
  if max_documents:
    train_texts = itertools.islice(train_texts, max_documents)

  tok = tokenizers_lib.make_tokenizer(
      tokenizer, tokenizer_path=tokenizer_path, bpe_vocab_size=bpe_vocab_size, train_docs=bpe_docs,
      cache_dir=cache_dir or None, bpe_max_train_chars=bpe_max_train_chars)
  if tokenizer == "bpe":
    _copy_ranks(tok, output_dir)

  splits = {
      "train": _write_shards(output_dir, "train", train_texts, tok, records_per_shard),
      "validation": _write_shards(output_dir, "validation", val_texts, tok, records_per_shard),
  }
  meta = {
      "format": FORMAT,
      "source": source if source != "c4" else f"c4/{c4_name}",
      "dtype": token_dtype(tok.vocab_size).name,
      "tokenizer": tok.name,
      "tokenizer_fingerprint": tok.fingerprint,
      "vocab_size": tok.vocab_size,
      "bos_id": tok.bos_id,
      "eos_id": tok.eos_id,
      "splits": splits,
  }
  tmp = os.path.join(output_dir, f".metadata.json.{os.getpid()}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(output_dir, "metadata.json"))
  log.info("prepare: %s", json.dumps({k: v["num_tokens"] for k, v in splits.items()}))
  return meta


def _streamed_text_splits(
    paths: str, separator: str, validation_fraction: float, bpe_chars: int,
) -> tuple[Iterator[str], Iterator[str], Callable[[], list[str]]]:
  """Train texts, validation texts and the BPE sample of local files, each a fresh pass over them.

  The held-out set is ``corpus.validation_indices`` of the documents' keys, the same rule as
  ``corpus.split_train_validation`` (and so as the in-memory pipeline); only the keys are kept.
  """
  corpus.check_separator(separator)
  keys = [corpus.document_key(d) for d in corpus.iter_text_documents(paths, separator)]
  held_out = frozenset(corpus.validation_indices(keys, validation_fraction))

  def docs(validation: bool) -> Iterator[str]:
    for i, d in enumerate(corpus.iter_text_documents(paths, separator)):
      if (i in held_out) == validation:
        yield d

  return docs(False), docs(True), lambda: list(_take_chars(docs(False), bpe_chars))


def _take_chars(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  total = 0
  for t in texts:
    if total >= max_chars:
      return
    total += len(t)
    yield t


def _copy_ranks(tok: tokenizers_lib.Tokenizer, output_dir: str) -> None:
  """Saves the BPE vocabulary next to the shards, so training loads the very same one."""
  shutil.copyfile(tok.path, os.path.join(output_dir, "tokenizer.tiktoken"))


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="softmax-one prepare",
      description="Tokenise a corpus into ArrayRecord shards for data.source='arrayrecord'.")
  p.add_argument("--output_dir", required=True, help="folder to write (new)")
  p.add_argument("--source", default="default", choices=PREPARE_SOURCES)
  p.add_argument("--paths", default="", help="comma-separated files/globs for --source text")
  p.add_argument("--document_separator", default="blank_line",
                 help="--source text: 'blank_line' (blank lines end a document), 'file' (one "
                      "document per file) or a literal separator such as '<|endoftext|>'")
  p.add_argument("--tokenizer", default="gpt2", choices=tokenizers_lib.TOKENIZERS)
  p.add_argument("--tokenizer_path", default="")
  p.add_argument("--bpe_vocab_size", type=int, default=4096)
  p.add_argument("--bpe_max_train_chars", type=int, default=0)
  p.add_argument("--validation_fraction", type=float, default=0.05)
  p.add_argument("--records_per_shard", type=int, default=100_000)
  p.add_argument("--max_documents", type=int, default=0)
  p.add_argument("--max_validation_documents", type=int, default=10_000)
  p.add_argument("--c4_name", default="en")
  p.add_argument("--cache_dir", default="")
  return p


def prepare_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: ``softmax-one prepare --output_dir DIR [--source ...]``.

  Args:
    argv: the arguments after the subcommand (a leading "prepare" is skipped);
      None = ``sys.argv[1:]``.

  Returns:
    The metadata written (also printed as JSON).
  """
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "prepare":
    argv = argv[1:]
  args = _parser().parse_args(argv)
  meta = prepare(**vars(args))
  print(json.dumps({k: meta[k] for k in ("source", "tokenizer", "vocab_size")}
                   | {s: {k: v for k, v in meta["splits"][s].items() if k != "files"}
                      for s in meta["splits"]}))
  return meta
