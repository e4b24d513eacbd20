"""The paper grid shared by gpt2.py and llama2.py: C4-en, sequence 256, paper-like settings.

Kaul et al. (ICLR 2025) train GPT-2 and Llama-2 models of 60M-350M parameters (and larger Llama
models) on the English split of C4 with sequence length 256, comparing softmax / softmax-1 and
AdamW / OrthoAdam. Numbers the paper does not give are GUESSES, marked as such below:
  * tokens: about 20 tokens per parameter (Chinchilla) for <= 350M, capped for 1B / 7B (GUESS);
  * batch: 256 sequences x 256 tokens = 65,536 tokens per step, 512 for 1B / 7B (GUESS);
  * peak learning rate per size, 1% (>= 1000 steps) linear warmup, cosine to 10% (GUESS);
  * AdamW-style b1=0.9, b2=0.95, eps=1e-8, weight decay 0.1 on matrices, clipping at 1.0 (GUESS);
  * tokenizer: GPT-2 BPE for both families (shipped with the package; for Llama-2's own set
    --config.data.tokenizer=sentencepiece --config.data.tokenizer_path=tokenizer.model) (GUESS).
The norm is its own axis: by default each family keeps its own (GPT-2: LayerNorm, Llama-2:
RMSNorm) with either optimizer, so the optimizer column changes only the optimizer. The paper's
pairing of OrthoAdam with a scalar-gain norm is one explicit argument away:
``gpt2.py:60m,softmax1,orthoadam,scalar_layernorm`` (LayerNorm with one scalar gain: centring and
bias kept) and ``llama2.py:60m,softmax1,orthoadam,scalar_rmsnorm``, or ``gpt2.py:60m,paper`` and
``llama2.py:60m,paper`` for short. The grid at the paper's norm holds it fixed in every cell:
``60m,softmax,adamw,scalar_layernorm`` ... ``60m,softmax1,orthoadam,scalar_layernorm``.
Slices (``config.topology``, what ``softmax-one compile`` builds for; see experiments/README.md):
v5e:4x4 (16 x TPU v5e) up to 350M, v5p:2x2x2 (8 x TPU v5p) for 1B, v5p:4x4x4 (64 x TPU v5p) for 7B.
Data: run ``softmax-one prepare --source c4 --output_dir data/c4`` first, or point
--config.data.paths at a prepared folder.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import get_base_config, model_config, parse_variant, variant_name

# size -> (global batch, train steps, peak learning rate); GUESSES where the paper is silent.
GPT2_SIZES = {
    "60m": (256, 20_000, 6e-4),
    "130m": (256, 40_000, 6e-4),
    "350m": (256, 100_000, 3e-4),
}
LLAMA2_SIZES = {
    "60m": (256, 20_000, 1e-3),
    "130m": (256, 40_000, 6e-4),
    "350m": (256, 100_000, 4e-4),
    "1b": (512, 100_000, 3e-4),
    "7b": (512, 200_000, 1.5e-4),
}


# size -> the TPU slice the cell is sized for (fits with headroom: experiments/results/compile_grid).
SLICES = {"60m": "v5e:4x4", "130m": "v5e:4x4", "350m": "v5e:4x4", "1b": "v5p:2x2x2",
          "7b": "v5p:4x4x4"}

# family -> its own norm, the default for every optimizer.
FAMILY_NORMS = {"gpt2": "layernorm", "llama2": "rmsnorm"}
# family -> the single-scalar-gain norm the paper pairs with OrthoAdam: ``SIZE,paper`` is the
# paper's recipe (softmax-1, OrthoAdam with its default whole-axis "hadamard" rotation, this
# norm). The paper does not say which rotation it used beyond "random orthogonal" (GUESS: a
# randomized Hadamard product mixes every axis whole, as a dense Haar Q would).
PAPER_NORMS = {"gpt2": "scalar_layernorm", "llama2": "scalar_rmsnorm"}


def parse_grid_arg(arg: str, sizes: dict, family: str) -> tuple[str, str, str, str]:
  """``size,softmax,optimizer[,norm]`` -> its four parts, with errors naming the allowed values.

  The norm defaults to the family's own (``FAMILY_NORMS``) whatever the optimizer.

  Example:
    >>> parse_grid_arg("60m,softmax1,orthoadam", LLAMA2_SIZES, "llama2")
    ('60m', 'softmax1', 'orthoadam', 'rmsnorm')
  """
  size, _, rest = arg.partition(",")
  size = size.strip().lower()
  if size not in sizes:
    raise ValueError(f"{family} config: size={size!r} is not allowed; choose one of "
                     f"{', '.join(sizes)} (argument 'size,softmax,optimizer[,norm]', e.g. "
                     f"'{next(iter(sizes))},softmax1,orthoadam').")
  if rest.strip().lower() == "paper":
    return size, "softmax1", "orthoadam", PAPER_NORMS[family]
  softmax, optimizer, norm = parse_variant(rest, default_norm=FAMILY_NORMS[family])
  return size, softmax, optimizer, norm


def grid_config(family: str, arg: str) -> ml_collections.ConfigDict:
  """One cell of the paper grid for ``family`` in ("gpt2", "llama2")."""
  sizes = GPT2_SIZES if family == "gpt2" else LLAMA2_SIZES
  size, softmax, optimizer, norm = parse_grid_arg(arg, sizes, family)
  batch, steps, lr = sizes[size]
  c = get_base_config()
  c.name = variant_name(f"{family}-{size}", softmax, optimizer, norm, FAMILY_NORMS[family])
  c.seq_len = 256
  c.global_batch_size = batch
  c.num_train_steps = steps
  big = size in ("1b", "7b")
  c.model = model_config(f"{family}-{size}", softmax=softmax, norm=norm, dtype="bfloat16",
                         remat="full" if big else "none")
  c.topology = SLICES[size]
  c.data.source = "c4"
  c.data.paths = "data/c4"
  c.data.tokenizer = "gpt2"
  c.optimizer.name = optimizer
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = max(1000, steps // 100)
  c.optimizer.end_lr_fraction = 0.1
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.95, 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.checkpoint.every_steps = 1000
  c.checkpoint.max_to_keep = 3
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.eval_batches = 32
  c.eval_batch_size = 64
  c.outlier_every_steps = 1000
  c.outlier_batch_size = 16
  return c
