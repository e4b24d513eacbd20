"""Process-level settings that entry points apply before jax starts its backends.

XLA reads ``XLA_FLAGS`` once, when the first computation initialises a backend, and glibc's
malloc settings must precede the threads that XLA starts with it, so these run before that:
``softmax-one train/eval/analyze``, the ``bench/`` scripts and the test set-up call them before
computing anything. Library code never touches the environment or the allocator.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
from collections.abc import Iterable, Mapping, MutableMapping

# jax 0.10's CPU runtime can deadlock (every thread parked, the program never finishing) on a
# program holding several batched QR decompositions, which is what OrthoAdam's Haar families
# compile to at init: three Block inits in one jit hung in 4 of 4 tries, 0 of 3 with this flag;
# jax 0.12 did not hang. The flag costs speed: without the concurrency-optimised scheduler the
# optimizer update no longer overlaps the backward pass (tiny OrthoAdam step 1.02x -> 1.07x
# AdamW's), so it is applied only where a Haar family will be drawn.
CPU_DEADLOCK_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
# The OrthoAdam rotation families (optim/rotations.py) whose init draws Haar matrices by QR. Their
# names live here, in the bottom layer that imports nothing of the package, and optim reads them
# from here; tests/test_runtime.py checks them against the families' inits.
HAAR_FAMILIES = ("dense", "kronecker", "block")


def apply_cpu_workarounds(rotations: Iterable[str | None] = HAAR_FAMILIES,
                          environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds ``CPU_DEADLOCK_FLAG`` to ``XLA_FLAGS`` on jax 0.10.x if a Haar family is among them.

  Args:
    rotations: the OrthoAdam rotation families the process will initialise (names; ``None``
      stands for the default, "hadamard", which needs no QR).
    environ: the environment to edit (``os.environ`` by default).

  Returns:
    Whether the flag is now in ``environ["XLA_FLAGS"]``.

  Example:
    >>> env = {}
    >>> apply_cpu_workarounds(["hadamard"], env)
    False
  """
  flags = environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
    return CPU_DEADLOCK_FLAG in flags
  if (not importlib.metadata.version("jax").startswith("0.10.")
      or not any(r in HAAR_FAMILIES for r in rotations)):
    return False
  environ["XLA_FLAGS"] = f"{flags} {CPU_DEADLOCK_FLAG}".strip()
  return True


# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def _runs_on_cpu_only(environ: Mapping[str, str]) -> bool:
  """Whether jax will pick the CPU backend: JAX_PLATFORMS says so, or no accelerator plugin.

  Plugins are looked for without importing them: the known package names, and any module in
  jax's ``jax_plugins`` namespace package.
  """
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    return False
  namespace = importlib.util.find_spec("jax_plugins")
  locations = namespace.submodule_search_locations if namespace else None
  return not (locations and any(pkgutil.iter_modules(locations)))


def configure_host_allocator(environ: Mapping[str, str] = os.environ) -> bool:
  """Makes glibc's malloc keep freed memory in the process, when jax will compute on the CPU.

  XLA:CPU allocates the buffers of every step afresh, and glibc hands large blocks back to the
  kernel when they are freed (``munmap``, heap trimming, per-thread arenas), so each step writes
  to new pages and the kernel zeroes them one page fault at a time: ~52,000 faults (~200 MB) per
  ``tiny`` train step, about a quarter of its time on this project's 2-core VM. With one arena,
  no ``mmap``'d blocks and no trimming, freed buffers are reused warm: 0-10 faults per step and
  the step ~25% faster (``bench/train.py``, which applies it to JAX and PyTorch alike). Memory
  the process once used is kept until it exits. The price is one malloc lock for every thread:
  a process that mostly compiles gets slower (the test suite, ~330 programs: 322 -> 384 s), so
  use it where steps repeat: training, evaluation, benchmarks.

  Call it before jax initialises a backend (XLA's threads settle their malloc arenas then);
  later it does nothing useful. Skipped when an accelerator will be used (host memory there is
  not on the step's critical path), and on platforms without glibc.

  Args:
    environ: where ``JAX_PLATFORMS`` is read from.

  Returns:
    Whether the allocator was configured.

  Example:
    >>> configure_host_allocator()   # first thing in a CPU training script
    True
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if not _runs_on_cpu_only(environ):
    return False
  mallopt = ctypes.CDLL("libc.so.6").mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # Trimming only beyond 2 GiB of free heap top (mallopt takes an int).
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)
