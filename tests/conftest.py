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


# The longest tests, run first (seconds alone on a 2-core machine: 165, 62, 84, 68). Under
# ``pytest -n 2`` xdist's load scheduler hands each worker a chunk of consecutive tests at the
# start; with ``--maxschedchunk=2`` (pytest.ini) the first worker gets the first two of this list
# and the second worker the next two, so the longest ones run side by side instead of ending the
# run one after another on one worker. Only the order changes: every test runs, unchanged.
SLOWEST_FIRST = (
    "tests/training/test_aot.py::test_gpt2_60m_orthoadam_moves_what_adamw_moves_on_a_v5e_slice",
    "tests/training/test_resume.py::"
    "test_sigkill_and_sigterm_resume_reproduce_the_uninterrupted_losses",
    "tests/training/test_sharded_step.py::"
    "test_step_with_pallas_attention_per_shard_equals_one_device[pallas_tpu-layout1]",
    "tests/experiments/test_lab.py::test_softmax_adamw_grows_an_attention_sink_on_bigram_backcopy",
)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {nodeid: i for i, nodeid in enumerate(SLOWEST_FIRST)}
  # A stable sort: every other test keeps its collection order, after the slow ones.
  items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))
