"""tiny: the CPU default. Real text (the embedded corpus), a few minutes on two cores.

Usage (the paper's 2x2 grid in miniature)::

  softmax-one train --config=experiments/configs/tiny.py --workdir=runs/tiny
  softmax-one train --config=experiments/configs/tiny.py:softmax,adamw --workdir=runs/tiny-softmax-adamw

The argument is ``softmax,optimizer[,norm]``: softmax | softmax1 | learned_sink, adamw | orthoadam,
and a norm: layernorm (the default for every optimizer: tiny is GPT-2 flavoured) | rmsnorm |
scalar_rmsnorm | scalar_layernorm. The norm is its own axis, so ``softmax1,orthoadam`` against
``softmax1,adamw`` changes only the optimizer. The paper pairs OrthoAdam with a scalar-gain norm;
that pairing is the explicit argument ``softmax1,orthoadam,scalar_layernorm`` (LayerNorm with one
scalar gain instead of the per-channel one, centring and bias kept). A norm other than layernorm
is appended to the run name (``tiny-softmax1-orthoadam-scalar_layernorm``).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import get_base_config, model_config, parse_variant, variant_name


def get_config(arg: str = "softmax1,orthoadam") -> ml_collections.ConfigDict:
  softmax, optimizer, norm = parse_variant(arg, default_norm="layernorm")
  c = get_base_config()
  c.name = variant_name("tiny", softmax, optimizer, norm, "layernorm")
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
