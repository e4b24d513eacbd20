"""Tokenizers: GPT-2 (shipped file), the small BPE and its trainer, the SentencePiece wiring."""

from __future__ import annotations

import collections
import os
import sys
import types

import numpy as np
import pytest
import regex

from softmax_one_jax import data
from softmax_one_jax.data import bpe
from softmax_one_jax.data import tokenizers


def _random_text(rng: np.random.Generator, n_words: int) -> str:
  alphabet = list("abcdefghijklmnopqrstuvwxyz  ,.;'\n") + ["é", "ß", "数", "😀", "'s", "'ll", "  "]
  words = []
  for _ in range(n_words):
    k = int(rng.integers(1, 8))
    words.append("".join(rng.choice(alphabet, size=k)))
  return " ".join(words)


def _reference_bpe_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
  """Textbook BPE encoding: per regex chunk, merge the lowest-ranked adjacent pair until none."""
  out = []
  for chunk in regex.findall(tokenizers.GPT2_PAT_STR, text):
    parts = [bytes([b]) for b in chunk.encode("utf-8")]
    while len(parts) > 1:
      cands = [(ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1)]
      rank, i = min(cands)
      if rank == float("inf"):
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    out.extend(ranks[p] for p in parts)
  return out


def _reference_train(chunk_counts: dict[bytes, int], num_tokens: int) -> list[bytes]:
  """Naive BPE training from the definition: recount all pairs before every merge."""
  words = {tuple(bytes([b]) for b in w): c for w, c in chunk_counts.items()}
  vocab = [bytes([i]) for i in range(256)]
  while len(vocab) < num_tokens:
    counts = collections.Counter()
    for w, c in words.items():
      for pair in zip(w, w[1:]):
        counts[pair] += c
    if not counts:
      break
    best = min(counts, key=lambda p: (-counts[p], p[0], p[1]))
    if counts[best] < 2:
      break
    merged = best[0] + best[1]
    if merged not in vocab:
      vocab.append(merged)
    new_words = collections.Counter()
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(merged)
          i += 2
        else:
          out.append(w[i])
          i += 1
      new_words[tuple(out)] += c
    words = new_words
  return vocab


def test_gpt2_known_ids_and_specials():
  tok = tokenizers.gpt2_tokenizer()
  assert tok.encode("Hello world") == [15496, 995]  # the published GPT-2 ids
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (50257, 50256, 50256)
  assert tok.fingerprint == tokenizers.GPT2_SHA256
  # A literal "<|endoftext|>" in a document is text, not the special id.
  assert 50256 not in tok.encode("a <|endoftext|> b")


def test_gpt2_matches_textbook_bpe_and_round_trips():
  tok = tokenizers.gpt2_tokenizer()
  ranks = bpe.read_ranks(tokenizers.gpt2_tokenizer_path())
  rng = np.random.default_rng(0)
  for _ in range(20):
    text = _random_text(rng, 30)
    ids = tok.encode(text)
    assert ids == _reference_bpe_encode(text, ranks)
    assert tok.decode(ids) == text
  assert tok.encode_batch(["Hello world", "x"]) == [tok.encode("Hello world"), tok.encode("x")]


def test_bpe_trainer_matches_naive_definition():
  rng = np.random.default_rng(1)
  texts = [_random_text(rng, 200) for _ in range(5)]
  counts = bpe.count_chunks(texts, tokenizers.GPT2_PAT_STR)
  ranks = bpe.train_bpe_ranks(counts, num_tokens=400)
  expected = _reference_train(dict(counts), num_tokens=400)
  assert [b for b, _ in sorted(ranks.items(), key=lambda kv: kv[1])] == expected


def test_bpe_tokenizer_round_trip_and_textbook_encoding(tmp_path):
  rng = np.random.default_rng(2)
  docs = [_random_text(rng, 300) for _ in range(10)]
  tok = tokenizers.bpe_tokenizer(docs, vocab_size=512, cache_dir=str(tmp_path))
  assert tok.vocab_size == 512 and tok.eos_id == tok.bos_id == 511
  ranks = bpe.read_ranks(tok.path)
  for _ in range(10):
    text = _random_text(rng, 50)  # unseen text, including characters never trained on
    ids = tok.encode(text)
    assert max(ids) < 511
    assert ids == _reference_bpe_encode(text, ranks)
    assert tok.decode(ids) == text
  assert len(tok.encode(" ".join(docs))) < len(" ".join(docs).encode())  # merges are used


