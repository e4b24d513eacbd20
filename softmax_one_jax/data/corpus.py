"""Text documents: the embedded default corpus, local text files, and the held-out split.

A *document* is the unit that packing keeps apart with segment ids. For the embedded corpus (Jane
Austen's six novels, see ``corpora/PROVENANCE.md``) a document is one chapter (269 of them, about
3.7k GPT-2 tokens each); hard-wrapped lines are joined into paragraphs. For local files a document
is a paragraph-like piece of a ``.txt``/``.txt.gz`` file, cut at blank lines, at a literal separator
or at the file's end (``iter_text_documents``), or one line's ``"text"`` field of a
``.jsonl``/``.jsonl.gz``. Files are streamed in chunks, so a book-sized file is never held whole.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import importlib.resources
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from softmax_one_jax.errors import ConfigError, DataError, MissingFileError

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
    MissingFileError: a path or glob matches no file.
    ConfigError: ``paths`` names nothing at all.
  """
  items = paths.split(",") if isinstance(paths, str) else list(paths)
  files: list[str] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise MissingFileError(
          f"paths: {item!r} matches no file; give files or globs, comma-separated.")
    files.extend(matches)
  if not files:
    raise ConfigError("paths is empty; set config.data.paths to comma-separated files or globs.")
  return sorted(set(files))


# Bytes read (and decoded) at a time; a module constant so tests can use a tiny one.
CHUNK_BYTES = 1 << 20
# The named separators; any other non-empty string is a literal one.
SEPARATORS = ("blank_line", "file")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def check_separator(separator: str) -> None:
  """Raises ``ConfigError`` unless ``separator`` is "blank_line", "file" or a non-empty string."""
  if not isinstance(separator, str) or not separator:
    raise ConfigError(
        f"data.document_separator={separator!r} must be 'blank_line' (the default), 'file' or a "
        "non-empty literal separator such as '<|endoftext|>'.")


def _open_binary(path: str) -> BinaryIO:
  """Opens ``path`` for reading bytes (decompressed for ``.gz``), with errors that name it."""
  try:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
  except FileNotFoundError as e:
    raise MissingFileError(f"{path}: no such file (it was removed while reading).") from e
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e}); check its permissions, "
                    "or leave it out of data.paths.") from e


def _iter_chunks(path: str, chunk_bytes: int | None = None) -> Iterator[str]:
  """Yields the text of ``path`` in pieces decoded from ``chunk_bytes`` bytes at a time.

  The incremental UTF-8 decoder holds back the bytes of a character split across two reads, so a
  piece never ends inside a character.

  Raises:
    DataError: bytes that are not UTF-8 (naming the byte offset of the first invalid sequence;
      for ``.gz`` files the offset in the decompressed text), or a corrupt ``.gz``.
  """
  size = chunk_bytes or CHUNK_BYTES
  decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
  offset = 0  # bytes of the file handed to the decoder so far
  with _open_binary(path) as f:
    while True:
      try:
        data = f.read(size)
      except (OSError, EOFError, zlib.error) as e:
        kind = "corrupt or truncated gzip" if path.endswith(".gz") else "unreadable"
        raise DataError(f"{path}: {kind} file ({e}); check or recreate it.") from e
      held = len(decoder.getstate()[0])  # undecoded bytes kept from the previous read
      try:
        text = decoder.decode(data, final=not data)
      except UnicodeDecodeError as e:
        # ``e.start`` counts from the first held-back byte, which sits ``held`` bytes before
        # ``offset`` in the file.
        raise _not_utf8(path, offset - held + e.start) from e
      offset += len(data)
      if text:
        yield text
      if not data:
        return


def _not_utf8(path: str, byte_offset: int) -> DataError:
  if path.endswith(".gz"):
    where = f"decompressed byte offset {byte_offset}"
    fix = f"zcat {path} | iconv -f latin1 -t utf-8 | gzip > {path}.utf8 && mv {path}.utf8 {path}"
  else:
    where = f"byte offset {byte_offset}"
    fix = f"iconv -f latin1 -t utf-8 {path} > {path}.utf8 && mv {path}.utf8 {path}"
  return DataError(
      f"{path}: not UTF-8 text (first invalid byte at {where}). Convert it to UTF-8, e.g. "
      f"{fix} (with the file's real encoding for latin1), or leave it out of data.paths.")


def _iter_lines(chunks: Iterable[str]) -> Iterator[str]:
  """Yields the lines of the text in ``chunks``, without their ``\n``."""
  partial: list[str] = []  # pieces of a line that has not ended yet
  for chunk in chunks:
    pieces = chunk.split("\n")
    if len(pieces) == 1:
      partial.append(chunk)
      continue
    partial.append(pieces[0])
    yield "".join(partial)
    yield from pieces[1:-1]
    partial = [pieces[-1]]
  if partial and any(partial):
    yield "".join(partial)


def _split_blank_lines(chunks: Iterable[str]) -> Iterator[str]:
  """Documents separated by runs of lines holding only whitespace."""
  lines: list[str] = []
  for line in _iter_lines(chunks):
    if line.strip():
      lines.append(line)
    elif lines:
      yield "\n".join(lines).strip()
      lines = []
  if lines:
    yield "\n".join(lines).strip()


