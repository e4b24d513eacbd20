"""Flax NNX decoder-only Transformer LMs with softmax, softmax-1 or learned-sink attention.

Example:
  >>> from flax import nnx
  >>> from softmax_one_jax.models import Transformer, preset
  >>> model = Transformer(preset("tiny", softmax="softmax1"), rngs=nnx.Rngs(0))
"""

from softmax_one_jax.models.config import PRESET_NAMES, TransformerConfig, preset
from softmax_one_jax.models.generate import generate
from softmax_one_jax.models.hf import load_hf
from softmax_one_jax.models.intermediates import INTERMEDIATES, SowConfig, with_intermediates
from softmax_one_jax.models.loss import weighted_cross_entropy
from softmax_one_jax.models.transformer import (
    KVCache,
    Transformer,
    count_params,
    positions_from_segments,
)

__all__ = [
    "INTERMEDIATES",
    "KVCache",
    "PRESET_NAMES",
    "SowConfig",
    "Transformer",
    "TransformerConfig",
    "count_params",
    "generate",
    "load_hf",
    "positions_from_segments",
    "preset",
    "weighted_cross_entropy",
    "with_intermediates",
]
