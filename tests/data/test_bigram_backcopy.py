"""The Bigram-Backcopy source: definition, rules, frequencies, Bayes loss, determinism, state.

References are rebuilt here from the task's definition with plain Python (``collections.Counter``
over the text, sorted lists), never from the module's arrays.
"""

from __future__ import annotations

import collections
import json
import math

import grain
import numpy as np
import pytest
from scipy import stats

from softmax_one_jax import data
from softmax_one_jax.data import bigram_backcopy as bb
from softmax_one_jax.data import corpus
from softmax_one_jax.data import synthetic
from softmax_one_jax.data import tokenizers

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


class Reference:
  """The task from its definition: alphabet, P, mu and triggers as plain Python, then dense."""

  def __init__(self, docs, k):
    unigram = collections.Counter("".join(docs))
    bigram = collections.Counter(pair for d in docs for pair in zip(d, d[1:]))
    self.chars = sorted(unigram)
    c = len(self.chars)
    ranked = sorted(self.chars, key=lambda ch: (-unigram[ch], ord(ch)))
    self.triggers = {self.chars.index(ch) for ch in ranked[:k]}
    self.p = np.zeros((c, c))
    for i, a in enumerate(self.chars):
      row = [bigram[a, b] for b in self.chars]
      if sum(row) == 0:  # never followed: the unigram marginal
        row = [unigram[b] for b in self.chars]
      self.p[i] = np.array(row) / sum(row)
    mu = np.array([0 if i in self.triggers else unigram[ch] for i, ch in enumerate(self.chars)])
    self.mu = mu / mu.sum()
    self.is_trigger = np.array([i in self.triggers for i in range(c)] + [False])
    self.bos = c

  def next_distribution(self, prefix):
    """Pr(next token | prefix) as a dense vector over characters; prefix starts with BOS."""
    if len(prefix) == 1:
      return self.mu
    if self.is_trigger[prefix[-1]]:
      return np.eye(len(self.chars))[prefix[-2]]
    return self.p[prefix[-1]]

  def nll_nt(self, x_nt):
    """-log Pr(x_t | x_<t) of every target, float64 [n, T] (inf where a rule is broken)."""
    prev, target = x_nt[:, :-1], x_nt[:, 1:]
    with np.errstate(divide="ignore"):
      log_p, log_mu = np.log(self.p), np.log(self.mu)
    nll = -log_p[np.minimum(prev, self.bos - 1), target]
    nll[:, 0] = -log_mu[target[:, 0]]
    copy = self.is_trigger[prev]
    copy[:, 0] = False
    nll[copy] = np.where(target[copy] == x_nt[:, :-2][copy[:, 1:]], 0.0, np.inf)
    return nll


def _random_corpus(rng, alphabet="abcde ", num_docs=6, length=400):
  """Documents from a random sparse Markov chain over ``alphabet``, plus a character ("z") that
  only ends documents, so its row of P falls back to the unigram marginal."""
  c = len(alphabet)
  trans = rng.dirichlet(np.full(c, 0.4), size=c)
  docs = []
  for _ in range(num_docs):
    ids = [rng.integers(c)]
    for _ in range(length - 1):
      ids.append(rng.choice(c, p=trans[ids[-1]]))
    docs.append("".join(alphabet[i] for i in ids) + "z")
  return docs


@pytest.fixture(scope="module")
def default_cfg():
  cfg = data.default_data_config()
  cfg.source = "bigram_backcopy"
  return cfg


@pytest.fixture(scope="module")
def default_reference():
  return Reference(corpus.default_documents(), k=3)


def test_task_matches_its_definition():
  rng = np.random.default_rng(0)
  for k in (0, 1, 3):
    docs = _random_corpus(rng)
    ref, task = Reference(docs, k), bb.task_from_documents(docs, k)
    assert list(task.chars) == ref.chars and set(task.trigger_ids) == ref.triggers
    np.testing.assert_allclose(task.transition_matrix_cc, ref.p, rtol=1e-14)
    np.testing.assert_allclose(task.first_counts_c / task.first_counts_c.sum(), ref.mu, rtol=1e-14)
  # Ties by frequency go to the lower code point: "a" and "b" both occur 3 times.
  assert bb.task_from_documents(["abab ba"], 1).trigger_ids == (1,)
  assert bb.task_from_documents(["baba ab"], 2).trigger_ids == (1, 2)
  with pytest.raises(ValueError, match=r"bb_triggers=3 must be in \[0, 3\)"):
    bb.task_from_documents(["abab ba"], 3)


