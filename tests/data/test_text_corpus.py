"""Local text corpora: documents cut by separator, streamed in chunks; errors; one file end to end.

Expected documents are written out by hand; the chunk-boundary tests also compare a tiny chunk
size against a huge one.
"""

from __future__ import annotations

import gzip
import json

import grain
import numpy as np
import pytest

from softmax_one_jax import data
from softmax_one_jax.data import corpus
from softmax_one_jax.data import tokenizers
from softmax_one_jax.errors import ConfigError, DataError, MissingFileError
from tests.data.conftest import ToyTokenizer, make_docs

TOK = ToyTokenizer()

# Paragraphs separated by one blank line, by runs of several, and by whitespace-only lines; a
# hard-wrapped paragraph keeps its inner newline; leading/trailing space is stripped.
BOOK = (
    "\n\n  Chapter 1.  \n"
    "\n"
    "It was a truth\n"
    "universally acknowledged.\n"
    "\n\n\n"
    "Second paragraph.\n"
    " \t \n"
    "Third, after a whitespace-only line.\n"
    "   \n"
    "\n"
    "  \n"
    "Fourth: ünïcödé € 😀.\n"
    "\n"
)
BOOK_DOCS = [
    "Chapter 1.",
    "It was a truth\nuniversally acknowledged.",
    "Second paragraph.",
    "Third, after a whitespace-only line.",
    "Fourth: ünïcödé € 😀.",
]


def _write(path, text: str | bytes):
  raw = text.encode("utf-8") if isinstance(text, str) else text
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(raw)
  else:
    path.write_bytes(raw)
  return str(path)


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz"])
def test_blank_lines_split_one_file_into_paragraphs(tmp_path, name):
  path = _write(tmp_path / name, BOOK)
  assert corpus.read_text_documents(path) == BOOK_DOCS
  assert corpus.read_text_documents(path, "blank_line") == BOOK_DOCS


def test_windows_line_ends_and_no_final_newline(tmp_path):
  path = _write(tmp_path / "dos.txt", "One\r\ntwo\r\n\r\n \r\nThree")
  assert corpus.read_text_documents(path) == ["One\r\ntwo", "Three"]


def test_literal_separator(tmp_path):
  path = _write(tmp_path / "web.txt",
                "First doc.\n\nStill first.<|endoftext|>  Second.\n<|endoftext|>"
                "<|endoftext|> \n <|endoftext|>Third<|endoftext|>\n")
  assert corpus.read_text_documents(path, "<|endoftext|>") == [
      "First doc.\n\nStill first.", "Second.", "Third"]
  # A one-character separator.
  path = _write(tmp_path / "bar.txt", "a|b||c |")
  assert corpus.read_text_documents(path, "|") == ["a", "b", "c"]


def test_file_mode_is_one_document_per_file(tmp_path):
  path = _write(tmp_path / "book.txt", BOOK)
  assert corpus.read_text_documents(path, "file") == [BOOK.strip()]


def test_many_files_in_path_order_and_jsonl_ignores_the_separator(tmp_path):
  _write(tmp_path / "b.txt", "B1\n\nB2\n")
  _write(tmp_path / "a.txt.gz", "A1\n \nA2\n\n\nA3")
  _write(tmp_path / "c.txt", "   \n\n")  # no document at all
  _write(tmp_path / "d.jsonl", json.dumps({"text": "J1\n\nstill J1"}) + "\n\n"
         + json.dumps({"text": " J2 ", "id": 2}) + "\n")
  paths = f"{tmp_path}/*.txt,{tmp_path}/*.gz,{tmp_path}/d.jsonl"
  assert corpus.read_text_documents(paths) == ["A1", "A2", "A3", "B1", "B2", "J1\n\nstill J1",
                                               " J2 "]
  assert corpus.read_text_documents(paths, "file") == [
      "A1\n \nA2\n\n\nA3", "B1\n\nB2", "J1\n\nstill J1", " J2 "]


# Separators, blank lines and a multi-byte character at every position relative to a chunk end.
_BOUNDARY_TEXT = ("ab\n\ncd\n \n\nefg<SEP>hi€jk\n\t\n😀<SEP>\n\n<SEP>lmnop€\n  \nq" * 3)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 6, 7, 11])
def test_chunk_boundaries_do_not_change_documents(tmp_path, chunk):
  path = _write(tmp_path / "t.txt", _BOUNDARY_TEXT)
  by_blank = ["ab", "cd", "efg<SEP>hi€jk", "😀<SEP>", "<SEP>lmnop€",
              "qab", "cd", "efg<SEP>hi€jk", "😀<SEP>", "<SEP>lmnop€",
              "qab", "cd", "efg<SEP>hi€jk", "😀<SEP>", "<SEP>lmnop€", "q"]
  by_sep = ["ab\n\ncd\n \n\nefg", "hi€jk\n\t\n😀",
            "lmnop€\n  \nqab\n\ncd\n \n\nefg", "hi€jk\n\t\n😀",
            "lmnop€\n  \nqab\n\ncd\n \n\nefg", "hi€jk\n\t\n😀", "lmnop€\n  \nq"]
  for separator, expected in (("blank_line", by_blank), ("<SEP>", by_sep),
                              ("file", [_BOUNDARY_TEXT.strip()])):
    huge = corpus.read_text_documents(path, separator, chunk_bytes=1 << 20)
    assert huge == expected
    assert corpus.read_text_documents(path, separator, chunk_bytes=chunk) == expected


