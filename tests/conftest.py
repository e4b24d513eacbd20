"""Test-wide set-up: eight virtual CPU devices, so sharded code is tested without accelerators.

XLA reads the flag when jax initialises its backends, so this must run before any test imports jax.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole session, empty at its start: the same
# programs are compiled in many tests and in the training subprocesses they start (a resumed run
# compiles what the interrupted one did), and jax reads the directory from the environment, which
# xdist's workers and every subprocess inherit. The process that makes it removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="softmax_one_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

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


# The longest tests, run first (seconds each in a full ``-n 2`` run on a 2-core machine: 125,
# 81, 70, 63, 58, 45, 40). Under ``pytest -n 2`` xdist's load scheduler hands each worker a chunk
# of consecutive tests at the start; with ``--maxschedchunk=2`` (pytest.ini) the first worker
# gets the first two of this list and the second worker the next two, so the longest ones run side
# by side instead of ending the run one after another on one worker. Only the order changes:
# every test runs, unchanged.
SLOWEST_FIRST = (
    "tests/test_notebooks.py::test_notebook_runs_in_the_small_setting[orthoadam_in_your_code]",
    "tests/training/test_aot.py::test_gpt2_60m_orthoadam_moves_what_adamw_moves_on_a_v5e_slice",
    "tests/test_notebooks.py::test_notebook_runs_in_the_small_setting[softmax_one_tour]",
    "tests/test_notebooks.py::test_notebook_runs_in_the_small_setting[extreme_token_lab]",
    "tests/test_notebooks.py::test_notebook_runs_in_the_small_setting[outliers_and_quantisation]",
    "tests/experiments/test_lab.py::test_softmax_adamw_grows_an_attention_sink_on_bigram_backcopy",
    "tests/test_notebooks.py::test_notebook_runs_in_the_small_setting[scale_out]",
    "tests/training/test_aot.py::test_gpt2_60m_compiles_for_two_v5e_slices_with_data_across_them",
    "tests/training/test_bucket_workdir.py::test_train_kill_resume_eval_analyze_all_in_a_bucket",
    "tests/training/test_elastic_resume.py::test_a_run_saved_by_two_processes_resumes_on_one_with_the_same_batches",
    "tests/training/test_restore_agreement.py::test_a_step_only_process_1_finds_corrupt_is_damaged_for_both",
)


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {nodeid: i for i, nodeid in enumerate(SLOWEST_FIRST)}
  # A stable sort: every other test keeps its collection order, after the slow ones.
  items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))
