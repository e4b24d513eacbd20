"""Runs ``softmax-one`` with the checkpoint reads of one process failing as if the data were damaged.

Usage (from tests/training/test_restore_agreement.py)::

  python tests/training/_read_faults.py corrupt STEP PROCESS -- train --config=... --workdir=...

Process ``PROCESS``'s every read of checkpoint step ``STEP`` raises what TensorStore raises for a
damaged array file (``ValueError: DATA_LOSS: ...``); the other processes read the step as it is
on disk. So only one process sees the damage, as after a torn read of a file cached on one host.
"""

from __future__ import annotations

import sys

import jax
import orbax.checkpoint as ocp


def _inject(step: int, process: int) -> None:
  restore = ocp.Checkpointer.restore

  def faulty_restore(self, directory, *args, **kwargs):
    if jax.process_index() == process and str(directory).rstrip("/").endswith(f"/{step}"):
      raise ValueError(f'DATA_LOSS: Error reading "params/.zarray" in OCDBT database at '
                       f'"{directory}/state/" (injected on process {process})')
    return restore(self, directory, *args, **kwargs)

  ocp.Checkpointer.restore = faulty_restore


def main() -> None:
  fault, step, process, sep, *cli_args = sys.argv[1:]
  assert fault == "corrupt" and sep == "--", sys.argv
  _inject(int(step), int(process))
  from softmax_one_jax import cli  # pylint: disable=import-outside-toplevel
  cli.main(["softmax-one", *cli_args])


if __name__ == "__main__":
  main()
