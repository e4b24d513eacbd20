"""Llama-2 grid of the paper: ``llama2.py:size,softmax,optimizer[,norm]``.

sizes 60m | 130m | 350m | 1b | 7b; softmax | softmax1 | learned_sink; adamw | orthoadam; optional norm (default:
rmsnorm with AdamW, scalar_rmsnorm with OrthoAdam). 1b and 7b use remat. See paper.py.

Example::

  softmax-one train --config=experiments/configs/llama2.py:130m,softmax,adamw \\
      --workdir=runs/llama2-130m-softmax-adamw --config.mesh.fsdp=-1
"""

from experiments.configs.paper import grid_config


def get_config(arg: str = "60m,softmax1,orthoadam"):
  return grid_config("llama2", arg)
