# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Scale out: the paper grid on a TPU slice or a multi-GPU machine
#
# The mesh a run lays over its devices, the shardings the library derives for the parameters,
# `softmax-one compile` (a slice's program built and measured on a CPU host), the commands and
# the expected time of each run of the paper grid, and a short sharded training run.
#
# On a CPU runtime the same cells run with eight fake devices at a tiny size. Set
# `SOFTMAX_ONE_NOTEBOOK_SMALL=1` for the small setting (what CI runs).

# %%
# Colab only: install the package from the project's repository (REPO_URL). Does nothing elsewhere.
import sys

REPO_URL = "https://github.com/softmax-one-jax/softmax_one_jax"  # the project's repository
if "google.colab" in sys.modules:
  import subprocess
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "softmax_one_jax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "softmax_one_jax"],
                 check=True)
  sys.path.insert(0, "softmax_one_jax")

# %%
import os

# Eight fake CPU devices when there is no accelerator. The flag affects only the CPU backend, so
# it changes nothing on a GPU or TPU runtime; it must be set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import importlib.util
import json
import pathlib
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np

# The experiment configs live in the repository (experiments/configs); find its root.
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents,
                        pathlib.Path("softmax_one_jax").resolve()]
            if (p / "experiments" / "configs").is_dir())
sys.path.insert(0, str(ROOT))

from experiments.configs import gpt2, llama2, tiny
from softmax_one_jax.rundir import abstract_model, model_config_from, param_shardings
from softmax_one_jax.training import make_mesh

PLATFORM = jax.devices()[0].platform
SMALL = os.environ.get("SOFTMAX_ONE_NOTEBOOK_SMALL") == "1"
print(f"platform {PLATFORM}, {jax.device_count()} devices, small={SMALL}")

# %% [markdown]
# ## 1. The mesh
#
# Every run uses a `(data, fsdp, tensor)` mesh (`config.mesh.*`, one size may be -1: all the
# remaining devices). On eight devices, `(2, 2, 2)` puts two on each axis.

# %%
n = jax.device_count()
shape = (2, 2, 2) if n == 8 else (1, -1, 1)
mesh = make_mesh(*shape)
print("mesh:", dict(mesh.shape))
print(np.vectorize(lambda d: d.id)(mesh.devices))

# %% [markdown]
# ## 2. The shardings the library derives
#
# Each parameter carries logical axis names (`vocab`, `embed`, `heads`, `mlp`, ...); one table
# (`softmax_one_jax.sharding.LOGICAL_AXIS_RULES`) maps them to mesh axes, and a rule that does not
# divide a dimension replicates it. Here for the paper's GPT-2 60M cell, built abstractly (no
# weights are allocated), on the mesh above.

# %%
config = gpt2.get_config("60m,softmax1,orthoadam")
model_cfg = model_config_from(config, tokenizer_vocab_size=50257)
_, abstract_params, _ = abstract_model(model_cfg)
shardings = param_shardings(abstract_params, mesh)
leaves = jax.tree.leaves_with_path(abstract_params)
specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
print(f"{'parameter':<34} {'shape':<14} {'PartitionSpec':<28} per-device shard")
for (path, x), sharding in zip(leaves, specs):
  name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
  if "blocks" in name and ".0." not in name and not name.startswith("blocks.0"):
    continue  # one block shows them all
  print(f"{name:<34} {str(x.shape):<14} {str(sharding.spec):<28} {sharding.shard_shape(x.shape)}")

# %% [markdown]
# ## 3. `softmax-one compile`: will a cell fit a slice, and how fast will it run?
#
# `softmax-one compile` builds the run's real train and eval steps for a TPU slice on any host
# and prints per-chip memory against HBM, the collectives, the Pallas kernels and a roofline step
# time. It needs libtpu (`pip install -e ".[tpu-aot]"`). The same from Python is
# `softmax_one_jax.training.aot.compile_run(config, topology)`. A 60M cell takes about three
# minutes to compile on a 2-core CPU, so the small setting skips it.

# %%
COMMAND = ("softmax-one compile --config=experiments/configs/gpt2.py:60m,softmax1,orthoadam "
           "--topology=v5e:2x2")
print("$", COMMAND)
if importlib.util.find_spec("libtpu") is None:
  print('libtpu is not installed, so nothing is compiled here: pip install -e ".[tpu-aot]" '
        "brings it (the committed results below do not need it).")
