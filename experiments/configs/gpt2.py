"""GPT-2 grid of the paper: ``gpt2.py:size,softmax,optimizer[,norm]``.

sizes 60m | 130m | 350m; softmax | softmax1 | learned_sink; adamw | orthoadam; optional norm (default:
layernorm with AdamW, scalar_rmsnorm with OrthoAdam). See paper.py for the settings and guesses.

Example::

  softmax-one train --config=experiments/configs/gpt2.py:60m,softmax1,orthoadam \\
      --workdir=runs/gpt2-60m-softmax1-orthoadam --config.data.paths=data/c4
"""

from experiments.configs.paper import grid_config


def get_config(arg: str = "60m,softmax1,orthoadam"):
  return grid_config("gpt2", arg)
