"""The Grain pipeline: packing, segment ids, weights, shuffling, sharding, held-out split, state."""

from __future__ import annotations

import collections
import json

import grain
import numpy as np
import pytest

from softmax_one_jax import data
from softmax_one_jax.data import corpus
from softmax_one_jax.data import pipeline
from softmax_one_jax.data import tokens
from tests.data.conftest import ToyTokenizer, framed

TOK = ToyTokenizer()
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _rows(batches):
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      yield {k: b[k][r] for k in KEYS}


def _reference_pairs(docs):
  """Every (input, target) pair of every framed document; all unique for toy documents."""
  pairs = collections.Counter()
  for d in docs:
    f = framed(d)
    pairs.update(zip(f[:-1], f[1:]))
  return pairs


def _check_row(row, seq_len):
  """Packing invariants of one row, checked from the definitions."""
  seg, pos, w = row["segment_ids"], row["positions"], row["weights"]
  assert seg.shape == pos.shape == w.shape == row["inputs"].shape == (seq_len,)
  real = seg > 0
  n_real = int(real.sum())
  assert real[:n_real].all() and not real[n_real:].any(), "padding only at the end"
  np.testing.assert_array_equal(w, real.astype(np.float32))
  assert seg.dtype == np.int32 and pos.dtype == np.int32 and w.dtype == np.float32
  if n_real:
    assert seg[0] == 1
    steps = np.diff(seg[:n_real])
    assert set(steps.tolist()) <= {0, 1}, "segment ids count 1, 2, 3, ..."
  for s in range(1, int(seg.max(initial=0)) + 1):
    idx = np.flatnonzero(seg == s)
    np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
    # Within a segment the stream is contiguous: each target is the next input.
    np.testing.assert_array_equal(row["targets"][idx[:-1]], row["inputs"][idx[1:]])
  assert not row["inputs"][~real].any() and not row["targets"][~real].any()


def _epoch_pairs(rows):
  pairs = collections.Counter()
  for row in rows:
    real = row["segment_ids"] > 0
    pairs.update(zip(row["inputs"][real].tolist(), row["targets"][real].tolist()))
  return pairs


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_one_epoch_packs_every_training_pair_exactly_once(text_corpus, seq_len):
  cfg, docs = text_corpus
  train_idx, _ = corpus.split_train_validation(docs, cfg.validation_fraction)
  ds = data.train_dataset(cfg, TOK, seq_len=seq_len, batch_size=1, seed=3, num_epochs=1)
  rows = list(_rows(ds))
  for row in rows:
    _check_row(row, seq_len)
  # Exactly the training documents' pairs: none lost, none twice, none across documents.
  assert _epoch_pairs(rows) == _reference_pairs([docs[i] for i in train_idx])
  # No padding but for one row: the packer's buffer, flushed when the finite stream ends.
  assert sum(not r["weights"].all() for r in rows) <= 1


def test_segments_inside_a_row_start_at_piece_boundaries(text_corpus):
  # A segment that starts mid-row is a piece: framed offset 0 (BOS), seq_len, 2 * seq_len, ...;
  # only grain's split of an overlong remainder starts a segment elsewhere, and that one always
  # opens a new row.
  cfg, docs = text_corpus
  seq_len = 16
  offset = {tok: i for d in docs for i, tok in enumerate(framed(d)) if i > 0}
  offset[TOK.bos_id] = 0
  ds = data.train_dataset(cfg, TOK, seq_len=seq_len, batch_size=1, seed=0, num_epochs=1)
  n_mid_row = 0
  for row in _rows(ds):
    seg = row["segment_ids"]
    for t in np.flatnonzero((seg[1:] != seg[:-1]) & (seg[1:] > 0)) + 1:
      assert offset[int(row["inputs"][t])] % seq_len == 0
      n_mid_row += 1
  assert n_mid_row > 0


def test_hand_packed_example():
  # Two framed documents, bos = eos = 0: A = [0, 1, 2, 0] (3 pairs), B = [0, 3, 4, 5, 6, 7, 0]
  # (6 pairs). seq_len 4 cuts B into pieces of 4 and 2 pairs: pieces A(3), B1(4), B2(2).
  tokens_n = np.array([0, 1, 2, 0, 0, 3, 4, 5, 6, 7, 0], np.uint16)
  starts = np.array([0, 4, 11])
  start_p, len_p = tokens.piece_table(starts, [0, 1], seq_len=4)
  np.testing.assert_array_equal(start_p, [0, 4, 8])
  np.testing.assert_array_equal(len_p, [3, 4, 2])
  source = tokens.PieceSource(tokens_n, start_p, len_p)
  ds = grain.MapDataset.source(source).to_iter_dataset()
  rows = [pipeline._finalize(r) for r in pipeline.pack(ds, seq_len=4)]
  # As grain documents it: rows keep the order in which they were opened. A opens row 1; B1 is
  # full-length and becomes row 2 as it is; B2 fills row 1 and its tail opens row 3.
  expected = [
      dict(inputs=[0, 1, 2, 6], targets=[1, 2, 0, 7], segment_ids=[1, 1, 1, 2],
           positions=[0, 1, 2, 0]),
      dict(inputs=[0, 3, 4, 5], targets=[3, 4, 5, 6], segment_ids=[1, 1, 1, 1],
           positions=[0, 1, 2, 3]),
      dict(inputs=[7, 0, 0, 0], targets=[0, 0, 0, 0], segment_ids=[1, 0, 0, 0],
           positions=[0, 0, 0, 0]),
  ]
  assert len(rows) == len(expected)
  for row, exp in zip(rows, expected):
    for k, v in exp.items():
      np.testing.assert_array_equal(row[k], v, err_msg=k)
    np.testing.assert_array_equal(row["weights"], np.array(exp["segment_ids"]) > 0)