def test_sequences_obey_the_rules_on_fresh_seeds(default_cfg, default_reference):
  seed = int(np.random.SeedSequence().entropy % 2**63)
  rng = np.random.default_rng(seed)
  docs = _random_corpus(rng)
  for ref, task in ((Reference(docs, 2), bb.task_from_documents(docs, 2)),
                    (default_reference, synthetic.task_for_config(default_cfg))):
    indices = rng.integers(0, 2**63, size=300)
    x_nt = bb.sample_sequences(task, int(rng.integers(2**63)), indices, seq_len=48)
    assert x_nt.shape == (300, 49) and x_nt.dtype == np.int32, seed
    assert (x_nt[:, 0] == ref.bos).all() and (x_nt[:, 1:] < ref.bos).all(), seed
    assert not ref.is_trigger[x_nt[:, 1]].any(), f"a first token is a trigger (seed {seed})"
    copy_nt = ref.is_trigger[x_nt[:, 1:-1]]
    np.testing.assert_array_equal(x_nt[:, 2:][copy_nt], x_nt[:, :-2][copy_nt], err_msg=str(seed))
    assert np.isfinite(ref.nll_nt(x_nt)).all(), f"a step outside the support of P (seed {seed})"


def _pooled_chi_square(counts_rc, p_rc):
  """Chi-square of observed transition counts against P, per row, cells with an expectation
  under 5 pooled into one bin. Returns (statistic, degrees of freedom)."""
  stat, dof = 0.0, 0
  for obs, p in zip(counts_rc, p_rc):
    n = obs.sum()
    if n == 0:
      continue
    exp = n * p
    big = exp >= 5
    o = np.append(obs[big], obs[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    stat += float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    dof += int(keep.sum()) - 1
  return stat, dof


@pytest.mark.parametrize("corpus_name", ["random", "default"])
def test_bigram_frequencies_match_p(corpus_name, default_cfg, default_reference):
  # Transitions out of a state of a Markov chain are i.i.d. draws from its row of P given the
  # number of visits, so the pooled per-row chi-square is chi2(dof). About 1e5 bigram steps make a
  # 1% error in a common cell several standard deviations; the threshold's false alarm is 1e-6.
  if corpus_name == "random":
    docs = _random_corpus(np.random.default_rng(1))
    ref, task = Reference(docs, 2), bb.task_from_documents(docs, 2)
  else:
    ref, task = default_reference, synthetic.task_for_config(default_cfg)
  x_nt = bb.sample_sequences(task, seed=3, indices=range(2000), seq_len=80)
  prev, nxt = x_nt[:, 1:-1].ravel(), x_nt[:, 2:].ravel()
  bigram_step = ~ref.is_trigger[prev]
  c = len(ref.chars)
  counts = np.bincount(prev[bigram_step] * c + nxt[bigram_step], minlength=c * c).reshape(c, c)
  stat, dof = _pooled_chi_square(counts, ref.p)
  assert stat < stats.chi2.ppf(1 - 1e-6, dof), (stat, dof)
  first = np.bincount(x_nt[:, 1], minlength=c)[None]
  stat, dof = _pooled_chi_square(first, ref.mu[None])
  assert stat < stats.chi2.ppf(1 - 1e-6, dof), (stat, dof)


def _entropy(p):
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _brute_force_entropies(ref, seq_len):
  """E H(x_t | x_<t) for t = 1..T by enumerating every prefix with its probability."""
  out = np.zeros(seq_len)
  frontier = [((ref.bos,), 1.0)]
  for t in range(seq_len):
    nxt = []
    for prefix, prob in frontier:
      dist = ref.next_distribution(prefix)
      out[t] += prob * _entropy(dist)
      nxt += [(prefix + (j,), prob * q) for j, q in enumerate(dist) if q > 0]
    frontier = nxt
  return out


def test_bayes_optimal_loss_by_hand_and_by_enumeration():
  task = bb.task_from_documents(["abab ba"], 1)  # trigger "a"; mu: b 3/4, " " 1/4
  h = lambda *p: -sum(q * math.log(q) for q in p)
  # x1 ~ mu; x2 ~ P[x1] (P[b] = (" " 1/3, a 2/3), P[" "] = b); x3 has entropy only after
  # x2 = b, which has probability 1/4 (from " "), since from b half the mass goes to the trigger.
  assert bb.bayes_optimal_loss(task, 1) == pytest.approx(h(3 / 4, 1 / 4), rel=1e-12)
  assert bb.bayes_optimal_loss(task, 3) == pytest.approx(
      (h(3 / 4, 1 / 4) + h(2 / 3, 1 / 3)) / 3, rel=1e-12)
  toy = _random_corpus(np.random.default_rng(2))[:1]
  for docs, k, max_len in ((["abab ba"], 1, 9), (toy, 2, 5)):
    ref, task = Reference(docs, k), bb.task_from_documents(docs, k)
    expected = _brute_force_entropies(ref, max_len)
    entropy_t, _ = bb.position_entropies(task, max_len)
    np.testing.assert_allclose(entropy_t, expected, rtol=1e-10, atol=1e-14)
    for t in range(1, max_len + 1):
      assert bb.bayes_optimal_loss(task, t) == pytest.approx(expected[:t].mean(), rel=1e-10)


def test_bayes_optimal_loss_matches_monte_carlo_on_the_default_corpus(default_cfg,
                                                                      default_reference):
  # The exact check is the enumeration above; this one ties the sampler, the reference rules and
  # the formula together at the real corpus's scale. 24k sequences give a standard error of about
  # 0.25% of the loss, so the 4.5-sigma band catches an error of about 1%.
  task, seq_len = synthetic.task_for_config(default_cfg), 64
  nll_n = default_reference.nll_nt(bb.sample_sequences(task, 11, range(24000), seq_len)).mean(1)
  se = nll_n.std() / math.sqrt(len(nll_n))
  assert abs(nll_n.mean() - bb.bayes_optimal_loss(task, seq_len)) < 4.5 * se, (nll_n.mean(), se)
  # The trigger-query probabilities agree with the sampled trigger frequency per position too.
  x_nt = bb.sample_sequences(task, 12, range(3000), seq_len)
  _, trigger_query_t = bb.position_entropies(task, seq_len)
  freq_t = default_reference.is_trigger[x_nt[:, :-1]].mean(0)
  assert np.abs(freq_t - trigger_query_t).max() < 4.5 * math.sqrt(0.25 / 3000)


def test_determinism_and_disjoint_streams(default_cfg):
  task = synthetic.task_for_config(default_cfg)
  a = bb.sample_sequences(task, 5, [0, 1, 2, 7], seq_len=32)
  np.testing.assert_array_equal(a, bb.sample_sequences(task, 5, [0, 1, 2, 7], seq_len=32))
  np.testing.assert_array_equal(a[3:], bb.sample_sequences(task, 5, [7], seq_len=32))
  assert (a != bb.sample_sequences(task, 6, [0, 1, 2, 7], seq_len=32)).any(axis=1).all()
  # Streams are disjoint in their random numbers (sequences themselves can coincide: the task has
  # near-absorbing cycles such as ", , , ,"). A shared float64 between independent streams of
  # this size has probability about 1e-7.
  train = {u for seed in range(4) for i in range(300) for u in bb._uniforms(seed, 0, i, 32)}
  val = {u for i in range(300) for u in bb._uniforms(0, bb.VALIDATION_STREAM, i, 32)}
  assert bb.TRAIN_STREAM == 0 and len(train) == 4 * 300 * 32 and not train & val
  x_train = bb.sample_sequences(task, 0, range(300), 128, stream=bb.TRAIN_STREAM)
  x_val = bb.sample_sequences(task, 0, range(300), 128, stream=bb.VALIDATION_STREAM)
  assert (x_train != x_val).any(axis=1).mean() > 0.95
  # The held-out batches come from the validation stream whatever the training seeds are.
  tok = data.get_tokenizer(default_cfg)
  held_out = data.validation_batches(default_cfg, tok, seq_len=32, batch_size=8, num_batches=2)
  np.testing.assert_array_equal(
      np.concatenate([b["inputs"] for b in held_out]),
      bb.sample_sequences(task, 0, range(16), 32, bb.VALIDATION_STREAM)[:, :-1])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_seeds_shards_and_state(default_cfg, tmp_path):
  cfg = default_cfg.copy_and_resolve_references()
  tok = data.get_tokenizer(cfg)
  make = lambda seed=1, **kw: data.build_train_iterator(cfg, tok, seq_len=16, global_batch_size=4,
                                                        seed=seed, **kw)
  reference = _take(make(), 5)
  _assert_same(reference, _take(make(), 5))
  assert all((x["inputs"] != y["inputs"]).any() for x, y in zip(reference, _take(make(2), 5)))
  # The global batch does not depend on how many shards read it.
  for count in (2, 4):
    parts = [_take(make(process_index=p, process_count=count), 5) for p in range(count)]
    joined = [{k: np.concatenate([p[s][k] for p in parts]) for k in KEYS} for s in range(5)]
    _assert_same(reference, joined)
  for prefetch in (0, 2):
    cfg.prefetch_buffer_size = prefetch
    for k in (0, 3, 11):
      it = make()
      _take(it, k)
      state = json.loads(json.dumps(it.get_state()))
      expected = _take(it, 4)
      fresh = make()
      fresh.set_state(state)
      _assert_same(_take(fresh, 4), expected)
  it = make()
  _take(it, 7)
  (tmp_path / "ckpt").mkdir()
  grain.checkpoint.CheckpointHandler().save(tmp_path / "ckpt", item=it)
  expected = _take(it, 3)
  fresh = make()
  grain.checkpoint.CheckpointHandler().restore(tmp_path / "ckpt", item=fresh)
  _assert_same(_take(fresh, 3), expected)


def test_through_get_tokenizer_and_the_pipeline(default_cfg, default_reference):
  cfg = default_cfg.copy_and_resolve_references()
  tok = data.get_tokenizer(cfg)
  assert tok.vocab_size == len(default_reference.chars) + 1 and tok.bos_id == default_reference.bos
  assert [tok.chars[i] for i in tok.trigger_ids] == [" ", "e", "t"]
  assert tok.decode(tok.encode("Emma, said")) == "Emma, said"
  batch = next(data.build_train_iterator(cfg, tok, seq_len=24, global_batch_size=6, seed=0))
  assert sorted(batch) == sorted(KEYS)
  for k in KEYS:
    assert batch[k].shape == (6, 24)
    assert batch[k].dtype == (np.float32 if k == "weights" else np.int32)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert (batch["inputs"][:, 0] == tok.bos_id).all() and (batch["weights"] == 1).all()
  assert (batch["segment_ids"] == 1).all() and (batch["positions"] == np.arange(24)).all()
  cfg.bb_validation_sequences = 10
  held_out = data.validation_batches(cfg, tok, seq_len=24, batch_size=4)
  assert [b["inputs"].shape for b in held_out] == [(4, 24)] * 3
  assert held_out[-1]["weights"].sum(1).tolist() == [24, 24, 0, 0]
  with pytest.raises(ValueError, match="pass get_tokenizer"):
    data.build_train_iterator(cfg, tokenizers.gpt2_tokenizer(), seq_len=8, global_batch_size=2)
  with pytest.raises(ValueError, match="without epochs"):
    data.train_dataset(cfg, tok, seq_len=8, batch_size=2, num_epochs=1)
  cfg.bb_triggers = -1
  with pytest.raises(ValueError, match="data.bb_triggers=-1"):
    data.get_tokenizer(cfg)


def test_without_bos_the_sequence_is_the_bos_sequence_one_longer_minus_its_bos(default_cfg,
                                                                               default_reference):
  task, seq_len = synthetic.task_for_config(default_cfg), 32
  with_bos = bb.sample_sequences(task, 5, range(40), seq_len + 1)
  no_bos = bb.sample_sequences(task, 5, range(40), seq_len, bos=False)
  assert no_bos.shape == (40, seq_len + 1)
  np.testing.assert_array_equal(no_bos, with_bos[:, 1:])
  assert not (no_bos == task.bos_id).any()
  assert len(np.unique(no_bos[:, 0])) > 5          # no token is the same in every row
  # The Bayes loss without BOS, by Monte Carlo with the reference's rules: the first target now
  # follows the bigram rule from a marginal draw.
  x_nt = bb.sample_sequences(task, 13, range(20000), seq_len, bos=False)
  x_with_bos = np.concatenate([np.full((len(x_nt), 1), task.bos_id, x_nt.dtype), x_nt], axis=1)
  nll_n = default_reference.nll_nt(x_with_bos)[:, 1:].mean(1)
  se = nll_n.std() / math.sqrt(len(nll_n))
  expected = bb.bayes_optimal_loss(task, seq_len, bos=False)
  assert abs(nll_n.mean() - expected) < 4.5 * se, (nll_n.mean(), expected, se)
  assert expected != pytest.approx(bb.bayes_optimal_loss(task, seq_len), rel=1e-3)