def _split_literal(chunks: Iterable[str], separator: str) -> Iterator[str]:
  """Documents between occurrences of ``separator`` (as ``str.split`` finds them)."""
  keep = len(separator) - 1  # a separator may start this many characters before a chunk's end
  parts: list[str] = []  # the unfinished document, except ``tail``
  tail = ""  # its last ``keep`` characters at most, searched again with the next chunk
  for chunk in chunks:
    text = tail + chunk
    start = 0
    while (i := text.find(separator, start)) >= 0:
      parts.append(text[start:i])
      yield "".join(parts).strip()
      parts, start = [], i + len(separator)
    rest = text[start:]
    cut = max(len(rest) - keep, 0)
    parts.append(rest[:cut])
    tail = rest[cut:]
  parts.append(tail)
  yield "".join(parts).strip()


def _iter_jsonl(path: str, chunk_bytes: int | None) -> Iterator[str]:
  """The ``"text"`` field of each non-blank line, unchanged."""
  for line_no, line in enumerate(_iter_lines(_iter_chunks(path, chunk_bytes)), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{line_no}: not a JSON object ({e.msg}); a .jsonl file holds one "
                      'object per line, like {"text": "..."}.') from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{line_no}: a .jsonl line needs a string 'text' field.")
    yield record["text"]


def iter_text_documents(
    paths: str | Sequence[str], separator: str = "blank_line", *, chunk_bytes: int | None = None
) -> Iterator[str]:
  """Streams the documents of local text files, reading ``chunk_bytes`` (1 MiB) at a time.

  ``.txt``/``.txt.gz`` (any file that is not ``.jsonl``) is split by ``separator``:

  * ``"blank_line"``: a run of one or more blank (whitespace-only) lines ends a document;
  * ``"file"``: one document per file; this mode holds a whole file in memory as one string;
  * any other non-empty string: a literal separator (e.g. ``"<|endoftext|>"``).

  Documents are stripped of surrounding whitespace and empty ones dropped; each is yielded as soon
  as its end is read, so no file is held whole (except with ``"file"``). A ``.jsonl``/
  ``.jsonl.gz`` file gives one document per line, its ``"text"`` field unchanged, whatever the
  separator. Files come in ``expand_paths`` order.

  Args:
    paths: comma-separated files or globs (or a sequence of them).
    separator: "blank_line" | "file" | a literal separator.
    chunk_bytes: bytes per read; None = ``CHUNK_BYTES``.

  Raises:
    MissingFileError: a path or glob matches no file.
    ConfigError: ``paths`` is empty or ``separator`` is "".
    DataError: a file is unreadable or not UTF-8 (naming the byte offset), or a ``.jsonl`` line is
      not JSON or has no ``"text"`` (naming ``file:line``).

  Example:
    >>> # book.txt holds "Chapter 1.\n\nIt was.\n \n\nThe end.\n"
    >>> list(iter_text_documents("book.txt"))  # doctest: +SKIP
    ['Chapter 1.', 'It was.', 'The end.']
  """
  check_separator(separator)
  for path in expand_paths(paths):
    if path.endswith(_JSONL_SUFFIXES):
      docs = _iter_jsonl(path, chunk_bytes)
    elif separator == "file":
      docs = iter(["".join(_iter_chunks(path, chunk_bytes)).strip()])
    elif separator == "blank_line":
      docs = _split_blank_lines(_iter_chunks(path, chunk_bytes))
    else:
      docs = _split_literal(_iter_chunks(path, chunk_bytes), separator)
    yield from (d for d in docs if d.strip())


def read_text_documents(
    paths: str | Sequence[str], separator: str = "blank_line", *, chunk_bytes: int | None = None
) -> list[str]:
  """All documents of ``iter_text_documents(paths, separator)`` as a list.

  Example:
    >>> read_text_documents("notes/*.txt,books/**/*.txt.gz", "<|endoftext|>")  # doctest: +SKIP
  """
  return list(iter_text_documents(paths, separator, chunk_bytes=chunk_bytes))


def document_key(text: str) -> bytes:
  """A stable per-document hash; decides the held-out split independently of any seed."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def validation_indices(keys: Sequence[bytes], validation_fraction: float) -> list[int]:
  """Indices of the held-out documents, given each document's ``document_key`` in order.

  The ``ceil(fraction * n)`` documents with the smallest key are held out (at least one when
  ``fraction > 0`` and there are two or more documents, never all of them); ties go to the earlier
  index. Takes keys rather than texts so a streamed corpus needs only 16 bytes per document.

  Returns:
    The held-out indices, sorted.

  Example:
    >>> validation_indices([b"\\x02", b"\\x00", b"\\x01"], 0.5)
    [1, 2]
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1).")
  n = len(keys)
  n_val = math.ceil(validation_fraction * n) if n > 1 else 0
  n_val = min(n_val, n - 1)
  order = sorted(range(n), key=lambda i: (keys[i], i))
  return sorted(order[:n_val])


def split_train_validation(
    docs: Sequence[str], validation_fraction: float
) -> tuple[list[int], list[int]]:
  """Indices of training and held-out documents.

  The held-out documents are ``validation_indices`` of the documents' ``document_key``: the choice
  depends only on the documents' text, never on a shuffle seed, process count or tokenizer.

  Returns:
    ``(train_indices, validation_indices)``, both sorted.
  """
  val = validation_indices([document_key(d) for d in docs], validation_fraction)
  val_set = set(val)
  return [i for i in range(len(docs)) if i not in val_set], val
