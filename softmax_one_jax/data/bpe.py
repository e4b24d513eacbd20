"""A small byte-level BPE trainer, for tokenizers sized to CPU models (vocab 2k-4k).

Training follows the classic recipe (Sennrich et al. 2016; GPT-2's byte-level variant):
text is split into chunks by a regex (GPT-2's), each chunk starts as its UTF-8 bytes, and the most
frequent adjacent pair (counted over all chunks, weighted by chunk frequency) is merged into a new
token, again and again. Ties go to the lexicographically smallest ``(left bytes, right bytes)``, so
training is deterministic. The result is a ``{token bytes: rank}`` table in tiktoken's file format
(one ``base64(bytes) rank`` per line): ranks 0-255 are the single bytes, rank ``256 + i`` is merge
``i``. tiktoken then encodes with it in Rust.

Pair counts are kept incrementally (pair -> count, pair -> chunks holding it, a lazy max-heap), so
a 4k vocabulary on the 4 MB default corpus trains in seconds of pure Python.
"""

from __future__ import annotations

import base64
import collections
from collections.abc import Iterable
import heapq
import os
import pathlib
import uuid

import regex

from softmax_one_jax.errors import DataError

Ranks = dict[bytes, int]


def count_chunks(texts: Iterable[str], pat_str: str) -> collections.Counter[bytes]:
  """Counts the regex chunks of ``texts`` as UTF-8 bytes.

  Example:
    >>> count_chunks(["a b a"], r" ?\\w+")
    Counter({b'a': 1, b' b': 1, b' a': 1})
  """
  pattern = regex.compile(pat_str)
  counts: collections.Counter[bytes] = collections.Counter()
  for text in texts:
    counts.update(m.encode("utf-8") for m in pattern.findall(text))
  return counts


def train_bpe_ranks(
    chunk_counts: collections.Counter[bytes] | dict[bytes, int], num_tokens: int,
    min_pair_count: int = 2,
) -> Ranks:
  """Trains byte-level BPE merges on chunk counts.

  Args:
    chunk_counts: how often each pre-tokenised chunk (bytes) occurs, from ``count_chunks``.
    num_tokens: wanted number of mergeable tokens, >= 256 (256 bytes + ``num_tokens - 256``
      merges). Fewer come back when no pair occurs ``min_pair_count`` times any more.
    min_pair_count: pairs rarer than this are never merged.

  Returns:
    ``{token bytes: rank}``, ranks ``0..len-1`` without gaps; bytes first, then merges in order.

  Example:
    >>> ranks = train_bpe_ranks({b"abab": 3, b"ab": 1}, num_tokens=258)
    >>> ranks[b"ab"], ranks[b"abab"]
    (256, 257)
  """
  if num_tokens < 256:
    raise ValueError(f"num_tokens={num_tokens} must be >= 256 (the single bytes).")
  token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
  bytes_to_id: dict[bytes, int] = {b: i for i, b in enumerate(token_bytes)}
  chunks = sorted(chunk_counts.items())
  words: list[list[int]] = [list(chunk) for chunk, _ in chunks]
  freqs: list[int] = [count for _, count in chunks]

  pair_count: collections.Counter[tuple[int, int]] = collections.Counter()
  pair_where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
  for w, (word, freq) in enumerate(zip(words, freqs)):
    for pair in zip(word, word[1:]):
      pair_count[pair] += freq
      pair_where[pair].add(w)

  def heap_entry(pair: tuple[int, int]) -> tuple[int, bytes, bytes, tuple[int, int]]:
    return (-pair_count[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

  heap = [heap_entry(pair) for pair in pair_count]
  heapq.heapify(heap)
  ranks: Ranks = dict(bytes_to_id)
  while len(ranks) < num_tokens and heap:
    neg_count, _, _, pair = heapq.heappop(heap)
    if -neg_count != pair_count.get(pair, 0):
      continue  # stale entry; the current count was pushed again when it changed
    if -neg_count < min_pair_count:
      break
    merged = token_bytes[pair[0]] + token_bytes[pair[1]]
    new_id = bytes_to_id.get(merged)
    if new_id is None:  # the same bytes may already be a token made by another merge
      new_id = len(token_bytes)
      token_bytes.append(merged)
      bytes_to_id[merged] = new_id
      ranks[merged] = len(ranks)
    changed: set[tuple[int, int]] = set()
    for w in sorted(pair_where.pop(pair)):
      word, freq = words[w], freqs[w]
      for old in zip(word, word[1:]):
        pair_count[old] -= freq
        changed.add(old)
      new_word, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
          new_word.append(new_id)
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      words[w] = new_word
      for new in zip(new_word, new_word[1:]):
        pair_count[new] += freq
        pair_where[new].add(w)
        changed.add(new)
    for p in sorted(changed):
      if pair_count[p] <= 0:
        del pair_count[p]
        pair_where.pop(p, None)
      else:
        heapq.heappush(heap, heap_entry(p))
    pair_count.pop(pair, None)
  return ranks


def write_ranks(path: str | os.PathLike[str], ranks: Ranks) -> None:
  """Writes ``ranks`` in tiktoken's format, atomically (a temporary file, then a rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}"
           for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across hosts too
  tmp.write_text("\n".join(lines) + "\n", encoding="ascii")
  os.replace(tmp, path)


def read_ranks(path: str | os.PathLike[str]) -> Ranks:
  """Reads a tiktoken ``.tiktoken`` ranks file (``base64(bytes) rank`` per line).

  Unlike ``tiktoken.load.load_tiktoken_bpe`` this never copies the file into a cache folder.
  """
  ranks: Ranks = {}
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
      except ValueError as e:
        raise DataError(f"{path}:{line_no}: expected 'base64token rank', got {line[:80]!r}") from e
  return ranks
