"""Orbax checkpoints of the training state and the data iterator.

A checkpoint step holds two items: ``state`` (the ``TrainState`` pytree: params, optimizer state
with OrthoAdam rotations, step, RNG, non-finite counters) and ``data`` (one Grain iterator state
per data shard, ``data/shard_{s}-of-{S}.json``, each written by the process that reads the shard:
``DataShardsHandler``). Both restore on any process count whose mesh fits the batch and which
divides ``config.data_shards``, and the data continues with the same global batches; a step
written by Grain's own handler (``data/process_{i}-of-{n}.json``) restores on ``n`` processes.
Saves are asynchronous (Orbax copies arrays to host before ``save`` returns, so the next step may
donate them); the last ``max_to_keep`` steps are kept.

Every process reads each step and all agree on what it gave (``rundir.restore_newest_readable``,
``softmax_one_jax.checkpoint_reads``): all restore the newest step that every process read. A step
that any process found corrupt is skipped by all, and a training resume moves it aside (process 0
renames it into ``workdir/checkpoints_damaged/``, never deletes it) so the run can save that step
again; a transient I/O error is retried and, when it persists, stops the resume with nothing
moved.

The run directory's layout, its config.json, the manager on ``workdir/checkpoints`` and the
params-only restore (``load_model``) live in ``softmax_one_jax.rundir``, which analysis reads too.

Example:
  >>> manager = rundir.make_manager(workdir, max_to_keep=3, async_save=True)
  >>> save(manager, step, state, train_iterator)
  >>> state, step = restore_latest(manager, setup.abstract_state, train_iterator)
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from softmax_one_jax import rundir
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.optim.layout import matrix_view
from softmax_one_jax.training.data_iter import ShardedIterator
from softmax_one_jax.training.state import TrainState

log = logging.getLogger(__name__)

_SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json")
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")      # Grain's handler: per process


def shard_file(shard: int, num_shards: int) -> str:
  """The data item's file of one data shard: ``shard_file(1, 4) == "shard_1-of-4.json"``."""
  return f"shard_{shard}-of-{num_shards}.json"


def data_files_to_read(names: Collection[str], shard_ids: Sequence[int], num_shards: int,
                       process_index: int, process_count: int) -> tuple[list[str], bool]:
  """Which files of a step's ``data`` item hold this process's shards.

  Args:
    names: the file names in the item's directory.
    shard_ids, num_shards: the shards this process reads, and ``config.data_shards`` (S).
    process_index, process_count: this process, and how many there are now.

  Returns:
    ``(files, per_process)``: one ``shard_{s}-of-{S}.json`` per shard id, in order
    (``per_process`` False); or, for a step written by Grain's handler with this process count,
    the one ``process_{i}-of-{n}.json`` of this process, holding ``{"shards": [...]}``
    (``per_process`` True).

  Raises:
    ConfigError: the step was saved with another ``config.data_shards``, or per process by
      another process count.
    FileNotFoundError: a file this process needs is missing (the step is corrupt).

  Example:
    >>> data_files_to_read({"shard_0-of-2.json", "shard_1-of-2.json"}, (0, 1), 2, 0, 1)
    (['shard_0-of-2.json', 'shard_1-of-2.json'], False)
  """
  wanted = [shard_file(s, num_shards) for s in shard_ids]
  if all(f in names for f in wanted):
    return wanted, False
  saved = sorted({int(m.group(2)) for m in map(_SHARD_FILE.fullmatch, names) if m})
  if saved and num_shards not in saved:
    raise ConfigError(
        f"The checkpoint's data state was saved with config.data_shards={saved[0]}, but this run "
        f"has {num_shards} data shards; resume with --config.data_shards={saved[0]} (on any "
        "process count that divides it), or start a new --workdir.")
  counts = sorted({int(m.group(2)) for m in map(_PROCESS_FILE.fullmatch, names) if m})
  if not saved and counts:
    mine = f"process_{process_index}-of-{process_count}.json"
    if mine in names:
      return [mine], True
    if process_count not in counts:
      raise ConfigError(
          f"The checkpoint's data state was written per process by {counts[0]} process(es) (the "
          f"format before one file per data shard), and this run has {process_count}. Resume it "
          f"once with {counts[0]} process(es): the checkpoints it writes then are per shard and "
          "resume on any process count that divides config.data_shards.")
    wanted = [mine]
  missing = [f for f in wanted if f not in names]
  raise FileNotFoundError(f"The checkpoint's data state has no {', '.join(missing)}.")