def test_batches_have_contract_shapes_and_dtypes(text_corpus):
  cfg, _ = text_corpus
  it = data.build_train_iterator(cfg, TOK, seq_len=16, global_batch_size=8, seed=0)
  batch = next(it)
  assert sorted(batch) == sorted(KEYS)
  for k in KEYS:
    assert batch[k].shape == (8, 16)
    assert batch[k].dtype == (np.float32 if k == "weights" else np.int32)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def _differs(a, b):
  return any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, b))


def test_same_seed_same_batches_other_seed_other_batches(text_corpus):
  cfg, _ = text_corpus
  make = lambda seed: data.build_train_iterator(cfg, TOK, seq_len=16, global_batch_size=4,
                                                seed=seed)
  reference = _take(make(0), 10)
  _assert_same_batches(reference, _take(make(0), 10))
  assert _differs(reference, _take(make(1), 10))
  cfg.shuffle_seed = 7
  assert _differs(reference, _take(make(0), 10))


def test_infinite_and_reshuffled_each_epoch(text_corpus):
  cfg, docs = text_corpus
  train_idx, _ = corpus.split_train_validation(docs, cfg.validation_fraction)
  n_pairs = sum(_reference_pairs([docs[i] for i in train_idx]).values())
  seq_len = 8
  # Piece order per epoch (first input of each piece): compare epoch 1 with epoch 2.
  source, _ = pipeline._document_dataset(cfg, TOK, seq_len, "train")
  n = len(source)
  ds = source.shuffle(pipeline._mix_seed(cfg.shuffle_seed, 0)).repeat()
  order = [int(ds[i]["inputs"][0]) for i in range(3 * n)]
  assert sorted(order[:n]) == sorted(order[n:2 * n]) == sorted(order[2 * n:])
  assert order[:n] != order[n:2 * n] != order[2 * n:]
  # The iterator itself runs past several epochs without stopping.
  it = data.build_train_iterator(cfg, TOK, seq_len=seq_len, global_batch_size=4)
  rows_needed = 3 * n_pairs // (4 * seq_len) + 2
  assert len(_take(it, rows_needed)) == rows_needed


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_restores_exactly_through_json(text_corpus, prefetch):
  cfg, _ = text_corpus
  cfg.prefetch_buffer_size = prefetch
  make = lambda: data.build_train_iterator(cfg, TOK, seq_len=8, global_batch_size=2, seed=5)
  for k in (0, 1, 3, 10, 37):
    it = make()
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint on disk holds
    expected = _take(it, 6)
    fresh = make()
    fresh.set_state(state)
    _assert_same_batches(_take(fresh, 6), expected)


def test_state_round_trips_through_grain_checkpoint_handler(text_corpus, tmp_path):
  cfg, _ = text_corpus
  make = lambda: data.build_train_iterator(cfg, TOK, seq_len=8, global_batch_size=2, seed=1)
  it = make()
  _take(it, 13)
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "ckpt").mkdir()  # Orbax makes the folder; the bare handler expects it
  handler.save(tmp_path / "ckpt", item=it)
  expected = _take(it, 5)
  fresh = make()
  handler.restore(tmp_path / "ckpt", item=fresh)
  _assert_same_batches(_take(fresh, 5), expected)


def test_each_process_reads_only_its_shard(text_corpus):
  cfg, docs = text_corpus
  train_idx, _ = corpus.split_train_validation(docs, cfg.validation_fraction)
  per_process = []
  for p in range(2):
    it = data.build_train_iterator(cfg, TOK, seq_len=8, global_batch_size=4, seed=0,
                                   process_index=p, process_count=2)
    assert next(it)["inputs"].shape == (2, 8)
    ds = data.train_dataset(cfg, TOK, seq_len=8, batch_size=1, seed=0, process_index=p,
                            process_count=2, num_epochs=1)
    per_process.append(_epoch_pairs(_rows(ds)))
  assert not set(per_process[0]) & set(per_process[1]), "shards overlap"
  assert per_process[0] + per_process[1] == _reference_pairs([docs[i] for i in train_idx])
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.build_train_iterator(cfg, TOK, seq_len=8, global_batch_size=3, process_count=2)


