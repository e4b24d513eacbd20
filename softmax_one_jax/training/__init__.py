"""Training: mesh and shardings, the jitted train step, Orbax checkpoints and the loop.

Example:
  >>> from softmax_one_jax.training import train
  >>> summary = train(config, "runs/tiny")        # config from experiments/configs/tiny.py
"""

from softmax_one_jax.models.loss import weighted_cross_entropy
from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.evaluation import evaluate
from softmax_one_jax.training.loop import train
from softmax_one_jax.training.mesh import LOGICAL_AXIS_RULES, MESH_AXES, make_mesh
from softmax_one_jax.training.state import TrainState, build_optimizer, init_train_state, make_setup
from softmax_one_jax.training.step import jit_train_step, make_train_step
from softmax_one_jax.training.step_log import NonFiniteError

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "NonFiniteError",
    "TrainState",
    "build_optimizer",
    "evaluate",
    "init_train_state",
    "jit_train_step",
    "make_mesh",
    "make_setup",
    "make_train_step",
    "train",
    "validate_config",
    "weighted_cross_entropy",
]