class DataShardsHandler(ocp.CheckpointHandler):
  """Orbax handler of the ``data`` item: one JSON file per data shard, whatever the process count.

  ``save`` writes this process's shards (``DataShardsSave``); ``restore`` reads the shards that
  ``DataShardsRestore`` names and returns their states, in order (``data_files_to_read``).
  """

  def save(self, directory: epath.Path, args: DataShardsSave) -> None:
    for shard, text in args.states.items():
      (epath.Path(directory) / shard_file(shard, args.num_shards)).write_text(text)

  def restore(self, directory: epath.Path, args: DataShardsRestore) -> list[Any]:
    directory = epath.Path(directory)
    names = {p.name for p in directory.iterdir()} if directory.exists() else set()
    files, per_process = data_files_to_read(names, args.shard_ids, args.num_shards,
                                            jax.process_index(), jax.process_count())
    states = [json.loads((directory / f).read_text()) for f in files]
    if not per_process:
      return states
    # Grain's file holds what the saved iterator's get_state gave: a ShardedIterator's
    # {"shards": [...]} (as the code before per-shard files had it), or a plain iterator's own.
    state = states[0]
    return list(state["shards"]) if isinstance(state, dict) and "shards" in state else [state]

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  """This process's shards: ``states`` maps a shard index to its iterator state as JSON text."""

  states: dict[int, str]
  num_shards: int


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  """The shards this process reads (``shard_ids``) of ``num_shards``."""

  shard_ids: tuple[int, ...]
  num_shards: int


def _shards(iterator: Any) -> tuple[tuple[int, ...], int]:
  """``(shard_ids, num_shards)`` of a ``ShardedIterator``; any other iterator is this process's
  one shard of ``process_count``."""
  if isinstance(iterator, ShardedIterator):
    return iterator.shard_ids, iterator.num_shards
  return (jax.process_index(),), jax.process_count()


def _shard_states(iterator: Any) -> list[Any]:
  return iterator.get_shard_states() if isinstance(iterator, ShardedIterator) else [
      iterator.get_state()]


def _set_shard_states(iterator: Any, states: list[Any]) -> None:
  if isinstance(iterator, ShardedIterator):
    iterator.set_shard_states(states)
  else:
    iterator.set_state(states[0])


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         data_iterator: Any | None = None) -> None:
  """Starts saving ``state`` (and the data iterator's current state) as ``step``.

  Args:
    manager: from ``rundir.make_manager``.
    step: the number of optimizer steps in ``state`` (and batches the iterator has yielded).
    state: the training state (its arrays may be donated right after this returns).
    data_iterator: a ``ShardedIterator`` or a Grain ``DatasetIterator``, or None.
  """
  items = {"state": ocp.args.StandardSave(state)}
  if data_iterator is not None:
    ids, num_shards = _shards(data_iterator)
    # JSON now: the iterator moves on while Orbax writes in the background.
    texts = {s: json.dumps(st) for s, st in zip(ids, _shard_states(data_iterator))}
    items["data"] = DataShardsSave(states=texts, num_shards=num_shards)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState,
                   data_iterator: Any | None = None, step: int | None = None,
                   move_aside_unreadable: bool = False) -> tuple[TrainState, int] | None:
  """Restores the newest step that every process reads (or ``step``); sets the data iterator.

  A step that cannot be read is reported with a warning naming the step and the error, and the
  previous step is tried (``rundir.restore_newest_readable``: one decision on every process).
  With ``move_aside_unreadable`` (a training resume, which will save those steps again) the
  corrupt steps newer than the one restored, and step directories Orbax never finalized, are
  renamed to ``workdir/checkpoints_damaged/<step>-<UTC time>`` by process 0 (all processes wait
  for it); nothing is moved when no step reads, or on a transient error.

  Args:
    manager: from ``rundir.make_manager``.
    abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct`` with shardings (restore target).
    data_iterator: the train iterator to restore in place (``ShardedIterator`` or a Grain
      ``DatasetIterator``), or None to skip the data item.
    step: a specific step (no fallback), or None for the newest readable one.
    move_aside_unreadable: move corrupt steps out of the manager's directory (only with
      ``step=None``); read-only users leave it False.

  Returns:
    ``(state, step)``, or None when there is no checkpoint.

  Raises:
    TransientCheckpointError: a transient I/O error outlasted the retries.
    ConfigError: the data state was saved with another ``config.data_shards`` (or per process by
      another process count).
    RuntimeError: checkpoints exist but none could be read.

  Example:
    >>> state, step = restore_latest(manager, abstract_state, train_iter,
    ...                              move_aside_unreadable=True)  # doctest: +SKIP
  """
  def args(s: int) -> ocp.args.Composite:
    target = saved_layout_target(abstract_state, saved_shapes(manager.directory, s))
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      ids, num_shards = _shards(data_iterator)
      items["data"] = DataShardsRestore(shard_ids=tuple(ids), num_shards=num_shards)
    return ocp.args.Composite(**items)

  on_damaged = functools.partial(_move_aside, manager) if move_aside_unreadable else None
  found = rundir.restore_newest_readable(manager, args, step, on_damaged)
  if found is None:
    return None
  restored, s = found
  if data_iterator is not None:
    _set_shard_states(data_iterator, restored["data"])
  return to_current_layout(restored["state"], abstract_state, s), s


