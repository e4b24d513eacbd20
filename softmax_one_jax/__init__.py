"""softmax_one_jax: softmax-1 attention and OrthoAdam in JAX/Flax.

A reimplementation of Kaul et al., "From Attention to Activation: Unravelling the Enigmas of
Large Language Models" (ICLR 2025, arXiv:2410.17174). Public names only live here.
"""

from softmax_one_jax.softmax import log_softmax1, logsumexp1, softmax1
from softmax_one_jax.attention import attention_stats, dot_product_attention, first_token_stats
from softmax_one_jax.optim import optimizer_state_shardings, orthoadam, scale_by_orthoadam

__version__ = "0.1.0"

__all__ = [
    "attention_stats",
    "dot_product_attention",
    "first_token_stats",
    "log_softmax1",
    "logsumexp1",
    "optimizer_state_shardings",
    "orthoadam",
    "scale_by_orthoadam",
    "softmax1",
]
