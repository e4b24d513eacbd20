"""`softmax-one prepare`: ArrayRecord shards round trip; C4 wiring; the embedded corpus."""

from __future__ import annotations

import collections
import gzip
import json
import re
import sys
import types

import grain
import numpy as np
import pytest

from softmax_one_jax import data
from softmax_one_jax.data import corpus
from softmax_one_jax.data import prepare as prepare_lib
from softmax_one_jax.data import tokenizers

DOCS = [
    "It is a truth universally acknowledged.",
    "Emma Woodhouse, handsome, clever, and rich.",
    "The family of Dashwood had long been settled in Sussex.",
    "No one who had ever seen Catherine Morland in her infancy.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire.",
    "About thirty years ago Miss Maria Ward, of Huntingdon.",
    "Ünïcödé, 数字 and emoji 😀 survive the round trip.",
]


@pytest.fixture
def text_files(tmp_path):
  for i, d in enumerate(DOCS):
    (tmp_path / f"d{i}.txt").write_text(d, encoding="utf-8")
  with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as f:
    f.write(json.dumps({"text": "A jsonl document."}) + "\n\n")
    f.write(json.dumps({"text": "Another one."}) + "\n")
  return str(tmp_path / "d*.txt") + "," + str(tmp_path / "*.jsonl.gz")


def _read_split(folder, meta, split):
  files = [f"{folder}/{f}" for f in meta["splits"][split]["files"]]
  source = grain.sources.ArrayRecordDataSource(files)
  return [np.frombuffer(source[i], meta["dtype"]).tolist() for i in range(len(source))]


