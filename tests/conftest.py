"""Test-wide set-up: eight virtual CPU devices, so sharded code is tested without accelerators.

XLA reads the flag when jax initialises its backends, so this must run before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from softmax_one_jax.runtime import apply_cpu_workarounds  # noqa: E402  (no backend started yet)

apply_cpu_workarounds()

import numpy as np
import pytest


@pytest.fixture
def np_rng(request) -> np.random.Generator:
  """A generator with a fresh seed each run; the seed is printed so a failure can be replayed."""
  seed = int.from_bytes(os.urandom(4), "little")
  print(f"{request.node.nodeid}: numpy seed {seed}")
  return np.random.default_rng(seed)
