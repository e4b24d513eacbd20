"""The data section of an experiment config (``config.data`` in experiments/configs)."""

from __future__ import annotations

import ml_collections

from softmax_one_jax.data import corpus
from softmax_one_jax.errors import ConfigError

SOURCES = ("default", "text", "arrayrecord", "c4", "bigram_backcopy")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for ``softmax_one_jax.data``; experiment configs override fields.

  Fields:
    source: "default" (embedded Austen corpus, one document per chapter) | "text" (local files,
      ``paths``) | "arrayrecord" (a folder written by ``softmax-one prepare``, ``paths``) |
      "c4" (same as "arrayrecord": C4 is read through ``softmax-one prepare --source c4``) |
      "bigram_backcopy" (the synthetic Bigram-Backcopy task, generated on the fly, see
      ``bigram_backcopy.py``; it brings its own character tokenizer and ignores ``tokenizer``).
    paths: comma-separated files or globs for "text"; the prepared folder for "arrayrecord"/"c4".
    document_separator: "text" only: how a ``.txt``/``.txt.gz`` file is cut into documents:
      "blank_line" (a run of blank or whitespace-only lines ends a document, so one book gives
      one document per paragraph) | "file" (one document per file) | any other non-empty string,
      a literal separator such as "<|endoftext|>". ``.jsonl`` files are one document per line
      whatever it says.
    tokenizer: "gpt2" | "bpe" (trained on the corpus and cached) | "sentencepiece".
    tokenizer_path: optional ranks/model file: GPT-2 ranks (default: shipped), a BPE ``.tiktoken``
      to load instead of training, or the SentencePiece ``.model`` (required for it).
    bpe_vocab_size: ids of the trained BPE, ``<|endoftext|>`` included.
    bpe_max_train_chars: train the BPE on about this many leading characters; 0 = all training text.
    validation_fraction: fraction of documents held out (chosen by content hash, never trained on);
      a prepared folder has its held-out shards fixed by ``prepare`` and ignores this.
    shuffle_seed: folded with the ``seed`` argument of ``build_train_iterator`` into the shuffle.
    num_workers: grain worker processes (0 = in the training process; the in-memory corpora are
      cheap enough that 0 is right for them).
    prefetch_buffer_size: batches a background thread prepares ahead (0 = none).
    cache_dir: tokenizer and token-id cache; "" = $SOFTMAX_ONE_JAX_CACHE or
      ~/.cache/softmax_one_jax.
    bb_corpus: "bigram_backcopy" only: comma-separated text files or globs whose characters and
      bigrams define the task; "" = the embedded corpus.
    bb_triggers: "bigram_backcopy" only: k, the number of trigger characters (the k most frequent).
    bb_validation_sequences: "bigram_backcopy" only: held-out sequences when
      ``validation_batches`` is asked for all of them.
    bb_bos: "bigram_backcopy" only: every sequence starts with the BOS token (True, the task's
      definition) or with a character drawn from the first-token marginal (False).

  Example:
    >>> cfg = default_data_config()
    >>> cfg.source, cfg.tokenizer
    ('default', 'gpt2')
  """
  cfg = ml_collections.ConfigDict()
  cfg.source = "default"
  cfg.paths = ""
  cfg.document_separator = "blank_line"
  cfg.tokenizer = "gpt2"
  cfg.tokenizer_path = ""
  cfg.bpe_vocab_size = 4096
  cfg.bpe_max_train_chars = 0
  cfg.validation_fraction = 0.05
  cfg.shuffle_seed = 0
  cfg.num_workers = 0
  cfg.prefetch_buffer_size = 0
  cfg.cache_dir = ""
  cfg.bb_corpus = ""
  cfg.bb_triggers = 3
  cfg.bb_validation_sequences = 1024
  cfg.bb_bos = True
  return cfg


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the field when a data config value is not usable.

  An empty ``document_separator`` raises ``ConfigError`` (a ``ValueError``).
  """
  if cfg.source not in SOURCES:
    raise ConfigError(f"data.source={cfg.source!r} is not one of {SOURCES}.")
  if cfg.source in ("text", "arrayrecord", "c4") and not cfg.paths:
    hint = ("files or globs" if cfg.source == "text"
            else "the folder written by `softmax-one prepare`")
    raise ConfigError(f"data.source={cfg.source!r} needs data.paths ({hint}).")
  # Configs saved before the field existed read as the default.
  corpus.check_separator(cfg.get("document_separator", "blank_line"))
  if not 0.0 <= cfg.validation_fraction < 1.0:
    raise ConfigError(f"data.validation_fraction={cfg.validation_fraction} must be in [0, 1).")
  if cfg.num_workers < 0 or cfg.prefetch_buffer_size < 0:
    raise ConfigError("data.num_workers and data.prefetch_buffer_size must be >= 0.")
  if cfg.source == "bigram_backcopy":
    if cfg.get("bb_triggers", 3) < 0:
      raise ConfigError(f"data.bb_triggers={cfg.bb_triggers} must be >= 0.")
    if cfg.get("bb_validation_sequences", 1024) < 1:
      raise ConfigError(f"data.bb_validation_sequences={cfg.bb_validation_sequences} must be >= 1.")
