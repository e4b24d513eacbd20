"""Process-level XLA settings that entry points apply before jax starts its backends.

XLA reads ``XLA_FLAGS`` once, when the first computation initialises a backend, so these must run
before that: ``softmax-one train``, ``bench/optimizer.py`` and the test set-up call
``apply_cpu_workarounds`` before computing anything. Library code never touches the environment.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable, MutableMapping

# jax 0.10's CPU runtime can deadlock (every thread parked, the program never finishing) on a
# program holding several batched QR decompositions, which is what OrthoAdam's Haar families
# compile to at init: three Block inits in one jit hung in 4 of 4 tries, 0 of 3 with this flag;
# jax 0.12 did not hang. The flag costs speed: without the concurrency-optimised scheduler the
# optimizer update no longer overlaps the backward pass (tiny OrthoAdam step 1.02x -> 1.07x
# AdamW's), so it is applied only where a Haar family will be drawn.
CPU_DEADLOCK_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
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