def _bad_offset(path, chunk):
  with pytest.raises(DataError) as e:
    corpus.read_text_documents(path, chunk_bytes=chunk)
  message = str(e.value)
  assert path in message and "iconv -f latin1 -t utf-8" in message
  return int(message.split("byte offset ")[1].split(")")[0]), message


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
@pytest.mark.parametrize("raw, offset", [
    (b"\xffabc", 0),                             # first byte
    (b"abcdefg\xffhij", 7),                      # just after a 7-byte chunk boundary
    (b"abcdefghij\xffk", 10),                    # inside the second chunk
    (b"abcdef\xe2\x82Xyz", 6),                   # 3-byte character split 1|2 over the boundary,
    (b"abcde\xe2\x82Xyz", 5),                    # ... or 2|1, broken by the byte after it
    (b"abcdef\xc3\xa9gh\xe2\x82\xacij\x80", 15),  # valid ones across the boundary, then a bad one
    (b"abcdefgh\xe2\x82", 8),                    # truncated character at the end of the file
])
def test_non_utf8_names_the_exact_byte_offset(tmp_path, raw, offset, suffix):
  path = _write(tmp_path / f"bad{suffix}", raw)
  for chunk in (7, 1, 2, 1 << 20):
    found, message = _bad_offset(path, chunk)
    assert found == offset, (chunk, message)
    assert ("decompressed" in message) == suffix.endswith(".gz")


def test_missing_paths_and_globs(tmp_path):
  _write(tmp_path / "a.txt", "x")
  with pytest.raises(MissingFileError, match=r"'/nonexistent/\*\*/\*.txt' matches no file"):
    corpus.read_text_documents(f"{tmp_path}/a.txt,/nonexistent/**/*.txt")
  with pytest.raises(FileNotFoundError, match="nothere.txt"):
    list(corpus.iter_text_documents(str(tmp_path / "nothere.txt")))
  with pytest.raises(ConfigError, match="paths is empty"):
    corpus.read_text_documents(" , ")
  with pytest.raises(ConfigError, match="document_separator"):
    corpus.read_text_documents(f"{tmp_path}/a.txt", "")


def test_unreadable_file_names_it(tmp_path, monkeypatch):
  path = _write(tmp_path / "secret.txt", "x")

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", path)

  monkeypatch.setattr(corpus, "open", denied, raising=False)
  with pytest.raises(DataError, match=r"secret\.txt: cannot be read \(Permission denied\)"):
    corpus.read_text_documents(path)


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
  good = json.dumps({"text": "ok"})
  path = _write(tmp_path / "x.jsonl", f"{good}\n\n{{not json\n")
  with pytest.raises(DataError, match=r"x\.jsonl:3: not a JSON object"):
    corpus.read_text_documents(path)
  path = _write(tmp_path / "y.jsonl.gz", f"{good}\n{good}\n" + json.dumps({"body": "no"}) + "\n")
  with pytest.raises(DataError, match=r"y\.jsonl\.gz:3: .*'text' field"):
    corpus.read_text_documents(path)


def test_config_field_default_and_check():
  cfg = data.default_data_config()
  assert cfg.document_separator == "blank_line"
  data.config.check_data_config(cfg)
  cfg.document_separator = ""
  with pytest.raises(ConfigError, match="document_separator=''"):
    data.config.check_data_config(cfg)
  del cfg["document_separator"]  # a config saved before the field existed
  data.config.check_data_config(cfg)


# ---------------------------------------------------------------------------------------------
# One book through the pipeline and through `prepare`.


def _book(tmp_path, num=40):
  """A file of ``num`` hard-wrapped toy paragraphs (globally unique word ids) and the paragraphs."""
  paragraphs = make_docs(np.random.default_rng(1), num_docs=num, min_len=3, max_len=40)
  wrapped = []
  for p in paragraphs:
    words = p.split()
    wrapped.append("\n".join(" ".join(words[i:i + 7]) for i in range(0, len(words), 7)))
  text = "\n\n".join(wrapped[:10]) + "\n \n\n\n" + "\n\n".join(wrapped[10:]) + "\n"
  return _write(tmp_path / "book.txt", text), wrapped


