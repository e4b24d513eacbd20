"""Llama-2 grid of the paper: ``llama2.py:size,softmax,optimizer[,norm]``.

sizes 60m | 130m | 350m | 1b | 7b; softmax | softmax1 | learned_sink; adamw | orthoadam; optional
norm: rmsnorm (the default for every optimizer) | layernorm | scalar_rmsnorm | scalar_layernorm.
The norm is its own axis, so the optimizer column changes only the optimizer. The paper's pairing
of OrthoAdam with a scalar-gain norm is the explicit fourth part,
``60m,softmax1,orthoadam,scalar_rmsnorm``, named ``llama2-60m-softmax1-orthoadam-scalar_rmsnorm``;
``60m,paper`` is the same cell (softmax-1, OrthoAdam mixing every axis whole, scalar RMSNorm).
1b and 7b use remat. See paper.py.

Example::

  softmax-one train --config=experiments/configs/llama2.py:130m,softmax,adamw \\
      --workdir=runs/llama2-130m-softmax-adamw --config.mesh.fsdp=-1
"""

from experiments.configs.paper import grid_config


def get_config(arg: str = "60m,softmax1,orthoadam"):
  return grid_config("llama2", arg)
