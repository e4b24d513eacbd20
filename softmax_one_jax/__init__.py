"""softmax_one_jax: softmax-1 attention and OrthoAdam in JAX/Flax.

A reimplementation of Kaul et al., "From Attention to Activation: Unravelling the Enigmas of
Large Language Models" (ICLR 2025, arXiv:2410.17174). Public names only live here.
"""

from softmax_one_jax.softmax import log_softmax1, logsumexp1, softmax1
from softmax_one_jax.attention import dot_product_attention

__version__ = "0.1.0"

__all__ = ["dot_product_attention", "log_softmax1", "logsumexp1", "softmax1"]
