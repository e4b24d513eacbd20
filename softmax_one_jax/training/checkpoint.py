"""Orbax checkpoints of the training state and the data iterator.

A checkpoint step holds two items: ``state`` (the ``TrainState`` pytree: params, optimizer state
with OrthoAdam rotations, step, RNG, non-finite counters) and ``data`` (each process's Grain
iterator state, through Grain's Orbax handler). Saves are asynchronous (Orbax copies arrays to host
before ``save`` returns, so the next step may donate them); the last ``max_to_keep`` steps are kept.
A step that cannot be read is reported and the previous one is used; a training resume also moves
it aside (renamed into ``workdir/checkpoints_damaged/``, never deleted) so the run can save that
step again.

The run directory's layout, its config.json, the manager on ``workdir/checkpoints`` and the
params-only restore (``load_model``) live in ``softmax_one_jax.rundir``, which analysis reads too.

Example:
  >>> manager = rundir.make_manager(workdir, max_to_keep=3, async_save=True)
  >>> save(manager, step, state, train_iterator)
  >>> state, step = restore_latest(manager, setup.abstract_state, train_iterator)
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from grain.checkpoint import CheckpointRestore, CheckpointSave
from jax.experimental import multihost_utils

from softmax_one_jax import rundir
from softmax_one_jax.training.state import TrainState

log = logging.getLogger(__name__)


class _IteratorSnapshot:
  """A data-iterator state captured at save time, in the form Grain's Orbax handler accepts.

  Grain's handler calls ``get_state()`` when it writes (maybe later, on a background thread);
  a snapshot makes the saved state the one at the step being saved.
  """

  def __init__(self, state: bytes | None = None):
    self._state = state

  def get_state(self) -> bytes:
    return self._state

  def set_state(self, state: bytes) -> None:
    self._state = state

  def start_prefetch(self) -> None:
    pass


def _snapshot(iterator: Any) -> _IteratorSnapshot:
  state = iterator.get_state()
  return _IteratorSnapshot(state if isinstance(state, bytes) else json.dumps(state).encode())


def _apply_snapshot(iterator: Any, snapshot: _IteratorSnapshot) -> None:
  raw = snapshot.get_state()
  iterator.set_state(raw if isinstance(iterator, grain.DataLoaderIterator) else json.loads(raw))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iterator: Any | None = None) -> None:
  """Starts saving ``state`` (and the data iterator's current state) as ``step``.

  Args:
    manager: from ``rundir.make_manager``.
    step: the number of optimizer steps in ``state`` (and batches the iterator has yielded).
    state: the training state (its arrays may be donated right after this returns).
    data_iterator: the Grain train iterator, or None.
  """
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items["data"] = CheckpointSave(_snapshot(data_iterator))
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState,
                   data_iterator: Any | None = None, step: int | None = None,
                   move_aside_unreadable: bool = False) -> tuple[TrainState, int] | None:
  """Restores the newest readable step (or ``step``); sets the data iterator's state.

  An unreadable or partial step is reported with a warning naming the step and the error, and
  the previous step is tried. With ``move_aside_unreadable`` (a training resume, which will save
  those steps again) the steps newer than the one restored that could not be read, and step
  directories Orbax never finalized, are renamed to ``workdir/checkpoints_damaged/<step>-<UTC
  time>`` by process 0 (all processes wait for it); nothing is moved when no step reads.

  Args:
    manager: from ``rundir.make_manager``.
    abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct`` with shardings (restore target).
    data_iterator: the Grain train iterator to restore in place, or None to skip the data item.
    step: a specific step (no fallback), or None for the newest readable one.
    move_aside_unreadable: move unreadable steps out of the manager's directory (only with
      ``step=None``); read-only users leave it False.

  Returns:
    ``(state, step)``, or None when there is no checkpoint.

  Raises:
    RuntimeError: checkpoints exist but none could be read.

  Example:
    >>> state, step = restore_latest(manager, abstract_state, train_iter,
    ...                              move_aside_unreadable=True)  # doctest: +SKIP
  """
  snapshot = _IteratorSnapshot()

  def args() -> ocp.args.Composite:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = CheckpointRestore(snapshot)
    return ocp.args.Composite(**items)

  on_found = functools.partial(_move_aside, manager) if move_aside_unreadable else None
  found = rundir.restore_newest_readable(manager, args, step, on_found)
  if found is None:
    return None
  restored, s = found
  if data_iterator is not None:
    _apply_snapshot(data_iterator, snapshot)
  return restored["state"], s


def _move_aside(manager: ocp.CheckpointManager, unreadable: list[int]) -> None:
  """Renames ``unreadable`` steps and unfinalized step directories into ``rundir.DAMAGED_DIR``.

  A step directory left in place blocks saving that step again (``StepAlreadyExistsError``), so a
  resumed run could not pass it; renaming keeps the files for inspection. Unfinalized step
  directories (a numeric name that ``all_steps`` does not list, e.g. no ``commit_success`` on
  object stores after a killed save) are moved too; Orbax's ``*.orbax-checkpoint-tmp-*``
  directories are not steps and are left to ``cleanup_tmp_directories`` (``rundir.make_manager``).
  Process 0 renames; the others wait at a barrier, then every process reloads the step list.

  Example:
    >>> _move_aside(manager, [60])  # doctest: +SKIP
  """
  directory = epath.Path(manager.directory)
  finalized = set(manager.all_steps())
  names = {str(s) for s in unreadable}
  if directory.exists():
    names |= {p.name for p in directory.iterdir()
              if p.name.isdigit() and p.is_dir() and int(p.name) not in finalized}
  if not names:
    return
  if jax.process_index() == 0:
    damaged = directory.parent / rundir.DAMAGED_DIR
    damaged.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    for name in sorted(names, key=int):
      source, target = directory / name, damaged / f"{name}-{stamp}"
      if not source.exists():
        continue
      source.rename(target)
      log.warning("Moved unreadable checkpoint step %s from %s to %s (kept, not deleted); training "
                  "continues through that step and saves it again.", name, source, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("softmax_one_jax.checkpoint.move_aside")
  manager.reload()
