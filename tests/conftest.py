"""Test-wide set-up: eight virtual CPU devices, so sharded code is tested without accelerators.

XLA reads the flag when jax initialises its backends, so this must run before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
