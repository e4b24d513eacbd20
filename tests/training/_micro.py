"""Shared helpers for the training tests: a micro run config and a micro model setup."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import ml_collections
import numpy as np

from experiments.configs.base import get_base_config, model_config


def micro_config(optimizer: str = "orthoadam", softmax: str = "softmax1", norm: str = "layernorm",
                 **top_level) -> ml_collections.ConfigDict:
  """The "tiny" recipe shrunk for tests: 1 layer, d_model 32, seq 32, BPE vocab 512.

  The norm is its own argument: the optimizer does not choose it.
  """
  c = get_base_config()
  c.name = "micro"
  c.seq_len = 32
  c.global_batch_size = 8
  c.num_train_steps = 8
  c.model = model_config("tiny", softmax=softmax, num_layers=1, d_model=32, num_heads=2,
                         mlp_dim=64, max_seq_len=32,
                         norm=norm)
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 512
  c.optimizer.name = optimizer
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.outlier_every_steps = 0
  c.eval_batches = 2
  c.eval_batch_size = 8
  c.outlier_batch_size = 4
  c.progress_bar = False
  for k, v in top_level.items():
    c[k] = v
  return c


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """A packed-looking batch: two documents per row, padding at the end of some rows."""
  inputs = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  cut = rng.integers(1, seq, batch)
  end = rng.integers(seq // 2, seq + 1, batch)
  t = np.arange(seq)[None]
  segment_ids = np.where(t < cut[:, None], 1, 2).astype(np.int32)
  segment_ids = np.where(t < end[:, None], segment_ids, 0).astype(np.int32)
  positions = np.where(segment_ids == 1, t, t - cut[:, None]).astype(np.int32)
  positions = np.where(segment_ids == 0, 0, positions).astype(np.int32)
  nxt_same = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1],
                             np.zeros((batch, 1), bool)], axis=1)
  weights = ((segment_ids > 0) & nxt_same).astype(np.float32)
  return {"inputs": inputs[:, :-1], "targets": inputs[:, 1:], "segment_ids": segment_ids,
          "positions": positions, "weights": weights}


def get_config(arg: str = "orthoadam") -> ml_collections.ConfigDict:
  """For ``softmax-one train --config=tests/training/_micro.py[:optimizer]`` in subprocess tests."""
  return micro_config(optimizer=arg)


REPO = pathlib.Path(__file__).resolve().parents[2]
MICRO = pathlib.Path(__file__).resolve()


def train_command(workdir: pathlib.Path, *overrides: str, config: str = f"{MICRO}:adamw") -> list[str]:
  return [sys.executable, "-m", "softmax_one_jax.cli", "train", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def cpu_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=path,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def losses(workdir: pathlib.Path) -> dict[int, float]:
  """Per-step training loss from metrics.jsonl (the last record of a step wins)."""
  out = {}
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:        # a line being written when we looked
      continue
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out