def test_validation_is_held_out_fixed_and_complete(text_corpus):
  cfg, docs = text_corpus
  train_idx, val_idx = corpus.split_train_validation(docs, cfg.validation_fraction)
  assert len(val_idx) == 4  # ceil(0.1 * 40)
  val_pairs = _reference_pairs([docs[i] for i in val_idx])
  batches = data.validation_batches(cfg, TOK, seq_len=8, batch_size=3)
  assert batches and all(b["inputs"].shape == (3, 8) for b in batches)
  rows = list(_rows(batches))
  for row in rows:
    _check_row(row, 8)
  assert _epoch_pairs(rows) == val_pairs
  _assert_same_batches(batches, data.validation_batches(cfg, TOK, seq_len=8, batch_size=3))
  assert len(data.validation_batches(cfg, TOK, seq_len=8, batch_size=3, num_batches=2)) == 2
  # Never trained on: no training pair over several epochs is a validation pair.
  ds = data.train_dataset(cfg, TOK, seq_len=8, batch_size=1, num_epochs=3)
  assert not set(_epoch_pairs(_rows(ds))) & set(val_pairs)


def test_split_depends_on_text_only():
  rng = np.random.default_rng(0)
  docs = [" ".join(f"w{i}" for i in rng.integers(1, 1000, size=5)) + f" w{j}" for j in range(50)]
  train, val = corpus.split_train_validation(docs, 0.2)
  assert len(val) == 10 and sorted(train + val) == list(range(50))
  perm = rng.permutation(50)
  train_p, val_p = corpus.split_train_validation([docs[i] for i in perm], 0.2)
  assert {docs[perm[i]] for i in val_p} == {docs[i] for i in val}
  assert corpus.split_train_validation(docs, 0.0) == (list(range(50)), [])
  with pytest.raises(ValueError, match="validation_fraction"):
    corpus.split_train_validation(docs, 1.0)


def test_token_cache_is_reused(text_corpus, monkeypatch):
  cfg, docs = text_corpus
  first = tokens.tokenized_documents(docs, TOK, cfg.cache_dir)
  monkeypatch.setattr(tokens, "frame_documents",
                      lambda *a: pytest.fail("tokenised again despite the cache"))
  again = tokens.tokenized_documents(docs, TOK, cfg.cache_dir)
  np.testing.assert_array_equal(first.tokens_n, again.tokens_n)
  np.testing.assert_array_equal(first.starts, again.starts)
  for d, text in enumerate(docs):
    np.testing.assert_array_equal(again.document(d), framed(text))


def test_bad_configs_raise_clear_errors(text_corpus):
  cfg, _ = text_corpus
  bad = cfg.copy_and_resolve_references()
  bad.source = "hdfs"
  with pytest.raises(ValueError, match="data.source='hdfs'"):
    data.build_train_iterator(bad, TOK, seq_len=8, global_batch_size=2)
  bad = cfg.copy_and_resolve_references()
  bad.paths = ""
  with pytest.raises(ValueError, match="needs data.paths"):
    data.build_train_iterator(bad, TOK, seq_len=8, global_batch_size=2)
  bad.paths = "/nonexistent/*.txt"
  with pytest.raises(FileNotFoundError, match="matches no file"):
    data.build_train_iterator(bad, TOK, seq_len=8, global_batch_size=2)


def test_default_corpus_with_gpt2(cache_dir):
  cfg = data.default_data_config()
  cfg.cache_dir = cache_dir
  tok = data.get_tokenizer(cfg)
  it = data.build_train_iterator(cfg, tok, seq_len=32, global_batch_size=4, seed=0)
  batches = _take(it, 3)
  for row in _rows(batches):
    _check_row(row, 32)
    assert row["weights"].all()  # an infinite stream never pads
  val = data.validation_batches(cfg, tok, seq_len=32, batch_size=4, num_batches=2)
  assert len(val) == 2
  # Every held-out batch decodes to text of a held-out chapter.
  docs = corpus.default_documents()
  _, val_idx = corpus.split_train_validation(docs, cfg.validation_fraction)
  first = tok.decode(val[0]["inputs"][0][1:][val[0]["segment_ids"][0][1:] == 1])
  assert first[:40] in docs[val_idx[0]]


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_restore_exactly(text_corpus):
  cfg, _ = text_corpus
  cfg.num_workers = 2
  make = lambda: data.build_train_iterator(cfg, TOK, seq_len=8, global_batch_size=2, seed=2)
  it = make()
  first = _take(it, 6)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  _assert_same_batches(_take(make(), 6), first)
  fresh = make()
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 4), expected)
  for row in _rows(first + expected):
    _check_row(row, 8)