def saved_shapes(directory: epath.PathLike, step: int) -> dict[str, tuple[int, ...]]:
  """The shape of every array in ``step``'s ``state`` item, by dotted path (Orbax's metadata);
  empty when the metadata does not read (the restore then fails, and says why, as it would).

  Example:
    >>> saved_shapes(manager.directory, 60)["params.embed.embedding.value"]  # doctest: +SKIP
    (50304, 512)
  """
  try:
    tree = ocp.StandardCheckpointHandler().metadata(
        epath.Path(directory) / str(step) / "state").tree
  except Exception:  # pylint: disable=broad-except  # the restore itself reports (and classifies)
    return {}
  return {m.name: tuple(m.shape) for m in jax.tree.leaves(tree) if hasattr(m, "shape")}


def _dotted(path: tuple[Any, ...]) -> str:
  """A leaf's path as Orbax names it on disk: ``opt_state.1.0.mu.embed.embedding.value``."""
  return jax.tree_util.keystr(path, simple=True, separator=".")


def _holds_parameter_shape(name: str, saved: tuple[int, ...] | None,
                           target: tuple[int, ...]) -> bool:
  """Whether an optimizer-state leaf was saved in its parameter's own shape where it now takes
  that shape's ``matrix_view`` (OrthoAdam's moments of 3+-axis parameters, from the releases
  before they were kept as matrices; the same row-major coordinates)."""
  return (name.startswith("opt_state.") and saved is not None and len(saved) >= 3
          and matrix_view(saved) == tuple(target))


def _axis0_sharding(sharding: Any) -> Any:
  """``sharding`` (of a ``matrix_view``) kept on axis 0 only: valid for the saved shape too,
  whose axis 0 is the view's (the other axes are read whole, then resharded by the reshape)."""
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return sharding
  return NamedSharding(sharding.mesh, P(sharding.spec[0]))


