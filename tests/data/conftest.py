"""Fixtures for the data tests: a word-id toy tokenizer and small text corpora on disk.

The toy tokenizer maps the word ``w<n>`` to id ``n``; documents use globally unique word ids, so
every (input, target) pair of a framed document is unique and a packed batch can be checked
against the documents exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import pytest

from softmax_one_jax.data import default_data_config

TOY_EOS = 0


@dataclasses.dataclass(frozen=True)
class ToyTokenizer:
  name: str = "toy"
  vocab_size: int = 60000
  eos_id: int = TOY_EOS
  bos_id: int = TOY_EOS
  fingerprint: str = hashlib.sha256(b"toy-v1").hexdigest()

  def encode(self, text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_docs(rng: np.random.Generator, num_docs: int, min_len: int, max_len: int) -> list[str]:
  """Documents of consecutive, globally unique word ids ``w1 w2 ...`` (id 0 is EOS)."""
  lengths = rng.integers(min_len, max_len + 1, size=num_docs)
  docs, next_id = [], 1
  for n in lengths:
    docs.append(" ".join(f"w{i}" for i in range(next_id, next_id + n)))
    next_id += n
  return docs


def framed(doc: str, tok=ToyTokenizer()) -> list[int]:
  return [tok.bos_id, *tok.encode(doc), tok.eos_id]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("softmax_one_jax_cache"))


@pytest.fixture
def text_corpus(tmp_path):
  """Writes 40 random toy documents, one per file; returns (cfg, docs)."""
  rng = np.random.default_rng(0)
  docs = make_docs(rng, num_docs=40, min_len=3, max_len=60)
  for i, d in enumerate(docs):
    (tmp_path / f"doc{i:03d}.txt").write_text(d)
  cfg = default_data_config()
  cfg.source = "text"
  cfg.paths = str(tmp_path / "doc*.txt")
  cfg.validation_fraction = 0.1
  cfg.cache_dir = str(tmp_path / "cache")
  return cfg, docs