elif SMALL:
  print("Small setting: the compile is skipped (minutes on a CPU); the committed results follow.")
else:
  from softmax_one_jax.training.aot import compile_run, format_report
  print(format_report(compile_run(gpt2.get_config("60m,softmax1,orthoadam"), "v5e:2x2")))

# %% [markdown]
# ## 4. The paper grid: commands and expected time per run
#
# `experiments/results/compile_grid/` holds `softmax-one compile`'s record of every cell on the
# slice its config names (`config.topology`). The expected time per run below is
# `num_train_steps` x the roofline step time: an estimate from XLA's cost analysis and the
# chip's peak rates, not a measurement (experiments/README.md says what it counts). The
# committed OrthoAdam cells were compiled when OrthoAdam implied `scalar_rmsnorm`; the commands
# below use each family's own norm.

# %%
GRID = ROOT / "experiments" / "results" / "compile_grid"
CONFIGS = {"gpt2": gpt2, "llama2": llama2}
rows = []
for path in sorted(GRID.glob("*.json")):
  rec = json.loads(path.read_text())
  family, size, variant = rec["name"].split("-", 2)
  cfg = CONFIGS[family].get_config(f"{size},{variant.replace('-', ',')}")
  hours = cfg.num_train_steps * rec["roofline"]["step_s"] / 3600
  rows.append((rec["name"], rec["topology"], cfg.num_train_steps, rec["roofline"]["step_s"],
               hours, f"{family}.py:{size},{variant.replace('-', ',')}"))
SIZES = ["60m", "130m", "350m", "1b", "7b"]
rows.sort(key=lambda r: (r[0].split("-")[0], SIZES.index(r[0].split("-")[1]), r[0]))
print(f"{'cell':<30} {'slice':<10} {'steps':>8} {'step ms':>8} {'hours':>7}")
for name, topo, steps, step_s, hours, _ in rows:
  print(f"{name:<30} {topo:<10} {steps:>8,} {1e3 * step_s:>8.0f} {hours:>7.1f}")
print("\nCommands (data first: softmax-one prepare --source c4 --output_dir data/c4):")
for name, *_, arg in rows[:4]:
  print(f"softmax-one train --config=experiments/configs/{arg} --workdir=runs/{name}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.5))
names = [r[0] for r in rows]
ax.barh(names, [r[4] for r in rows])
ax.set(xlabel="expected hours per run (roofline estimate)", xscale="log")
ax.invert_yaxis()  # the table's order, top to bottom
ax.tick_params(axis="y", labelsize=6)
plt.tight_layout()

# %% [markdown]
# ## 5. A sharded run, end to end
#
# The `tiny` config trained for a few steps on the mesh of section 1 (`--config.mesh.*` on the
# command line); `train` derives the parameter shardings as in section 2. The table at the end is
# the one `softmax-one train` prints. On the CPU mesh with `tensor=2`, XLA's SPMD partitioner
# warns that it fully rematerialises (replicates, then re-partitions) the token-embedding lookup;
# the run completes.

# %%
from softmax_one_jax.analysis import outlier_metrics, print_metrics_table
from softmax_one_jax.training import train

run_config = tiny.get_config("softmax1,orthoadam")
run_config.mesh.data, run_config.mesh.fsdp, run_config.mesh.tensor = shape
run_config.num_train_steps = 10 if SMALL else (100 if PLATFORM == "cpu" else 300)
run_config.optimizer.warmup_steps = run_config.num_train_steps // 2
run_config.eval_every_steps = run_config.outlier_every_steps = run_config.num_train_steps
run_config.checkpoint.every_steps = run_config.num_train_steps
workdir = pathlib.Path(tempfile.mkdtemp()) / "tiny-sharded"
print("$ softmax-one train --config=experiments/configs/tiny.py:softmax1,orthoadam "
      f"--workdir={workdir} --config.mesh.data={shape[0]} --config.mesh.fsdp={shape[1]} "
      f"--config.mesh.tensor={shape[2]} --config.num_train_steps={run_config.num_train_steps} "
      f"--config.optimizer.warmup_steps={run_config.optimizer.warmup_steps}")
summary = train(run_config, workdir, outlier_metrics=outlier_metrics, report=print_metrics_table)
print({k: v for k, v in summary.items() if k in ("step", "status", "loss", "val_ppl")})
