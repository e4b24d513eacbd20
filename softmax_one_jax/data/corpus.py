"""Text documents: the embedded default corpus, local text files, and the held-out split.

A *document* is the unit that packing keeps apart with segment ids. For the embedded corpus (Jane
Austen's six novels, see ``corpora/PROVENANCE.md``) a document is one chapter (269 of them, about
3.7k GPT-2 tokens each); hard-wrapped lines are joined into paragraphs. For local files a document
is one file (``.txt`` or ``.txt.gz``), or one line's ``"text"`` field of a ``.jsonl``/``.jsonl.gz``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import re
from collections.abc import Sequence

DEFAULT_CORPUS = "austen.txt.gz"

# "CHAPTER XII" (Emma, Mansfield Park, ...) and "Chapter 12" (Persuasion, Pride and Prejudice).
_CHAPTER_RE = re.compile(r"^(?:CHAPTER|Chapter) (?:[IVXLC]+|\d+)\.?$", re.MULTILINE)
_PARAGRAPH_BREAK_RE = re.compile(r"\n\s*\n")


def default_corpus_path() -> str:
  """Path of the gzip'd embedded corpus inside the installed package."""
  return str(importlib.resources.files("softmax_one_jax.data") / "corpora" / DEFAULT_CORPUS)


def _unwrap(text: str) -> str:
  """Joins hard-wrapped lines into paragraphs; paragraphs are separated by one blank line."""
  paragraphs = (" ".join(p.split()) for p in _PARAGRAPH_BREAK_RE.split(text))
  return "\n\n".join(p for p in paragraphs if p)


def _is_front_matter(paragraph: str) -> bool:
  """Title, author and volume lines ("EMMA", "By Jane Austen", "VOLUME II"), not "THE END"."""
  p = paragraph.strip()
  return p not in _END_MARKS and bool(_FRONT_MATTER_RE.fullmatch(p))


_END_MARKS = ("FINIS", "THE END")
_FRONT_MATTER_RE = re.compile(r"[A-Z][A-Z ]{1,59}|By [A-Z][\w. ]{1,40}|\(\d{4}\)")


def _chapter_start(text: str, heading_start: int) -> int:
  """Moves a chapter's start back over the front matter paragraphs just above its heading."""
  start = heading_start
  while True:
    window_start = max(0, start - 400)
    breaks = list(_PARAGRAPH_BREAK_RE.finditer(text, window_start, start))
    cut = breaks[-1].end() if breaks and breaks[-1].end() < start else (
        breaks[-2].end() if len(breaks) > 1 else window_start)
    if not _is_front_matter(text[cut:start]) or cut == start:
      return start
    start = cut


def split_chapters(text: str) -> list[str]:
  """Splits a book-length text into chapter documents at "CHAPTER IV" / "Chapter 4" headings.

  Front matter just above a chapter heading (title, author, "VOLUME II") is joined to the chapter
  that follows; each chapter keeps its heading line; hard-wrapped lines are joined.

  Example:
    >>> split_chapters("EMMA\\n\\nCHAPTER I\\n\\nIt was.\\n\\nCHAPTER II\\n\\nIt is.\\n")
    ['EMMA\\n\\nCHAPTER I\\n\\nIt was.', 'CHAPTER II\\n\\nIt is.']
  """
  starts = [_chapter_start(text, m.start()) for m in _CHAPTER_RE.finditer(text)]
  if not starts:
    return [_unwrap(text)] if text.strip() else []
  bounds = [0] + starts[1:] + [len(text)]
  docs = [_unwrap(text[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  return [d for d in docs if d]


def default_documents() -> list[str]:
  """The embedded corpus as chapter documents (deterministic order)."""
  with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
    return split_chapters(f.read())


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Expands comma-separated paths or globs into a sorted, de-duplicated list of files.

  Raises:
    FileNotFoundError: a path or glob matches no file.
  """
  items = paths.split(",") if isinstance(paths, str) else list(paths)
  files: list[str] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"paths: {item!r} matches no file; give files or globs, comma-separated.")
    files.extend(matches)
  if not files:
    raise ValueError("paths is empty; set config.data.paths to comma-separated files or globs.")
  return sorted(set(files))


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, "rt", encoding="utf-8")


def read_text_documents(paths: str | Sequence[str]) -> list[str]:
  """Reads local files as documents: one per text file, one per line of a ``.jsonl`` file.

  Example:
    >>> read_text_documents("notes/*.txt,books/**/*.txt.gz")  # doctest: +SKIP
  """
  docs: list[str] = []
  for path in expand_paths(paths):
    with _open_text(path) as f:
      if path.endswith((".jsonl", ".jsonl.gz")):
        for line_no, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if "text" not in record:
              raise ValueError(f"{path}:{line_no}: a .jsonl line needs a 'text' field.")
            docs.append(record["text"])
      else:
        docs.append(f.read())
  return [d for d in docs if d.strip()]


def document_key(text: str) -> bytes:
  """A stable per-document hash; decides the held-out split independently of any seed."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_train_validation(
    docs: Sequence[str], validation_fraction: float
) -> tuple[list[int], list[int]]:
  """Indices of training and held-out documents.

  The ``ceil(fraction * n)`` documents with the smallest content hash are held out (at least one
  when ``fraction > 0`` and there are two or more documents). The choice depends only on the
  documents' text, never on a shuffle seed, process count or tokenizer.

  Returns:
    ``(train_indices, validation_indices)``, both sorted.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
  n = len(docs)
  n_val = math.ceil(validation_fraction * n) if n > 1 else 0
  n_val = min(n_val, n - 1)
  order = sorted(range(n), key=lambda i: (document_key(docs[i]), i))
  val = sorted(order[:n_val])
  val_set = set(val)
  return [i for i in range(n) if i not in val_set], val
