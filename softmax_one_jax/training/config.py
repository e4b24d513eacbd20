"""Run-configuration checks (the configs themselves live in experiments/configs).

``validate_config`` is called by the CLI and by ``train``/``evaluate`` before anything is built or
compiled; it names the offending field and the allowed values::

  ConfigError: config.optimizer.name='adam' is not allowed; choose one of 'adamw', 'orthoadam', 'sgd'.

The model's own invariants (its enumerated fields, positive sizes, head divisibility) are
``TransformerConfig``'s, checked once there; this module checks what belongs to a run (optimizer,
data, batch, schedule, mesh) and how the model fits the run (``seq_len`` against ``max_seq_len``).
The config's JSON form, the model config built from it and the padded vocabulary belong to the run
directory (``softmax_one_jax.rundir``), which analysis reads too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from softmax_one_jax.data import config as data_config
from softmax_one_jax.data import tokenizers
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.models.config import TransformerConfig
from softmax_one_jax.optim import rotations
from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training.data_iter import num_data_shards
from softmax_one_jax.training.mesh import resolve_hybrid_shape, resolve_mesh_shape
from softmax_one_jax.training.state import OPTIMIZER_NAMES

# Enumerated run fields: dotted path -> allowed values (from the package that owns each field).
# The model's enumerated fields (config.model.softmax, .norm, ...) are TransformerConfig's.
ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "optimizer.name": OPTIMIZER_NAMES,
    "optimizer.rotation": (None, *rotations.FAMILIES),
    "data.source": data_config.SOURCES,
    "data.tokenizer": tokenizers.TOKENIZERS,
}

_POSITIVE_INTS = ("seq_len", "global_batch_size", "grad_accum_steps", "num_train_steps",
                  "eval_batch_size", "outlier_batch_size", "checkpoint.max_to_keep",
                  "max_nonfinite_steps", "log_every_steps")
_NON_NEGATIVE_INTS = ("optimizer.warmup_steps", "optimizer.decay_steps", "eval_every_steps",
                      "eval_batches", "outlier_every_steps", "checkpoint.every_steps",
                      "model.vocab_size", "data_shards", "optimizer.seed",
                      "loss_chunk_logits")
_POSITIVE_NUMBERS = ("optimizer.learning_rate", "optimizer.eps")
_UNIT_INTERVAL = ("optimizer.b1", "optimizer.b2", "optimizer.end_lr_fraction", "optimizer.momentum")
_NON_NEGATIVE_NUMBERS = ("optimizer.weight_decay", "optimizer.grad_clip_norm")  # 0 disables
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig))


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      raise ConfigError(f"config.{path} is missing; start from experiments/configs/base.py.")
    node = node[part]
  return node


def _fmt(values: tuple[Any, ...]) -> str:
  return ", ".join(repr(v) for v in values)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float))


def _check_enums(config: ml_collections.ConfigDict) -> None:
  """Each enumerated run field holds one of its allowed values."""
  for path, allowed in ALLOWED_VALUES.items():
    value = _get(config, path)
    if value not in allowed:
      raise ConfigError(f"config.{path}={value!r} is not allowed; choose one of {_fmt(allowed)}.")
  if config.optimizer.get("shard_local", False):
    raise ConfigError(
        "config.optimizer.shard_local=True is gone: OrthoAdam's rotation no longer depends on "
        "the mesh (every axis mixes whole, on every mesh). A run saved with it holds "
        "block-diagonal rotations of its old mesh: start it again in a new --workdir, or drop "
        "the field from its config.json to restart from its parameters' config.")


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """Counts are integers in range, rates and coefficients numbers in range."""
  checks = ((_POSITIVE_INTS, lambda v: _is_int(v) and v > 0, "a positive integer"),
            (_NON_NEGATIVE_INTS, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
            (_POSITIVE_NUMBERS, lambda v: _is_number(v) and v > 0, "a number > 0"),
            (_UNIT_INTERVAL, lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
            (_NON_NEGATIVE_NUMBERS, lambda v: _is_number(v) and v >= 0,
             "a number >= 0 (0 disables it)"))
  for paths, ok, what in checks:
    for path in paths:
      value = _get(config, path)
      if not ok(value):
        raise ConfigError(f"config.{path}={value!r} must be {what}.")


def _check_model(config: ml_collections.ConfigDict) -> None:
  """``TransformerConfig``'s own checks, its messages naming the ``config.model.<field>`` to set.

  They name fields as ``field=value``; each such name becomes ``config.model.field``.
  """
  try:
    model_config_from(config, max(int(config.model.vocab_size), 1))
  except (TypeError, ValueError) as e:
    message = re.sub(rf"\b({'|'.join(_MODEL_FIELDS)})=", r"config.model.\1=", str(e))
    if "config.model." not in message:
      message = f"config.model is invalid: {message}"
    raise ConfigError(message) from e


def _check_batch_and_schedule(config: ml_collections.ConfigDict, process_count: int) -> None:
  """The sequence fits the model, warm-up fits the run, the batch splits as the run needs."""
  if config.seq_len > config.model.max_seq_len:
    raise ConfigError(f"config.seq_len={config.seq_len} exceeds config.model.max_seq_len="
                      f"{config.model.max_seq_len}; raise max_seq_len or shorten seq_len.")
  if config.optimizer.warmup_steps > config.num_train_steps:
    raise ConfigError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds "
                      f"config.num_train_steps={config.num_train_steps}.")
  if config.global_batch_size % config.grad_accum_steps:
    raise ConfigError(f"config.global_batch_size={config.global_batch_size} is not a multiple of "
                      f"config.grad_accum_steps={config.grad_accum_steps}.")
  if config.global_batch_size % process_count:
    raise ConfigError(f"config.global_batch_size={config.global_batch_size} is not a multiple of "
                      f"the process count {process_count}.")
  num_data_shards(config, process_count)


def _check_mesh(config: ml_collections.ConfigDict, num_devices: int | None,
                slices: int | None) -> None:
  """The mesh covers the devices (its data axis one factor per slice when several), and every
  microbatch splits over its data axes. Without a device count only the fields' forms are checked.

  A config without ``mesh.dcn_data`` (a run saved before it existed) means 0: one per slice.
  """
  dcn_data = config.mesh.get("dcn_data", 0)
  if not _is_int(dcn_data) or dcn_data < 0:
    raise ConfigError(f"config.mesh.dcn_data={dcn_data!r} must be an integer >= 0: 0 for the "
                      "number of slices, else that number.")
  if num_devices is None:
    return
  if slices is None:
    data, fsdp, _ = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                       num_devices)
  else:
    ici, dcn = resolve_hybrid_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                    dcn_data, num_devices, slices)
    data, fsdp = ici[0] * dcn[0], ici[1] * dcn[1]
  micro = config.global_batch_size // config.grad_accum_steps
  if micro % (data * fsdp):
    raise ConfigError(
        f"The microbatch of {micro} sequences (config.global_batch_size="
        f"{config.global_batch_size} / config.grad_accum_steps={config.grad_accum_steps}) is not "
        f"a multiple of mesh.data * mesh.fsdp = {data * fsdp}; change the batch or the mesh.")


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int = 1, num_slices: int | None = None) -> None:
  """Checks every field of a run config; raises ``ConfigError`` naming field and allowed values.

  Args:
    config: the run configuration (see experiments/configs/base.py).
    num_devices: global device count, to check the mesh and batch divisibility; None skips those.
    process_count: number of JAX processes (the global batch is split between them).
    num_slices: how many TPU slices the devices form (``mesh.num_slices``), to check
      ``mesh.dcn_data`` and the data axis across slices; None skips that (``make_mesh`` still
      checks that mesh.data splits over the slices when it lays the mesh).

  Raises:
    ConfigError: the first invalid field, with the allowed values and how to fix it.

  Example:
    >>> validate_config(cfg)           # silent when valid
  """
  _check_enums(config)
  _check_ranges(config)
  _check_model(config)
  _check_batch_and_schedule(config, process_count)
  data_config.check_data_config(config.data)
  _check_mesh(config, num_devices, num_slices)
