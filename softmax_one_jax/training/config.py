"""Run-configuration checks (the configs themselves live in experiments/configs).

``validate_config`` is called by the CLI and by ``train``/``evaluate`` before anything is built or
compiled; it names the offending field and the allowed values::

  ConfigError: config.model.softmax='softmax2' is not allowed; choose one of 'softmax', 'softmax1'.

The config's JSON form, the model config built from it and the padded vocabulary belong to the run
directory (``softmax_one_jax.rundir``), which analysis reads too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from softmax_one_jax.data import config as data_config
from softmax_one_jax.data import tokenizers
from softmax_one_jax.errors import ConfigError
from softmax_one_jax.models import config as model_config
from softmax_one_jax.optim import rotations
from softmax_one_jax.rundir import model_config_from
from softmax_one_jax.training.data_iter import num_data_shards
from softmax_one_jax.training.mesh import resolve_mesh_shape
from softmax_one_jax.training.state import OPTIMIZER_NAMES

# Enumerated fields: dotted path -> allowed values (from the package that owns each field).
ALLOWED_VALUES: dict[str, tuple[Any, ...]] = {
    "model.softmax": model_config.SOFTMAXES,
    "model.norm": model_config.NORMS,
    "model.position": model_config.POSITIONS,
    "model.mlp": model_config.MLPS,
    "model.dtype": model_config.DTYPES,
    "model.param_dtype": model_config.DTYPES,
    "model.attention_impl": model_config.ATTENTION_IMPLS,
    "optimizer.name": OPTIMIZER_NAMES,
    "optimizer.rotation": (None, *rotations.FAMILIES),
    "data.source": data_config.SOURCES,
    "data.tokenizer": tokenizers.TOKENIZERS,
}

_POSITIVE_INTS = ("seq_len", "global_batch_size", "grad_accum_steps", "num_train_steps",
                  "model.num_layers", "model.d_model", "model.num_heads", "eval_batch_size",
                  "outlier_batch_size", "checkpoint.max_to_keep", "max_nonfinite_steps",
                  "log_every_steps")
_NON_NEGATIVE_INTS = ("optimizer.warmup_steps", "optimizer.decay_steps", "eval_every_steps",
                      "eval_batches", "outlier_every_steps", "checkpoint.every_steps",
                      "model.vocab_size", "data_shards", "optimizer.seed")


# Fields newer than some saved runs' config.json, and their defaults.
_OPTIONAL_FIELDS: dict[str, Any] = {"optimizer.seed": 0, "optimizer.rotation": None,
                                    "optimizer.shard_local": True, "data_shards": 0,
                                    "topology": None, "optimizer.momentum": 0.9}


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      if path in _OPTIONAL_FIELDS:
        return _OPTIONAL_FIELDS[path]
      raise ConfigError(f"config.{path} is missing; start from experiments/configs/base.py.")
    node = node[part]
  return node


def _fmt(values: tuple[Any, ...]) -> str:
  return ", ".join(repr(v) for v in values)


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None,
                    process_count: int = 1) -> None:
  """Checks every enumerated and numeric field; raises ``ConfigError`` naming field and allowed values.

  Args:
    config: the run configuration (see experiments/configs/base.py).
    num_devices: global device count, to check the mesh and batch divisibility; None skips those.
    process_count: number of JAX processes (the global batch is split between them).

  Raises:
    ConfigError: the first invalid field, with the allowed values and how to fix it.

  Example:
    >>> validate_config(cfg)           # silent when valid
  """
  for path, allowed in ALLOWED_VALUES.items():
    value = _get(config, path)
    if value not in allowed:
      raise ConfigError(f"config.{path}={value!r} is not allowed; choose one of {_fmt(allowed)}.")
  for path in _POSITIVE_INTS:
    value = _get(config, path)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"config.{path}={value!r} must be a positive integer.")
  for path in _NON_NEGATIVE_INTS:
    value = _get(config, path)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"config.{path}={value!r} must be an integer >= 0.")
  for path in ("optimizer.learning_rate", "optimizer.eps"):
    value = _get(config, path)
    if not isinstance(value, (int, float)) or not value > 0:
      raise ConfigError(f"config.{path}={value!r} must be a number > 0.")
  for path in ("optimizer.b1", "optimizer.b2", "optimizer.end_lr_fraction", "optimizer.momentum"):
    value = _get(config, path)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ConfigError(f"config.{path}={value!r} must be a number in [0, 1].")
  for path in ("optimizer.weight_decay", "optimizer.grad_clip_norm"):
    value = _get(config, path)
    if not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f"config.{path}={value!r} must be a number >= 0 (0 disables it).")
  if not isinstance(_get(config, "optimizer.shard_local"), bool):
    raise ConfigError(f"config.optimizer.shard_local={_get(config, 'optimizer.shard_local')!r} "
                      "must be True or False.")
  if config.model.d_model % config.model.num_heads:
    raise ConfigError(f"config.model.d_model={config.model.d_model} is not a multiple of "
                      f"config.model.num_heads={config.model.num_heads}.")
  kv = config.model.get("num_kv_heads")
  if kv is not None and (kv <= 0 or config.model.num_heads % kv):
    raise ConfigError(f"config.model.num_heads={config.model.num_heads} is not a multiple of "
                      f"config.model.num_kv_heads={kv}.")
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
  data_config.check_data_config(config.data)
  try:  # the model's own checks (e.g. an even head_dim for RoPE), before any tokenizer or compile
    model_config_from(config, max(int(config.model.vocab_size), 1))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model is invalid: {e}") from e
  num_data_shards(config, process_count)
  if num_devices is not None:
    data, fsdp, _ = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                       num_devices)
    micro = config.global_batch_size // config.grad_accum_steps
    if micro % (data * fsdp):
      raise ConfigError(
          f"The microbatch of {micro} sequences (config.global_batch_size="
          f"{config.global_batch_size} / config.grad_accum_steps={config.grad_accum_steps}) is not "
          f"a multiple of mesh.data * mesh.fsdp = {data * fsdp}; change the batch or the mesh.")