def _book_cfg(tmp_path, path, fraction=0.1):
  cfg = data.default_data_config()
  cfg.source, cfg.paths, cfg.validation_fraction = "text", path, fraction
  cfg.cache_dir = str(tmp_path / "cache")
  return cfg


def _docs_seen(batches, paragraphs):
  """Indices of the paragraphs whose words appear in ``batches`` (toy ids are unique)."""
  owner = {int(w[1:]): i for i, p in enumerate(paragraphs) for w in p.split()}
  seen = set()
  for b in batches:
    ids = b["inputs"][b["segment_ids"] > 0]
    seen.update(owner[int(t)] for t in ids if int(t) in owner)
  return seen


def test_one_file_gives_train_and_validation_splits(tmp_path):
  path, paragraphs = _book(tmp_path)
  cfg = _book_cfg(tmp_path, path)
  train = _docs_seen(data.train_dataset(cfg, TOK, seq_len=16, batch_size=2, seed=0,
                                        num_epochs=1), paragraphs)
  val = _docs_seen(data.validation_batches(cfg, TOK, seq_len=16, batch_size=2), paragraphs)
  assert len(val) == 4  # ceil(0.1 * 40)
  assert not train & val and train | val == set(range(40))
  it = data.build_train_iterator(cfg, TOK, seq_len=16, global_batch_size=2, seed=0)
  assert not _docs_seen([next(it) for _ in range(20)], paragraphs) & val


def test_too_few_documents_say_how_to_get_more(tmp_path):
  path, _ = _book(tmp_path, num=5)
  cfg = _book_cfg(tmp_path, path)
  cfg.document_separator = "file"
  with pytest.raises(DataError, match=r"found 1 document\(s\).*document_separator='blank_line'"):
    data.validation_batches(cfg, TOK, seq_len=16, batch_size=2)


def _read_split(folder, meta, split):
  files = [f"{folder}/{f}" for f in meta["splits"][split]["files"]]
  source = grain.sources.ArrayRecordDataSource(files)
  return [np.frombuffer(source[i], meta["dtype"]).tolist() for i in range(len(source))]


def test_prepare_one_file_splits_like_the_pipeline(tmp_path):
  path, paragraphs = _book(tmp_path)
  cfg = _book_cfg(tmp_path, path)
  val = _docs_seen(data.validation_batches(cfg, TOK, seq_len=16, batch_size=2), paragraphs)
  out = tmp_path / "prepared"
  meta = data.prepare(str(out), source="text", paths=path, tokenizer="gpt2",
                      validation_fraction=0.1, records_per_shard=16)
  tok = tokenizers.gpt2_tokenizer()
  assert [tok.decode(r) for r in _read_split(out, meta, "train")] == [
      p for i, p in enumerate(paragraphs) if i not in val]
  assert [tok.decode(r) for r in _read_split(out, meta, "validation")] == [
      paragraphs[i] for i in sorted(val)]


def test_prepare_flag_and_bpe_stream_a_literal_separator(tmp_path):
  path = _write(tmp_path / "web.txt", "<|endoftext|>".join(
      f"Document {i} says hello to the world." for i in range(12)))
  meta = data.prepare_main(["prepare", "--output_dir", str(tmp_path / "out"), "--source", "text",
                            "--paths", path, "--document_separator", "<|endoftext|>",
                            "--tokenizer", "bpe", "--bpe_vocab_size", "300",
                            "--validation_fraction", "0.25", "--cache_dir",
                            str(tmp_path / "cache")])
  assert meta["splits"]["train"]["num_documents"] == 9
  assert meta["splits"]["validation"]["num_documents"] == 3


class _ReadRecorder:
  """Wraps a binary file and records how many bytes each ``read`` asked for and got."""

  def __init__(self, f, log):
    self._f, self._log = f, log

  def read(self, n=-1):
    data_ = self._f.read(n)
    self._log.append((n, len(data_)))
    return data_

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def test_files_are_streamed_not_read_whole(tmp_path, monkeypatch):
  path, paragraphs = _book(tmp_path)
  size = len(open(path, "rb").read())
  reads = []
  open_binary = corpus._open_binary  # pylint: disable=protected-access
  monkeypatch.setattr(corpus, "_open_binary", lambda p: _ReadRecorder(open_binary(p), reads))
  monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)
  docs = corpus.iter_text_documents(path)
  assert next(docs) == paragraphs[0]
  assert sum(got for _, got in reads) < size  # the first document came before the file's end
  assert list(docs) == paragraphs[1:]
  reads.clear()
  data.prepare(str(tmp_path / "out"), source="text", paths=path, tokenizer="gpt2",
               validation_fraction=0.1)
  assert reads and all(0 < asked <= 64 for asked, _ in reads)
  assert sum(got for _, got in reads) >= 3 * size  # keys, train and validation passes