def test_bpe_is_deterministic_and_cached(tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  docs = [_random_text(rng, 200) for _ in range(5)]
  a = tokenizers.bpe_tokenizer(docs, vocab_size=400, cache_dir=str(tmp_path / "a"))
  b = tokenizers.bpe_tokenizer(docs, vocab_size=400, cache_dir=str(tmp_path / "b"))
  assert a.fingerprint == b.fingerprint
  with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
    assert fa.read() == fb.read()
  monkeypatch.setattr(bpe, "train_bpe_ranks", lambda *a, **k: pytest.fail("trained again"))
  c = tokenizers.bpe_tokenizer(docs, vocab_size=400, cache_dir=str(tmp_path / "a"))
  assert c.fingerprint == a.fingerprint
  # Another vocabulary size or corpus is another cache entry, not a stale hit.
  with pytest.raises(pytest.fail.Exception):
    tokenizers.bpe_tokenizer(docs, vocab_size=401, cache_dir=str(tmp_path / "a"))
  with pytest.raises(ValueError, match="must be >= 257"):
    tokenizers.bpe_tokenizer(docs, vocab_size=100, cache_dir=str(tmp_path))


def test_get_tokenizer_bpe_trains_on_training_documents_only(text_corpus, monkeypatch):
  cfg, docs = text_corpus
  cfg.tokenizer, cfg.bpe_vocab_size = "bpe", 300
  seen = {}

  real = tokenizers.bpe_tokenizer

  def spy(train_docs, vocab_size, cache_dir, max_chars):
    seen["docs"] = list(train_docs)
    return real(train_docs, vocab_size, cache_dir, max_chars)

  monkeypatch.setattr(tokenizers, "bpe_tokenizer", spy)
  tok = data.get_tokenizer(cfg)
  train_idx, val_idx = data.corpus.split_train_validation(docs, cfg.validation_fraction)
  assert seen["docs"] == [docs[i] for i in train_idx]
  assert tok.vocab_size <= 300 and tok.decode(tok.encode(docs[0])) == docs[0]
  # Loading the cached file through tokenizer_path gives the same vocabulary.
  cfg.tokenizer_path = tok.path
  assert data.get_tokenizer(cfg).fingerprint == tok.fingerprint


def test_sentencepiece_missing_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails even if installed
  cfg = data.default_data_config()
  cfg.tokenizer, cfg.tokenizer_path = "sentencepiece", "/x/tokenizer.model"
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    data.get_tokenizer(cfg)


def test_sentencepiece_wiring_with_a_stand_in_module(monkeypatch, tmp_path):
  class Processor:  # the slice of sentencepiece.SentencePieceProcessor the wrapper uses

    def __init__(self, model_file):
      self.model_file = model_file

    def get_piece_size(self):
      return 32000

    def eos_id(self):
      return 2

    def bos_id(self):
      return 1

    def encode(self, x):
      return [[len(w) for w in t.split()] for t in x] if isinstance(x, list) else [
          len(w) for w in x.split()]

    def decode(self, ids):
      return " ".join("x" * i for i in ids)

  monkeypatch.setitem(sys.modules, "sentencepiece",
                      types.SimpleNamespace(SentencePieceProcessor=Processor))
  model = tmp_path / "m.model"
  model.write_bytes(b"not a real model")
  cfg = data.default_data_config()
  cfg.tokenizer, cfg.tokenizer_path = "sentencepiece", str(model)
  tok = data.get_tokenizer(cfg)
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (32000, 2, 1)
  assert tok.encode("ab c") == [2, 1] and tok.encode_batch(["ab c"]) == [[2, 1]]
  assert tok.decode([2, 1]) == "xx x"
  cfg.tokenizer_path = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="SentencePiece .model"):
    data.get_tokenizer(cfg)


def test_unknown_tokenizer_is_rejected():
  cfg = data.default_data_config()
  cfg.tokenizer = "wordpiece"
  with pytest.raises(ValueError, match="tokenizer='wordpiece' is not one of"):
    data.get_tokenizer(cfg)


def test_default_corpus_bpe_size(cache_dir):
  """The 'tiny' setting: a 4096-id BPE on the training chapters of the embedded corpus."""
  cfg = data.default_data_config()
  cfg.tokenizer, cfg.cache_dir = "bpe", cache_dir
  tok = data.get_tokenizer(cfg)
  assert tok.vocab_size == 4096 and os.path.isfile(tok.path)
  text = "It is a truth universally acknowledged, that a single man in possession"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(text)) < len(text) / 3
