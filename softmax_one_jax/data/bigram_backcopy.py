"""The Bigram-Backcopy task (Guo et al. 2024, "Active-Dormant Attention Heads", arXiv 2410.13835).

A synthetic language in which small transformers grow attention sinks within a few hundred steps.
From a corpus of text:

* the vocabulary is the corpus's distinct characters (ids ``0 .. C-1`` in code-point order) plus
  a BOS token (id ``C``);
* ``P`` is the character bigram transition matrix, counted inside documents, rows normalised; a
  character that is never followed by another gets the unigram marginal as its row;
* the triggers are the ``k`` most frequent characters (ties: the lower code point first).

A sequence ``x_0 .. x_T`` is ``x_0 = BOS``; ``x_1`` drawn from the unigram marginal restricted to
non-triggers (``mu``); then for ``t >= 2``: ``x_t = x_{t-2}`` if ``x_{t-1}`` is a trigger
(back-copy), else ``x_t ~ P[x_{t-1}]``. Two triggers never follow each other (a copy repeats the
non-trigger before the trigger), so a copy never reaches back to BOS.

Sampling is counter-based: sequence ``i`` of stream ``s`` under seed ``seed`` uses the uniforms of
``Philox(key=[seed, s], counter=[0, 0, 0, i])``, so it depends on nothing but ``(seed, s, i)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from softmax_one_jax.errors import ConfigError, DataError

BOS = "<|bos|>"
TRAIN_STREAM = 0
VALIDATION_STREAM = 1


@dataclasses.dataclass(frozen=True, eq=False)
class BigramBackcopyTask:
  """The task's definition, as integer counts (probabilities are their row-normalised values).

  Attributes:
    chars: the C distinct characters in code-point order; ``chars[i]`` has id ``i``.
    unigram_counts_c: int64 [C], occurrences of each character in the corpus.
    transition_counts_cc: int64 [C, C], ``[i, j]`` = times ``chars[j]`` follows ``chars[i]``
      inside a document; a row without successors holds ``unigram_counts_c`` instead.
    trigger_ids: the k trigger ids, most frequent first.
  """

  chars: str
  unigram_counts_c: np.ndarray
  transition_counts_cc: np.ndarray
  trigger_ids: tuple[int, ...]

  @property
  def num_chars(self) -> int:
    return len(self.chars)

  @property
  def bos_id(self) -> int:
    return len(self.chars)

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + 1

  @property
  def is_trigger_v(self) -> np.ndarray:
    """bool [C + 1]: whether each id (BOS last) is a trigger."""
    mask = np.zeros(self.vocab_size, bool)
    mask[list(self.trigger_ids)] = True
    return mask

  @property
  def first_counts_c(self) -> np.ndarray:
    """int64 [C]: the unigram counts with the triggers zeroed (``mu`` unnormalised)."""
    return np.where(self.is_trigger_v[:-1], 0, self.unigram_counts_c)

  @property
  def transition_matrix_cc(self) -> np.ndarray:
    """float64 [C, C]: ``P``, each row sums to 1."""
    counts = self.transition_counts_cc.astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def task_from_documents(docs: Sequence[str], num_triggers: int = 3) -> BigramBackcopyTask:
  """Counts characters and within-document bigrams of ``docs`` and picks the triggers.

  Example:
    >>> task = task_from_documents(["abab ba"], num_triggers=1)
    >>> task.chars, task.trigger_ids, task.bos_id
    (' ab', (1,), 3)
    >>> task.transition_matrix_cc[2]  # after "b": " " once, "a" twice
    array([0.33333333, 0.66666667, 0.        ])
  """
  codes = [np.frombuffer(d.encode("utf-32-le"), np.uint32) for d in docs if d]
  if not codes:
    raise DataError("The Bigram-Backcopy corpus is empty; give data.bb_corpus files with text.")
  alphabet = np.unique(np.concatenate(codes))
  c = len(alphabet)
  if not 0 <= num_triggers < c:
    raise ConfigError(f"data.bb_triggers={num_triggers} must be in [0, {c}): the corpus has {c} "
                      "distinct characters and at least one must stay a non-trigger.")
  unigram = np.zeros(c, np.int64)
  bigram = np.zeros(c * c, np.int64)
  for code in codes:
    ids = np.searchsorted(alphabet, code)
    unigram += np.bincount(ids, minlength=c)
    bigram += np.bincount(ids[:-1] * c + ids[1:], minlength=c * c)
  bigram = bigram.reshape(c, c)
  no_successor = bigram.sum(axis=1) == 0
  bigram[no_successor] = unigram
  order = np.lexsort((np.arange(c), -unigram))  # by count descending, then by id
  return BigramBackcopyTask(
      chars="".join(chr(a) for a in alphabet), unigram_counts_c=unigram,
      transition_counts_cc=bigram, trigger_ids=tuple(int(i) for i in order[:num_triggers]))


# ---------------------------------------------------------------------------------------------
# Sampling.


def _uniforms(seed: int, stream: int, index: int, n: int) -> np.ndarray:
  """float64 [n] in [0, 1), a function of ``(seed, stream, index)`` only (counter-based)."""
  bits = np.random.Philox(key=[seed, stream], counter=[0, 0, 0, index])
  return np.random.Generator(bits).random(n)


def _draw(cum_nc: np.ndarray, u_n: np.ndarray) -> np.ndarray:
  """Row-wise inverse-CDF draws: id ``j`` with probability ``count_j / total`` of each row.

  ``cum_nc`` are inclusive cumulative integer counts; an id with count 0 is never drawn.
  """
  total_n = cum_nc[:, -1]
  r_n = np.minimum((u_n * total_n).astype(np.int64), total_n - 1)
  return (cum_nc <= r_n[:, None]).sum(axis=1)


def sample_sequences(
    task: BigramBackcopyTask, seed: int, indices: Sequence[int] | np.ndarray, seq_len: int,
    stream: int = TRAIN_STREAM, bos: bool = True,
) -> np.ndarray:
  """Sequences ``indices`` of the stream ``(seed, stream)``: int32 [n, seq_len + 1], BOS first.

  Row ``r`` depends only on ``(seed, stream, indices[r])``, never on the other rows.
  With ``bos=False`` the BOS is dropped from a sequence one token longer: the first token is then
  a character drawn from the first-token marginal, and no position is the same token in every row.

  Args:
    task: from ``task_from_documents``.
    seed, stream: non-negative ints below 2**64 (``TRAIN_STREAM``, ``VALIDATION_STREAM``).
    indices: n example indices, non-negative, below 2**64.
    seq_len: T; each sequence has T + 1 tokens (T input/target pairs).
    bos: start every sequence with the BOS token (the task's definition), or not.

  Example:
    >>> task = task_from_documents(["abab ba"], num_triggers=1)
    >>> sample_sequences(task, seed=0, indices=[0, 1], seq_len=6).shape
    (2, 7)
  """
  if seed < 0 or stream < 0 or seq_len < 1:
    raise ValueError(f"seed={seed} and stream={stream} must be >= 0, seq_len={seq_len} >= 1.")
  if not bos:
    return sample_sequences(task, seed, indices, seq_len + 1, stream)[:, 1:]
  indices = [int(i) for i in indices]
  if any(i < 0 for i in indices):
    raise ValueError(f"example indices must be >= 0, got {min(indices)}.")
  u_nt = np.stack([_uniforms(seed, stream, i, seq_len) for i in indices]).reshape(-1, seq_len)
  n = u_nt.shape[0]
  is_trigger = task.is_trigger_v
  cum_cc = np.cumsum(task.transition_counts_cc, axis=1)
  x_nt = np.empty((n, seq_len + 1), np.int32)
  x_nt[:, 0] = task.bos_id
  x_nt[:, 1] = _draw(np.broadcast_to(np.cumsum(task.first_counts_c), (n, task.num_chars)),
                     u_nt[:, 0])
  for t in range(2, seq_len + 1):
    prev = x_nt[:, t - 1]
    x_nt[:, t] = np.where(is_trigger[prev], x_nt[:, t - 2], _draw(cum_cc[prev], u_nt[:, t - 1]))
  return x_nt


# ---------------------------------------------------------------------------------------------
# The Bayes-optimal loss.


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy in nats along the last axis, with 0 log 0 = 0."""
  logs = np.log(np.where(p > 0, p, 1.0))
  return -(p * logs).sum(axis=-1)


def position_entropies(task: BigramBackcopyTask, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Expected conditional entropy of each target, and the chance that its query is a trigger.

  Target ``t`` (1-based, ``x_t``) given ``x_0 .. x_{t-1}`` has entropy ``H(mu)`` for ``t = 1``,
  0 if ``x_{t-1}`` is a trigger, else ``H(P[x_{t-1}])``. Its expectation uses the exact marginals
  of the chain, kept in two vectors over characters:
  ``n_t(b) = Pr(x_t = b)`` for non-triggers ``b`` and ``m_t(a) = Pr(x_t is a trigger,
  x_{t-1} = a)`` (only ``a`` matters: the next token copies it). With ``n_1 = mu``, ``m_1 = 0``::

    n_{t+1}(c) = [c not a trigger] * sum_b n_t(b) P[b, c] + m_t(c)
    m_{t+1}(b) = n_t(b) * sum_{g trigger} P[b, g]
    E H(target t) = sum_b n_{t-1}(b) H(P[b])          (t >= 2)

  Returns:
    ``(entropy_t, trigger_query_t)``: float64 [seq_len] each; ``trigger_query_t[t-1] =
    Pr(x_{t-1} is a trigger) = sum_a m_{t-1}(a)``. The Bayes-optimal loss on non-trigger query
    positions is ``entropy_t.sum() / (1 - trigger_query_t).sum()``; on trigger ones it is 0.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  p_cc = task.transition_matrix_cc
  not_trigger_c = ~task.is_trigger_v[:-1]
  h_c = _entropy(p_cc)
  to_trigger_c = p_cc[:, ~not_trigger_c].sum(axis=1)
  mu_c = task.first_counts_c / task.first_counts_c.sum()
  entropy_t, trigger_query_t = np.zeros(seq_len), np.zeros(seq_len)
  entropy_t[0] = _entropy(mu_c)
  n_c, m_c = mu_c, np.zeros_like(mu_c)
  for t in range(1, seq_len):
    entropy_t[t] = n_c @ h_c
    trigger_query_t[t] = m_c.sum()
    n_c, m_c = np.where(not_trigger_c, n_c @ p_cc, 0.0) + m_c, n_c * to_trigger_c
  return entropy_t, trigger_query_t


def bayes_optimal_loss(task: BigramBackcopyTask, seq_len: int, bos: bool = True) -> float:
  """The Bayes-optimal mean cross-entropy (nats per target) over sequences of ``seq_len`` targets.

  ``L(T) = (1/T) * sum_{t=1..T} E H(x_t | x_0 .. x_{t-1})`` (see ``position_entropies``): the
  first target costs ``H(mu)``, a back-copy costs 0, a bigram step from ``b`` costs ``H(P[b])``.
  Without BOS (``sample_sequences(..., bos=False)``) the targets are ``x_2 .. x_{T+1}`` of a
  sequence one longer; the Markov chain makes everything before ``x_1`` irrelevant to them.

  Example:
    >>> task = task_from_documents(["abab ba"], num_triggers=1)   # trigger "a"
    >>> round(bayes_optimal_loss(task, 3), 6)  # (H(3/4, 1/4) + H(2/3, 1/3)) / 3
    0.399616
  """
  if bos:
    return float(position_entropies(task, seq_len)[0].mean())
  return float(position_entropies(task, seq_len + 1)[0][1:].mean())


# ---------------------------------------------------------------------------------------------
# Tokenizer.


@dataclasses.dataclass(frozen=True, eq=False)
class CharTokenizer:
  """One id per character of the task's alphabet, BOS last (it is also the EOS of the protocol).

  Attributes:
    chars: the alphabet; ``chars[i]`` has id ``i``.
    trigger_ids: the ids after which the next token copies the one before the trigger.

  Example:
    >>> tok = char_tokenizer(task_from_documents(["abab ba"], num_triggers=1))
    >>> tok.encode("ba b"), tok.vocab_size, tok.bos_id, tok.trigger_ids
    ([2, 1, 0, 2], 4, 3, (1,))
  """

  chars: str
  trigger_ids: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"bb_char{self.vocab_size}"

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + 1

  @property
  def bos_id(self) -> int:
    return len(self.chars)

  @property
  def eos_id(self) -> int:
    return len(self.chars)

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(f"{self.chars}|{self.trigger_ids}".encode()).hexdigest()

  def encode(self, text: str) -> list[int]:
    index = {ch: i for i, ch in enumerate(self.chars)}
    unknown = sorted(set(text) - set(index))
    if unknown:
      raise ValueError(f"Characters {''.join(unknown)!r} are not in the Bigram-Backcopy "
                       "alphabet; encode text of the task's corpus (data.bb_corpus).")
    return [index[ch] for ch in text]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    bad = [int(i) for i in ids if not 0 <= int(i) <= len(self.chars)]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
    return "".join(BOS if int(i) == len(self.chars) else self.chars[int(i)] for i in ids)


def char_tokenizer(task: BigramBackcopyTask) -> CharTokenizer:
  """The task's tokenizer: ``vocab_size = C + 1``, ``bos_id = C``, the task's ``trigger_ids``."""
  return CharTokenizer(chars=task.chars, trigger_ids=task.trigger_ids)