def saved_layout_target(abstract_state: TrainState,
                        saved: Mapping[str, tuple[int, ...]]) -> TrainState:
  """``abstract_state`` with each leaf that ``saved`` holds in an older layout asked for in that
  layout: OrthoAdam moments saved in their parameter's shape (``_holds_parameter_shape``) are read
  as saved and reshaped by ``to_current_layout``. Every other leaf is asked for as it is, so a
  checkpoint of another model still does not fit.

  Example:
    >>> target = saved_layout_target(setup.abstract_state, saved_shapes(directory, 60))  # doctest: +SKIP
  """
  def leaf(path: tuple[Any, ...], a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    shape = saved.get(_dotted(path))
    if not _holds_parameter_shape(_dotted(path), shape, a.shape):
      return a
    return jax.ShapeDtypeStruct(shape, a.dtype,
                                sharding=_axis0_sharding(getattr(a, "sharding", None)))
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def to_current_layout(state: TrainState, abstract_state: TrainState,
                      step: int | None = None) -> TrainState:
  """``state`` (restored through ``saved_layout_target``) with every leaf reshaped to
  ``abstract_state``'s shape and placed in its sharding; a warning says how many were converted.

  Example:
    >>> state = to_current_layout(restored, setup.abstract_state, step=60)  # doctest: +SKIP
  """
  converted = []

  def leaf(path: tuple[Any, ...], x: jax.Array, a: jax.ShapeDtypeStruct) -> jax.Array:
    if x.shape == a.shape:
      return x
    converted.append(_dotted(path))
    return jax.jit(lambda v: v.reshape(a.shape), out_shardings=a.sharding)(x)
  state = jax.tree_util.tree_map_with_path(leaf, state, abstract_state)
  if converted:
    log.warning("Checkpoint step %s holds %d OrthoAdam moments in their parameter's own shape (an "
                "older release; e.g. %s): converted to the matrix [d0, d1*...*dn] that OrthoAdam "
                "now keeps (the same coordinates, reshaped row-major). The next save writes the "
                "new layout.", step, len(converted), converted[0])
  return state


def _move_aside(manager: ocp.CheckpointManager, damaged: list[int]) -> None:
  """Renames ``damaged`` steps and unfinalized step directories into ``rundir.DAMAGED_DIR``.

  Called on every process with the same ``damaged`` list (agreed by
  ``rundir.restore_newest_readable``). A step directory left in place blocks saving that step
  again (``StepAlreadyExistsError``), so a resumed run could not pass it; renaming keeps the files
  for inspection. Unfinalized step directories (a numeric name that ``all_steps`` does not list,
  e.g. no ``commit_success`` on object stores after a killed save) are moved too; Orbax's
  ``*.orbax-checkpoint-tmp-*`` directories are not steps and are left to
  ``cleanup_tmp_directories`` (``rundir.make_manager``). Process 0 alone lists and renames; the
  others wait at a barrier (every process reaches it, whatever it would have listed), then every
  process reloads the step list.

  Example:
    >>> _move_aside(manager, [60])  # doctest: +SKIP
  """
  if jax.process_index() == 0:
    _rename_into_damaged(epath.Path(manager.directory), set(manager.all_steps()), damaged)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("softmax_one_jax.checkpoint.move_aside")
  manager.reload()


def _rename_into_damaged(directory: epath.Path, finalized: set[int], damaged: list[int]) -> None:
  """Process 0's half of ``_move_aside``: ``damaged`` and unfinalized step directories renamed."""
  names = {str(s) for s in damaged}
  if directory.exists():
    names |= {p.name for p in directory.iterdir()
              if p.name.isdigit() and p.is_dir() and int(p.name) not in finalized}
  if not names:
    return
  target_dir = directory.parent / rundir.DAMAGED_DIR
  target_dir.mkdir(parents=True, exist_ok=True)
  # On an object store a folder exists only while an object lies under it, and a rename needs
  # its target's folder to exist: this note makes it (and says what the folder is).
  (target_dir / "README.txt").write_text(
      "Checkpoint steps that could not be restored, moved here by a training resume (never "
      "deleted). Inspect or delete them; training saved those steps again.\n")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
  for name in sorted(names, key=int):
    source, target = directory / name, target_dir / f"{name}-{stamp}"
    if not source.exists():
      continue
    source.rename(target)
    log.warning("Moved unreadable checkpoint step %s from %s to %s (kept, not deleted); training "
                "continues through that step and saves it again.", name, source, target)


__all__ = ["DataShardsHandler", "DataShardsRestore", "DataShardsSave", "data_files_to_read",
           "restore_latest", "save", "saved_layout_target", "saved_shapes", "shard_file",
           "to_current_layout"]
