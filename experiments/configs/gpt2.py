"""GPT-2 grid of the paper: ``gpt2.py:size,softmax,optimizer[,norm]``.

sizes 60m | 130m | 350m; softmax | softmax1 | learned_sink; adamw | orthoadam; optional norm:
layernorm (the default for every optimizer) | rmsnorm | scalar_rmsnorm | scalar_layernorm. The
norm is its own axis, so the optimizer column changes only the optimizer. The paper's pairing of
OrthoAdam with a scalar-gain norm is the explicit fourth part,
``60m,softmax1,orthoadam,scalar_layernorm`` (LayerNorm with one scalar gain: centring and bias
kept), named ``gpt2-60m-softmax1-orthoadam-scalar_layernorm``; ``60m,paper`` is the same cell
(softmax-1, OrthoAdam mixing every axis whole, scalar LayerNorm). See paper.py for the settings
and guesses.

Example::

  softmax-one train --config=experiments/configs/gpt2.py:60m,softmax1,orthoadam \\
      --workdir=runs/gpt2-60m-softmax1-orthoadam --config.data.paths=data/c4
"""

from experiments.configs.paper import grid_config


def get_config(arg: str = "60m,softmax1,orthoadam"):
  return grid_config("gpt2", arg)
