"""A run directory: its layout, its saved config, and its trained weights without any optimizer.

Training writes a run directory and analysis reads it; both import this module, neither imports
the other. It sits below both: it may import ``models``, ``data``, ``sharding``, ``errors`` and
Orbax, never ``training`` or ``analysis``. The train-state checkpoints (optimizer state, data
iterator, moving damaged steps aside) stay in ``softmax_one_jax.training.checkpoint``.

A workdir is any path ``etils.epath`` understands: a local folder or an object-store URI such as
``gs://bucket/run`` (``pip install -e ".[gcs]"``). Everything a run writes goes through
``workdir_path``: nothing is written to local disk for a bucket workdir.

Layout::

  workdir/config.json        the run's full, resolved config              (CONFIG_FILE)
  workdir/checkpoints/<step>/{state,data}/                                 (CHECKPOINT_DIR)
  workdir/checkpoints_damaged/<step>-<UTC time>/   unreadable steps a training resume moved aside
                                                                           (DAMAGED_DIR)
  workdir/metrics.jsonl      one JSON object per logged step              (METRICS_FILE)
  workdir/tensorboard/       event files                                  (TENSORBOARD_DIR)

Example:
  >>> model, config = load_model("runs/tiny")                       # doctest: +SKIP
  >>> logits_btv = model(tokens_bt)                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import AxisType, Mesh

from softmax_one_jax import checkpoint_reads
from softmax_one_jax.checkpoint_reads import ReadOutcome
from softmax_one_jax.errors import ConfigError, MissingFileError
from softmax_one_jax.models import Transformer, TransformerConfig
from softmax_one_jax.sharding import MESH_AXES, tree_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """``path`` is an object-store URI (``gs://bucket/run``, ``s3://...``), not a local path.

  Example:
    >>> is_remote("gs://bucket/run"), is_remote("runs/tiny")
    (True, False)
  """
  return "://" in os.fspath(path)


def workdir_path(workdir: PathLike) -> epath.Path:
  """The run directory as an ``epath.Path``: a local path made absolute (``~`` expanded), a URI
  kept as it is.

  Example:
    >>> workdir_path("gs://bucket/run")
    PosixGPath('gs://bucket/run')
  """
  if is_remote(workdir):
    return epath.Path(os.fspath(workdir))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))


# ---------------------------------------------------------------------------------------- config

def config_to_json(config: ml_collections.ConfigDict) -> str:
  """The full config as indented JSON (what ``workdir/config.json`` holds)."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of ``config_to_json``."""
  return ml_collections.ConfigDict(json.loads(text))


def write_config(workdir: PathLike, config: ml_collections.ConfigDict) -> None:
  """Writes ``workdir/config.json`` (process 0 only)."""
  if jax.process_index() == 0:
    path = workdir_path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config) + "\n")


def read_config(workdir: PathLike) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json``; a clear error when the run directory has none.

  Example:
    >>> read_config("runs/tiny").model.softmax                      # doctest: +SKIP
    'softmax1'
  """
  path = workdir_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingFileError(f"{path} not found: {workdir} is not a run directory written by "
                           "`softmax-one train --workdir=...`.")
  return config_from_json(path.read_text())


def padded_vocab_size(config: ml_collections.ConfigDict, tokenizer_vocab_size: int) -> int:
  """The model's vocabulary: ``config.model.vocab_size`` or the tokenizer's, rounded up.

  Example:
    >>> padded_vocab_size(cfg, 50257)    # cfg.model.vocab_size == 0, vocab_multiple == 128
    50304
  """
  if config.model.vocab_size:
    if config.model.vocab_size < tokenizer_vocab_size:
      raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer_vocab_size}); use 0 to follow it.")
    return int(config.model.vocab_size)
  m = int(config.model.get("vocab_multiple", 1) or 1)
  return -(-tokenizer_vocab_size // m) * m


def model_config_from(config: ml_collections.ConfigDict,
                      tokenizer_vocab_size: int) -> TransformerConfig:
  """Builds the ``TransformerConfig`` of a run.

  Args:
    config: the run config (``config.model`` holds TransformerConfig fields plus ``preset``,
      ``vocab_multiple``).
    tokenizer_vocab_size: the tokenizer's vocabulary size.

  Returns:
    ``softmax_one_jax.models.TransformerConfig``.

  Example:
    >>> model_config_from(read_config("runs/tiny"), 512).vocab_size  # doctest: +SKIP
    512
  """
  names = {f.name for f in dataclasses.fields(TransformerConfig)}
  fields = {k: v for k, v in config.model.to_dict().items() if k in names}
  fields["vocab_size"] = padded_vocab_size(config, tokenizer_vocab_size)
  return TransformerConfig(**fields)


# ----------------------------------------------------------------------------------------- model

def abstract_model(model_cfg: TransformerConfig) -> tuple[Any, nnx.State, nnx.State]:
  """``(graphdef, abstract params, abstract rest)`` of the Transformer, without allocating weights.

  Example:
    >>> graphdef, params, rest = abstract_model(model_config_from(config, 512))  # doctest: +SKIP
  """
  model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> Any:
  """Parameter shardings from the models' logical annotations through ``LOGICAL_AXIS_RULES``."""
  return tree_shardings(abstract_params, nnx.get_partition_spec(abstract_params), mesh)