def test_round_trip_text_to_shards_and_back(tmp_path, text_files):
  out = tmp_path / "prepared"
  meta = data.prepare(str(out), source="text", paths=text_files, tokenizer="gpt2",
                      validation_fraction=0.2, records_per_shard=2)
  docs = corpus.read_text_documents(text_files)
  assert len(docs) == len(DOCS) + 2
  train_idx, val_idx = corpus.split_train_validation(docs, 0.2)
  tok = tokenizers.gpt2_tokenizer()
  assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
  assert len(meta["splits"]["train"]["files"]) == -(-len(train_idx) // 2)
  for split, idx in (("train", train_idx), ("validation", val_idx)):
    records = _read_split(out, meta, split)
    assert [tok.decode(r) for r in records] == [docs[i] for i in idx]
    assert records == [tok.encode(docs[i]) for i in idx]  # the same split as in memory
    assert meta["splits"][split]["num_tokens"] == sum(map(len, records))
  with pytest.raises(FileExistsError):
    data.prepare(str(out), source="text", paths=text_files)


def test_arrayrecord_source_feeds_the_same_pairs(tmp_path, text_files):
  out = tmp_path / "prepared"
  data.prepare(str(out), source="text", paths=text_files, tokenizer="gpt2",
               validation_fraction=0.2, records_per_shard=3)
  cfg = data.default_data_config()
  cfg.source, cfg.paths = "arrayrecord", str(out)
  tok = data.get_tokenizer(cfg)
  docs = corpus.read_text_documents(text_files)
  train_idx, val_idx = corpus.split_train_validation(docs, 0.2)

  def pairs(texts):
    c = collections.Counter()
    for t in texts:
      f = [tok.bos_id, *tok.encode(t), tok.eos_id]
      c.update(zip(f[:-1], f[1:]))
    return c

  def seen(rows):
    c = collections.Counter()
    for b in rows:
      real = b["segment_ids"] > 0
      np.testing.assert_array_equal(b["weights"], real)
      c.update(zip(b["inputs"][real].tolist(), b["targets"][real].tolist()))
    return c

  ds = data.train_dataset(cfg, tok, seq_len=8, batch_size=1, seed=0, num_epochs=1)
  assert seen(ds) == pairs([docs[i] for i in train_idx])
  val = data.validation_batches(cfg, tok, seq_len=8, batch_size=2)
  assert seen(val) == pairs([docs[i] for i in val_idx])
  # The infinite iterator restores exactly from a JSON state, as for in-memory sources.
  it = data.build_train_iterator(cfg, tok, seq_len=8, global_batch_size=2, seed=4)
  [next(it) for _ in range(7)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  fresh = data.build_train_iterator(cfg, tok, seq_len=8, global_batch_size=2, seed=4)
  fresh.set_state(state)
  for a, b in zip(expected, [next(fresh) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Reading with another tokenizer than the one that wrote the shards is refused.
  cfg.tokenizer, cfg.bpe_vocab_size = "bpe", 300
  cfg.tokenizer_path = tokenizers.bpe_tokenizer(DOCS, 300, str(tmp_path / "c")).path
  with pytest.raises(ValueError, match="tokenised with 'gpt2'"):
    data.build_train_iterator(cfg, data.get_tokenizer(cfg), seq_len=8, global_batch_size=2)


def test_prepared_bpe_travels_with_the_shards(tmp_path, text_files):
  out = tmp_path / "prepared"
  meta = data.prepare_main(["prepare", "--output_dir", str(out), "--source", "text", "--paths",
                            text_files, "--tokenizer", "bpe", "--bpe_vocab_size", "300",
                            "--cache_dir", str(tmp_path / "cache"), "--records_per_shard", "4"])
  cfg = data.default_data_config()
  cfg.source, cfg.paths, cfg.tokenizer = "arrayrecord", str(out), "bpe"
  tok = data.get_tokenizer(cfg)  # from out/tokenizer.tiktoken, no training
  assert tok.fingerprint == meta["tokenizer_fingerprint"]
  records = _read_split(out, meta, "train")
  docs = corpus.read_text_documents(text_files)
  train_idx, _ = corpus.split_train_validation(docs, 0.05)
  assert [tok.decode(r) for r in records] == [docs[i] for i in train_idx]
  next(data.build_train_iterator(cfg, tok, seq_len=8, global_batch_size=2))


class _FakeDatasets(types.SimpleNamespace):
  """Stands in for Hugging Face `datasets` (not installed, and no network in tests)."""

  def __init__(self):
    super().__init__(calls=[])

  def load_dataset(self, path, name, split, streaming):
    self.calls.append((path, name, split, streaming))
    n = 7 if split == "train" else 3
    return iter([{"text": f"{split} document number {i}.", "url": "x"} for i in range(n)])


def test_c4_through_datasets(tmp_path, monkeypatch):
  fake = _FakeDatasets()
  monkeypatch.setitem(sys.modules, "datasets", fake)
  meta = data.prepare(str(tmp_path / "c4"), source="c4", tokenizer="gpt2", max_documents=5,
                      max_validation_documents=2)
  assert ("allenai/c4", "en", "train", True) in fake.calls
  assert meta["source"] == "c4/en"
  tok = tokenizers.gpt2_tokenizer()
  assert [tok.decode(r) for r in _read_split(tmp_path / "c4", meta, "train")] == [
      f"train document number {i}." for i in range(5)]
  assert [tok.decode(r) for r in _read_split(tmp_path / "c4", meta, "validation")] == [
      f"validation document number {i}." for i in range(2)]
  cfg = data.default_data_config()
  cfg.source, cfg.paths = "c4", str(tmp_path / "c4")
  assert next(data.build_train_iterator(cfg, tok, seq_len=8, global_batch_size=2))[
      "inputs"].shape == (2, 8)


def test_c4_without_datasets_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    data.prepare(str(tmp_path / "c4"), source="c4")
  cfg = data.default_data_config()
  cfg.source, cfg.paths = "arrayrecord", str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="softmax-one prepare"):
    data.build_train_iterator(cfg, tokenizers.gpt2_tokenizer(), seq_len=8, global_batch_size=2)


def test_embedded_corpus_is_split_into_chapters_without_losing_text():
  docs = corpus.default_documents()
  assert len(docs) == 269  # grep -c '^CHAPTER [IVXLC]*$\|^Chapter [0-9]*$' on the raw text
  with gzip.open(corpus.default_corpus_path(), "rt", encoding="utf-8") as f:
    raw = f.read()
  assert " ".join(" ".join(docs).split()) == " ".join(raw.split())
  heading = re.compile(r"^(CHAPTER|Chapter) ([IVXLC]+|\d+)\.?$", re.MULTILINE)
  assert all(len(heading.findall(d)) == 1 for d in docs)  # one chapter per document
  _, val_idx = corpus.split_train_validation(docs, 0.05)
  assert len(val_idx) == 14  # ceil(0.05 * 269)


def test_split_chapters_example():
  text = "TITLE\n\nCHAPTER I\n\nOne two\nthree.\n\nFour.\n\nChapter 2\n\nFive.\n"
  assert corpus.split_chapters(text) == [
      "TITLE\n\nCHAPTER I\n\nOne two three.\n\nFour.", "Chapter 2\n\nFive."]
