"""Config validation: every enumerated field fails early with its name and allowed values."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import gpt2, llama2, tiny
from softmax_one_jax.models import config as model_config
from softmax_one_jax.training.config import ALLOWED_VALUES, validate_config
from tests.training._micro import REPO, cpu_env

CONFIGS = REPO / "experiments" / "configs"


def _set(c, path, value):
  node = c
  parts = path.split(".")
  for p in parts[:-1]:
    node = node[p]
  with node.ignore_type():
    node[parts[-1]] = value


# The model's enumerated fields are checked by TransformerConfig; its messages use the run's terms.
MODEL_ENUMS = {"softmax": model_config.SOFTMAXES, "norm": model_config.NORMS,
               "position": model_config.POSITIONS, "mlp": model_config.MLPS,
               "dtype": model_config.DTYPES, "param_dtype": model_config.DTYPES,
               "attention_impl": model_config.ATTENTION_IMPLS}
ENUMS = {**ALLOWED_VALUES, **{f"model.{field}": values for field, values in MODEL_ENUMS.items()}}


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_each_enumerated_field_names_itself_and_the_allowed_values(path):
  c = tiny.get_config()
  _set(c, path, "no-such-value")
  with pytest.raises(ValueError) as e:
    validate_config(c)
  msg = str(e.value)
  assert f"config.{path}='no-such-value' is not allowed" in msg
  for allowed in ENUMS[path]:
    if allowed is not None:
      assert repr(allowed) in msg


@pytest.mark.parametrize("path,value,fragment", [
    ("num_train_steps", 0, "config.num_train_steps=0 must be a positive integer"),
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate=-1.0 must be a number > 0"),
    ("optimizer.b2", 1.5, "config.optimizer.b2=1.5 must be a number in [0, 1]"),
    ("grad_accum_steps", 3, "not a multiple of config.grad_accum_steps=3"),
    ("seq_len", 4096, "exceeds config.model.max_seq_len"),
    ("model.num_heads", 3, "not a multiple of config.model.num_heads=3"),
    ("model.num_layers", 0, "config.model.num_layers=0 must be a positive integer"),
    ("model.num_kv_heads", 3, "config.model.num_heads=4 is not a multiple of "
     "config.model.num_kv_heads=3"),
    ("data_shards", 3, "config.global_batch_size=16 is not a multiple of config.data_shards=3"),
])
def test_numeric_and_consistency_errors(path, value, fragment):
  c = tiny.get_config()
  _set(c, path, value)
  with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
    validate_config(c)


def test_batch_must_split_over_the_mesh():
  c = tiny.get_config()
  c.global_batch_size = 12
  with pytest.raises(ValueError, match="not a multiple of mesh.data \\* mesh.fsdp = 8"):
    validate_config(c, num_devices=8)
  c.mesh.fsdp, c.mesh.data = 2, 3
  with pytest.raises(ValueError, match="covers 6 devices but 8 are available"):
    validate_config(c, num_devices=8)


@pytest.mark.parametrize("module,sizes", [(gpt2, ("60m", "130m", "350m")),
                                          (llama2, ("60m", "130m", "350m", "1b", "7b"))])
def test_every_paper_grid_cell_is_valid(module, sizes):
  for size in sizes:
    for softmax in ("softmax", "softmax1"):
      for optimizer in ("adamw", "orthoadam"):
        c = module.get_config(f"{size},{softmax},{optimizer}")
        validate_config(c, num_devices=8)
        assert (c.seq_len, c.data.source) == (256, "c4")
        assert (c.model.softmax, c.optimizer.name) == (softmax, optimizer)
        # The family's own norm with either optimizer: the optimizer column changes one factor.
        assert c.model.norm == ("layernorm" if module is gpt2 else "rmsnorm")
        assert c.model.param_dtype == "float32" and c.model.dtype == "bfloat16"


@pytest.mark.parametrize("arg,fragment", [
    ("13m,softmax1,adamw", "size='13m' is not allowed; choose one of 60m, 130m, 350m"),
    ("60m,softmax2,adamw", "softmax='softmax2' is not allowed; choose one of softmax, softmax1"),
    ("60m,softmax1,sgd", "optimizer='sgd' is not allowed; choose one of adamw, orthoadam"),
    ("60m,softmax1,adamw,batchnorm", "norm='batchnorm' is not allowed; choose one of layernorm, "
     "rmsnorm, scalar_rmsnorm, scalar_layernorm"),
])
def test_grid_argument_errors(arg, fragment):
  with pytest.raises(ValueError, match=__import__("re").escape(fragment)):
    gpt2.get_config(arg)


def test_tiny_variants_cover_the_2x2_grid():
  names = {tiny.get_config(f"{s},{o}").name for s in ("softmax", "softmax1")
           for o in ("adamw", "orthoadam")}
  assert len(names) == 4


def test_command_line_overrides_reach_the_config():
  argv = ["prog", f"--config={CONFIGS / 'tiny.py'}:softmax,adamw",
          "--config.optimizer.learning_rate=3e-4", "--config.model.num_layers=2"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert (c.optimizer.learning_rate, c.model.num_layers) == (3e-4, 2)
  assert (c.model.softmax, c.optimizer.name) == ("softmax", "adamw")


def test_cli_rejects_an_invalid_value_before_compiling(tmp_path: pathlib.Path):
  cmd = [sys.executable, "-m", "softmax_one_jax.cli", "train", "--config=tiny",
         f"--workdir={tmp_path}", "--config.model.softmax=softmax2"]
  r = subprocess.run(cmd, env=cpu_env(1), capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "config.model.softmax='softmax2' is not allowed; expected one of" in r.stderr
  assert not (tmp_path / "checkpoints").exists()
