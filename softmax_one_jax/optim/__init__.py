"""OrthoAdam for optax: Adam in a fixed random orthogonal basis per parameter.

Kaul et al., "From Attention to Activation", ICLR 2025 (arXiv:2410.17174), Algorithm 1.

Example:
  >>> import optax
  >>> from softmax_one_jax.optim import orthoadam
  >>> tx = optax.chain(optax.clip_by_global_norm(1.0), orthoadam(3e-4, weight_decay=0.1))

On sharded parameters, pass their shardings: ``Q`` stays the same, and each axis is rotated in
a layout where it is whole (an all-to-all, not an all-gather; ``layout.py``):
  >>> tx = orthoadam(3e-4, shardings=param_shardings)
"""

from softmax_one_jax.optim.orthoadam import (
    ScaleByOrthoAdamState,
    orthoadam,
    param_key,
    path_name,
    reset_moments,
    scale_by_orthoadam,
)
from softmax_one_jax.optim.rotations import (
    DEFAULT_ROTATION,
    FAMILIES,
    Block,
    BlockRotation,
    Dense,
    DenseRotation,
    Hadamard,
    HadamardRotation,
    Identity,
    IdentityRotation,
    Kronecker,
    KroneckerRotation,
    haar_orthogonal,
    rotation_intact,
    rotation_state_bytes,
)
from softmax_one_jax.optim.layout import MixingPlan, mixing_plan
from softmax_one_jax.optim.sharding import optimizer_state_shardings, rotation_shardings

__all__ = [
    "DEFAULT_ROTATION",
    "FAMILIES",
    "Block",
    "BlockRotation",
    "Dense",
    "DenseRotation",
    "Hadamard",
    "HadamardRotation",
    "Identity",
    "IdentityRotation",
    "MixingPlan",
    "Kronecker",
    "KroneckerRotation",
    "ScaleByOrthoAdamState",
    "haar_orthogonal",
    "mixing_plan",
    "optimizer_state_shardings",
    "orthoadam",
    "param_key",
    "path_name",
    "reset_moments",
    "rotation_intact",
    "rotation_shardings",
    "rotation_state_bytes",
    "scale_by_orthoadam",
]
