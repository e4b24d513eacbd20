"""Data: corpora, tokenizers and the Grain pipeline (packing with segment ids, checkpointable).

Example:
  >>> from softmax_one_jax import data
  >>> cfg = data.default_data_config()
  >>> tok = data.get_tokenizer(cfg)
  >>> it = data.build_train_iterator(cfg, tokenizer=tok, seq_len=256, global_batch_size=8)
  >>> sorted(next(it))
  ['inputs', 'positions', 'segment_ids', 'targets', 'weights']
"""

from softmax_one_jax.data.bigram_backcopy import BigramBackcopyTask
from softmax_one_jax.data.bigram_backcopy import bayes_optimal_loss
from softmax_one_jax.data.config import default_data_config
from softmax_one_jax.data.pipeline import build_train_iterator
from softmax_one_jax.data.pipeline import get_tokenizer
from softmax_one_jax.data.pipeline import train_dataset
from softmax_one_jax.data.pipeline import validation_batches
from softmax_one_jax.data.prepare import prepare
from softmax_one_jax.data.prepare import prepare_main
from softmax_one_jax.data.synthetic import task_for_config
from softmax_one_jax.data.tokenizers import Tokenizer
from softmax_one_jax.data.tokens import BATCH_KEYS

__all__ = [
    "BATCH_KEYS",
    "BigramBackcopyTask",
    "Tokenizer",
    "bayes_optimal_loss",
    "build_train_iterator",
    "default_data_config",
    "get_tokenizer",
    "prepare",
    "prepare_main",
    "task_for_config",
    "train_dataset",
    "validation_batches",
]