# ------------------------------------------------------------------------------------ checkpoints

def make_manager(workdir: PathLike, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` on ``workdir/checkpoints`` (what is saved is the caller's choice).

  Args:
    workdir: the run directory.
    max_to_keep: newest steps kept on disk.
    async_save: write in a background thread after the device-to-host copy.
    read_only: open for reading only (evaluation, analysis).

  Example:
    >>> manager = make_manager("runs/tiny", read_only=True, async_save=False)  # doctest: +SKIP
  """
  # "read_only" opens without creating or cleaning anything (Orbax's own read_only flag only adds
  # a warning; nothing here saves through a reading manager).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=not read_only,
      cleanup_tmp_directories=not read_only)
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  return ocp.CheckpointManager(directory, options=options)


def restore_newest_readable(manager: ocp.CheckpointManager,
                            args: Callable[[int], ocp.args.Composite], step: int | None = None,
                            on_damaged: Callable[[list[int]], None] | None = None
                            ) -> tuple[Any, int] | None:
  """The newest step that every process reads (or ``step``), restored on every process.

  Every process reads each step, newest first, and all act on the worst of their outcomes
  (``softmax_one_jax.checkpoint_reads``), so all restore the same step: the newest one that every
  process read. A step that any process found corrupt, or whose intact files do not fit ``args``
  (another tree structure or shape), is skipped with a warning; a transient I/O error is retried
  and, when it persists, stops the restore; a ``UserError`` (e.g. a data item saved with another
  ``config.data_shards``) is raised as it is.

  Args:
    manager: from ``make_manager`` (its directory, and process 0's list of its steps).
    args: builds the restore arguments of a step (called with it, once per read).
    step: a specific step (no fallback), or None for the newest readable one.
    on_damaged: with ``step`` None, called on every process with the corrupt steps newer than
      the one restored (``[]`` when there were none, or when there is no checkpoint at all). A
      training resume moves them aside there and saves those steps again, so with it a newer
      step skipped as not fitting ``args`` is an error.

  Returns:
    ``(restored, step)``, or None when there is no checkpoint.

  Raises:
    TransientCheckpointError: a transient I/O error outlasted the retries (nothing is moved).
    UserError: a process refused the step (e.g. ``ConfigError``).
    RuntimeError: checkpoints exist but none could be read; or, with ``on_damaged``, a newer
      step is intact but does not fit ``args``.

  Example:
    >>> restored, step = restore_newest_readable(manager, args)     # doctest: +SKIP
  """
  manager.reload()
  steps = [step] if step is not None else checkpoint_reads.steps_of_process_0(manager.all_steps())
  skipped, damaged, misfits = [], [], []     # "step s: why" for the messages; corrupt; the others
  for s in steps:
    read = checkpoint_reads.read_step(manager.directory, s, args)
    # Every process reaches this collective once per step, whatever its own read gave.
    outcomes = checkpoint_reads.gather_outcomes(read.outcome)
    verdict = checkpoint_reads.agreed_outcome(outcomes)
    if verdict == ReadOutcome.OK:
      if skipped:
        log.warning("Resumed from step %d after skipping unreadable steps: %s", s,
                    "; ".join(skipped))
      if on_damaged is not None and step is None:
        if misfits:
          raise RuntimeError(
              f"Checkpoint step(s) {misfits} in {manager.directory} are intact but do not fit "
              f"this run ({'; '.join(skipped)}), and resuming from step {s} would save over "
              "them. Resume with the code and config that wrote them, or move them into "
              f"{DAMAGED_DIR}/ to resume from step {s}.")
        on_damaged(damaged)
      return read.restored, int(s)
    who = checkpoint_reads.processes_with(outcomes, verdict)
    mine = read.error if read.outcome == verdict else None     # None: another process's error
    if verdict == ReadOutcome.TRANSIENT:
      raise checkpoint_reads.transient_error(s, manager.directory, outcomes, mine)
    if verdict == ReadOutcome.REFUSED:
      raise mine or RuntimeError(f"Process(es) {who} refused checkpoint step {s} in "
                                 f"{manager.directory}; their error says what to change.")
    kind = "corrupt" if verdict == ReadOutcome.CORRUPT else "intact but does not fit"
    why = checkpoint_reads.describe(mine) if mine is not None else "see that process's log"
    log.warning("Checkpoint step %d in %s is %s on process(es) %s (%s); trying the previous step.",
                s, manager.directory, kind, who, why)
    skipped.append(f"step {s}: {kind} ({why})")
    (damaged if verdict == ReadOutcome.CORRUPT else misfits).append(int(s))
  if skipped:
    raise RuntimeError(f"No readable checkpoint in {manager.directory}: " + "; ".join(skipped) +
                       ". Move the directory away to start afresh, or pass an explicit step.")
  if on_damaged is not None and step is None:
    on_damaged([])
  return None


def restore_params(workdir: PathLike, abstract_params: Any,
                   step: int | None = None) -> tuple[Any, int] | None:
  """Only the parameters of a run's newest readable step (or ``step``): no optimizer is built.

  The optimizer state on disk is not read, so a checkpoint whose optimizer state no longer
  matches today's optimizer code still yields its weights. Unreadable steps fall back to older
  ones (``restore_newest_readable``). Opens its own read-only manager (Orbax binds one handler
  type per item and manager, and this read uses a partial one).

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

  def args(_: int) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))

  manager = make_manager(workdir, read_only=True, async_save=False)
  try:
    found = restore_newest_readable(manager, args, step)
  finally:
    manager.close()
  return None if found is None else (found[0]["state"]["params"], found[1])


def load_model(workdir: PathLike,
               step: int | None = None) -> tuple[Transformer, ml_collections.ConfigDict]:
  """The trained ``Transformer`` of a run (newest readable step, or ``step``) and its config.

  Args:
    workdir: a run directory (``config.json`` + ``checkpoints/``).
    step: a checkpoint step; None = newest readable.

  Returns:
    ``(model, config)``: an ``nnx`` Transformer with the restored parameters (placed on all
    devices, fsdp-sharded) and the run's full ``ml_collections`` config.

  Example:
    >>> model, config = load_model("runs/tiny")                     # doctest: +SKIP
    >>> logits_btv = model(tokens_bt)                               # doctest: +SKIP
  """
  config = read_config(workdir)
  model_cfg = model_config_from(config, config.model.vocab_size)
  # Every device on the fsdp axis, whatever mesh the run trained on: weights alone need no more.
  mesh = jax.make_mesh((1, jax.device_count(), 1), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))
  graphdef, abstract_params, abstract_rest = abstract_model(model_cfg)
  if jax.tree.leaves(abstract_rest):
    raise NotImplementedError("the model holds non-parameter state; load_model restores "
                              "parameters only.")
  target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        abstract_params, param_shardings(abstract_params, mesh))
  restored = restore_params(workdir, target, step)
  if restored is None:
    raise MissingFileError(f"No checkpoint in {workdir_path(workdir) / CHECKPOINT_DIR}.")
  params, _ = restored
  return nnx.merge(graphdef, params, abstract_rest), config


__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "DAMAGED_DIR", "METRICS_FILE", "TENSORBOARD_DIR",
           "abstract_model", "config_from_json", "config_to_json", "is_remote", "load_model",
           "make_manager", "model_config_from", "padded_vocab_size", "param_shardings",
           "read_config", "restore_newest_readable", "restore_params", "workdir_path",
           "write_config"]
