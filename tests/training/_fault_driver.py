"""Runs ``softmax-one`` with a fault injected into Orbax's asynchronous checkpoint save.

Usage (from tests/training/test_faults.py)::

  python tests/training/_fault_driver.py pause STEP -- train --config=... --workdir=...
  python tests/training/_fault_driver.py disk_full STEP -- train ...

The fault strikes when Orbax finalizes step ``STEP``: its arrays are written into the temporary
directory, which is not yet renamed to the step's name.
  pause:      prints ``SAVE PAUSED <tmp dir>`` and blocks that save forever, so the test can
              SIGKILL the process in the middle of an asynchronous save.
  disk_full:  raises ``OSError(ENOSPC)`` there, as a write to a full disk would.
"""

from __future__ import annotations

import errno
import sys
import threading

from orbax.checkpoint._src.path import atomicity


def _inject(fault: str, step: int) -> None:
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def faulty_finalize(self):
    if self.get_final().name == str(step):
      tmp = self.get()
      if fault == "pause":
        print(f"SAVE PAUSED {tmp}", flush=True)
        threading.Event().wait()                # until the test kills the process
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "commit_success.txt"))
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = faulty_finalize


def main() -> None:
  fault, step, sep, *cli_args = sys.argv[1:]
  assert fault in ("pause", "disk_full") and sep == "--", sys.argv
  _inject(fault, int(step))
  from softmax_one_jax import cli  # pylint: disable=import-outside-toplevel
  cli.main(["softmax-one", *cli_args])


if __name__ == "__main__":
  main()
