"""Orbax checkpoints of the training state and the data iterator, and ``load_model``.

A checkpoint step holds two items: ``state`` (the ``TrainState`` pytree: params, optimizer state
with OrthoAdam rotations, step, RNG, non-finite counters) and ``data`` (each process's Grain
iterator state, through Grain's Orbax handler). Saves are asynchronous (Orbax copies arrays to host
before ``save`` returns, so the next step may donate them); the last ``max_to_keep`` steps are kept.
A step that cannot be read is reported and the previous one is used; a training resume also moves
it aside (renamed into ``workdir/checkpoints_damaged/``, never deleted) so the run can save that
step again.

Workdir layout (shared with analysis)::

  workdir/config.json        the run's full, resolved config
  workdir/checkpoints/<step>/{state,data}/
  workdir/checkpoints_damaged/<step>-<UTC time>/   unreadable steps a training resume moved aside
  workdir/metrics.jsonl      one JSON object per logged step
  workdir/tensorboard/       event files

Example:
  >>> manager = make_manager(workdir, max_to_keep=3, async_save=True)
  >>> save(manager, step, state, train_iterator)
  >>> state, step = restore_latest(manager, setup.abstract_state, train_iterator)
  >>> model, config = load_model(workdir)
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from grain.checkpoint import CheckpointRestore, CheckpointSave

from softmax_one_jax.errors import MissingFileError
from softmax_one_jax.training.state import TrainState, abstract_model, param_shardings

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
CONFIG_FILE = "config.json"


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


def make_manager(workdir: str | pathlib.Path, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` on ``workdir/checkpoints`` (save policy is the loop's: ``save``).

  Args:
    workdir: the run directory.
    max_to_keep: newest steps kept on disk.
    async_save: write in a background thread after the device-to-host copy.
    read_only: open for reading only (evaluation, analysis).
  """
  # "read_only" opens without creating or cleaning anything (Orbax's own read_only flag only adds
  # a warning; nothing here saves through a reading manager).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
      cleanup_tmp_directories=not read_only)
  directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iterator: Any | None = None) -> None:
  """Starts saving ``state`` (and the data iterator's current state) as ``step``.

  Args:
    manager: from ``make_manager``.
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
    manager: from ``make_manager``.
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

  found = _restore_newest_readable(manager, args, step, move_aside_unreadable)
  if found is None:
    return None
  restored, s = found
  if data_iterator is not None:
    _apply_snapshot(data_iterator, snapshot)
  return restored["state"], s


def restore_params(workdir: str | pathlib.Path, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, int] | None:
  """Only the parameters of a run's newest readable step (or ``step``): no optimizer is built.

  The optimizer state on disk is not read, so a checkpoint whose optimizer state no longer
  matches today's optimizer code still yields its weights. Unreadable steps fall back as in
  ``restore_latest``. Opens its own read-only manager (Orbax binds one handler type per item and
  manager, and this read uses a partial one).

  Args:
    workdir: the run directory.
    abstract_params: ``nnx.State`` of ``jax.ShapeDtypeStruct`` with shardings.
    step: a specific step (no fallback), or None for the newest readable one.

  Returns:
    ``(params, step)``, or None when there is no checkpoint.

  Example:
    >>> params, step = restore_params("runs/tiny", abstract_params)  # doctest: +SKIP
  """
  item = {"params": abstract_params}

  def args() -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))

  manager = make_manager(workdir, read_only=True, async_save=False)
  try:
    found = _restore_newest_readable(manager, args, step)
  finally:
    manager.close()
  return None if found is None else (found[0]["state"]["params"], found[1])


def _restore_newest_readable(manager: ocp.CheckpointManager,
                             args: Callable[[], ocp.args.Composite],
                             step: int | None, move_aside: bool = False
                             ) -> tuple[Any, int] | None:
  """``manager.restore`` of the newest step that reads (or of ``step``), warning on the others.

  With ``move_aside`` (and ``step`` None), once a step reads, the unreadable newer ones and the
  unfinalized step directories are moved out of the manager's step namespace (``_move_aside``).
  """
  manager.reload()
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  errors, unreadable = [], []
  for s in steps:
    try:
      restored = manager.restore(s, args=args())
    except Exception as e:  # pylint: disable=broad-except  # any failure: try the previous step
      msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      log.warning("Checkpoint step %d in %s is unreadable or partial (%s); trying the previous "
                  "step.", s, manager.directory, msg)
      errors.append(f"step {s}: {msg}")
      unreadable.append(int(s))
      continue
    if errors:
      log.warning("Resumed from step %d after skipping unreadable steps: %s", s, "; ".join(errors))
    if move_aside and step is None:
      _move_aside(manager, unreadable)
    return restored, int(s)
  if errors:
    raise RuntimeError(
        f"No readable checkpoint in {manager.directory}: " + "; ".join(errors) +
        ". Move the directory away to start afresh, or pass an explicit step.")
  if move_aside and step is None:
    _move_aside(manager, [])
  return None


def _move_aside(manager: ocp.CheckpointManager, unreadable: list[int]) -> None:
  """Renames ``unreadable`` steps and unfinalized step directories into ``DAMAGED_DIR``.

  A step directory left in place blocks saving that step again (``StepAlreadyExistsError``), so a
  resumed run could not pass it; renaming keeps the files for inspection. Unfinalized step
  directories (a numeric name that ``all_steps`` does not list, e.g. no ``commit_success`` on
  object stores after a killed save) are moved too; Orbax's ``*.orbax-checkpoint-tmp-*``
  directories are not steps and are left to ``cleanup_tmp_directories`` (``make_manager``).
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
    damaged = directory.parent / DAMAGED_DIR
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
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("softmax_one_jax.checkpoint.move_aside")
  manager.reload()


def write_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Writes ``workdir/config.json`` (process 0 only)."""
  from softmax_one_jax.training.config import config_to_json  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config) + "\n")


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json``; a clear error when the run directory has none."""
  from softmax_one_jax.training.config import config_from_json  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingFileError(f"{path} not found: {workdir} is not a run directory written by "
                           "`softmax-one train --workdir=...`.")
  return config_from_json(path.read_text())


def load_model(workdir: str | pathlib.Path, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict]:
  """The trained ``Transformer`` of a run (newest readable step, or ``step``) and its config.

  Args:
    workdir: a run directory (``config.json`` + ``checkpoints/``).
    step: a checkpoint step; None = newest readable.

  Returns:
    ``(model, config)``: an ``nnx`` Transformer with the restored parameters (placed on all local
    devices, fsdp-sharded) and the run's full ``ml_collections`` config.

  Example:
    >>> model, config = load_model("runs/tiny")
    >>> logits_btv = model(tokens_bt)
  """
  from softmax_one_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training.config import model_config_from  # pylint: disable=import-outside-toplevel
  config = read_config(workdir)
  model_cfg = model_config_from(config, config.model.vocab_size)
  mesh = mesh_lib.make_mesh(1, -1, 1)
  graphdef, abstract_params, abstract_rest = abstract_model(model_cfg)
  if jax.tree.leaves(abstract_rest):
    raise NotImplementedError("the model holds non-parameter state; load_model restores "
                              "parameters only.")
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract_params, param_shardings(abstract_params, mesh))
  restored = restore_params(workdir, target, step)
  if restored is None:
    raise MissingFileError(f"No checkpoint in {pathlib.Path(workdir) / CHECKPOINT_DIR}.")
  params, _ = restored
  return nnx.merge(graphdef, params, abstract_rest), config
