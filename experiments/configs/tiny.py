"""tiny: the CPU default. Real text (the embedded corpus), a few minutes on two cores.

Usage (the paper's 2x2 grid in miniature)::

  softmax-one train --config=experiments/configs/tiny.py --workdir=runs/tiny
  softmax-one train --config=experiments/configs/tiny.py:softmax,adamw --workdir=runs/tiny-softmax-adamw

The argument is ``softmax,optimizer[,norm]``: softmax | softmax1 | learned_sink, adamw | orthoadam, and a norm
(layernorm | rmsnorm | scalar_rmsnorm; default scalar_rmsnorm with orthoadam, as the paper pairs
OrthoAdam with a scalar-gain norm, else layernorm).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import get_base_config, model_config, parse_variant


def get_config(arg: str = "softmax1,orthoadam") -> ml_collections.ConfigDict:
  softmax, optimizer, norm = parse_variant(arg)
  c = get_base_config()
  c.name = f"tiny-{softmax}-{optimizer}"
  c.seq_len = 128
  c.global_batch_size = 16
  c.num_train_steps = 300
  c.model = model_config("tiny", softmax=softmax, norm=norm, max_seq_len=128)
  c.data.source = "default"
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 4096
  c.optimizer.name = optimizer
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 30
  c.checkpoint.every_steps = 100
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_batches = 4
  c.eval_batch_size = 16
  c.outlier_every_steps = 100
  c.outlier_batch_size = 8
  return c
