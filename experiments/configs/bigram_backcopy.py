"""bigram_backcopy: the extreme-token laboratory (Guo et al. 2024's Bigram-Backcopy task on CPU).

Sequences of characters of the embedded corpus after a fixed BOS token: after one of the three
most frequent characters (a trigger) the next token copies the one before it, otherwise it
follows the corpus's bigram statistics. A 1-layer, 1-head transformer trained on it grows an
attention sink on BOS within a few hundred steps; the lab (``experiments/run_lab.py``) measures
what softmax-1, a learned sink logit, OrthoAdam and SGD do to it.

Usage::

  softmax-one train --config=experiments/configs/bigram_backcopy.py:softmax,adamw --workdir=runs/bb
  softmax-one train --config=experiments/configs/bigram_backcopy.py:softmax1,sgd,layernorm,3 ...

The argument is ``SOFTMAX,OPTIMIZER[,NORM][,LAYERS][,nobos]``: softmax | softmax1 | learned_sink,
adamw | orthoadam | sgd, a norm (layernorm, the default for every optimizer, | rmsnorm |
scalar_rmsnorm | scalar_layernorm), 1 or 3 layers (default 1), and ``nobos`` to start sequences
with a character instead of BOS. Every other factor is the same for all variants.

Settings adapted from Guo et al. (1 head, learned positions, pre-norm, GELU MLP, AdamW at a
constant learning rate after a short warm-up) and shrunk to two CPU cores: width 128 instead of
256, batch 32 instead of 512, 128 tokens instead of 256. What Guo et al. and the paper leave
open is guessed and marked ``# guess``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import get_base_config, model_config
from softmax_one_jax.models.config import NORMS, SOFTMAXES
from softmax_one_jax.training.state import OPTIMIZER_NAMES as OPTIMIZERS  # SGD too: the control
LAYERS = (1, 3)

# Peak learning rate per optimizer: the lowest validation loss after 600 steps of softmax runs
# (seed 0) over AdamW {1e-3, 3e-3, 1e-2} and SGD {0.01, 0.03, 0.1, 0.3, 1}; the sweep is in
# experiments/results/bigram_backcopy/README.md. OrthoAdam takes AdamW's (the same
# per-coordinate normalisation, in a rotated basis), so the two differ in one factor.
LEARNING_RATES = {"adamw": 3e-3, "orthoadam": 3e-3, "sgd": 0.03}
STEPS = {1: 1000, 3: 1000}  # 1 layer: about 50 s on 2 cores, 3 layers: about 130 s


def parse_lab_variant(arg: str) -> tuple[str, str, str, int, bool]:
  """Parses ``SOFTMAX,OPTIMIZER[,NORM][,LAYERS][,nobos]`` into (softmax, optimizer, norm, layers, bos).

  Example:
    >>> parse_lab_variant("softmax1,sgd,3")
    ('softmax1', 'sgd', 'layernorm', 3, True)
  """
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  usage = (f"config argument {arg!r} must be 'SOFTMAX,OPTIMIZER[,NORM][,LAYERS][,nobos]' with "
           f"SOFTMAX in {SOFTMAXES}, OPTIMIZER in {OPTIMIZERS}, NORM in {NORMS}, LAYERS in "
           f"{LAYERS}.")
  if not 2 <= len(parts) <= 5:
    raise ValueError(usage)
  softmax, optimizer, norm, layers, bos = parts[0], parts[1], "layernorm", 1, True
  for extra in parts[2:]:
    if extra.isdigit():
      layers = int(extra)
    elif extra == "nobos":
      bos = False
    else:
      norm = extra
  if softmax not in SOFTMAXES or optimizer not in OPTIMIZERS or norm not in NORMS or (
      layers not in LAYERS):
    raise ValueError(usage)
  return softmax, optimizer, norm, layers, bos


def get_config(arg: str = "softmax,adamw") -> ml_collections.ConfigDict:
  softmax, optimizer, norm, layers, bos = parse_lab_variant(arg)
  c = get_base_config()
  c.name = f"bb-{softmax}-{optimizer}-{norm}-L{layers}" + ("" if bos else "-nobos")
  c.seq_len = 128
  c.global_batch_size = 32
  c.num_train_steps = STEPS[layers]
  c.model = model_config("tiny", softmax=softmax, norm=norm, num_layers=layers, d_model=128,
                         num_heads=1, mlp_dim=512, mlp="gelu", position="learned",
                         max_seq_len=128)
  c.data.source = "bigram_backcopy"
  c.data.bb_triggers = 3
  c.data.bb_bos = bos                 # False: the first token is a marginal draw, not BOS
  c.data.bb_validation_sequences = 256

  c.optimizer.name = optimizer
  c.optimizer.learning_rate = LEARNING_RATES[optimizer]
  c.optimizer.warmup_steps = 20
  c.optimizer.end_lr_fraction = 1.0   # constant after warm-up, as in Guo et al.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99               # guess (the probe)
  c.optimizer.weight_decay = 0.01     # guess (PyTorch's AdamW default)
  c.optimizer.momentum = 0.9          # sgd: guess (the usual heavy-ball value)
  c.optimizer.grad_clip_norm = 1.0

  c.checkpoint.every_steps = 400
  c.checkpoint.max_to_keep = 1
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.eval_batches = 4
  c.eval_batch_size = 32
  c.outlier_every_steps = 100         # the dynamics: extreme-token metrics every 100 steps
  c.outlier_batch_size = 32
  return c
