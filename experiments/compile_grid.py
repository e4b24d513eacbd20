"""Compiles every cell of the paper grid for its TPU slice on this CPU host; writes the table.

Each cell is ``softmax-one compile --config=experiments/configs/FAMILY.py:SIZE,SOFTMAX,OPTIMIZER``
for the slice in ``config.topology`` (experiments/configs/paper.py), in its own process; its JSON
report lands in ``experiments/results/compile_grid/``. A cell whose JSON exists is not compiled
again, so an interrupted run continues where it stopped. Needs ``pip install -e ".[tpu-aot]"``.

With ``--gpu=h100:8`` the cells are compiled for that NVIDIA node instead (``CELL-h100x8.json``),
by the python in ``$SOFTMAX_ONE_CUDA_PYTHON`` if set: one whose jax finds cuDNN (``pip install
"jax-cuda12-plugin[with-cuda]==<jax version>"`` in a venv of its own), so that attention is
cuDNN's as on a real node.

Usage::

  python experiments/compile_grid.py                  # the whole grid (about 2 hours on 2 cores)
  python experiments/compile_grid.py --only=gpt2:60m  # some cells; --table rewrites the table only
  python experiments/compile_grid.py --only=gpt2:60m,llama2:350m --gpu=h100:8
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from tqdm import tqdm

from softmax_one_jax.training.aot import step_roofline
from softmax_one_jax.training.chips import CHIPS

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "compile_grid"
SIZES = {"gpt2": ("60m", "130m", "350m"), "llama2": ("60m", "130m", "350m", "1b", "7b")}
# The softmax-1 pair of every size first (the optimizer is what changes the communication), then
# plain softmax, whose program differs only in the splash kernel's sink constant.
VARIANTS = [("softmax1", "adamw"), ("softmax1", "orthoadam"), ("softmax", "adamw"),
            ("softmax", "orthoadam")]


def cells(only: str | None) -> list[tuple[str, str, str, str]]:
  out = [(f, size, s, o) for s, o in VARIANTS[:2] for f, sizes in SIZES.items() for size in sizes]
  out += [(f, size, s, o) for s, o in VARIANTS[2:] for f, sizes in SIZES.items() for size in sizes]
  if only:
    keep = [k.split(":") for k in only.split(",")]
    out = [c for c in out if any(c[0] == k[0] and (len(k) == 1 or c[1] == k[1]) for k in keep)]
  return out


def cell_name(family: str, size: str, softmax: str, optimizer: str, gpu: str | None) -> str:
  """``gpt2-60m-softmax1-adamw``; ``...-h100x8`` for a GPU node ``h100:8``."""
  suffix = "" if gpu is None else "-" + gpu.replace(":", "x")
  return f"{family}-{size}-{softmax}-{optimizer}{suffix}"


def compile_cell(family: str, size: str, softmax: str, optimizer: str,
                 gpu: str | None = None) -> dict:
  name = cell_name(family, size, softmax, optimizer, gpu)
  path = OUT / f"{name}.json"
  if path.exists():
    return json.loads(path.read_text())
  python = os.environ.get("SOFTMAX_ONE_CUDA_PYTHON", sys.executable) if gpu else sys.executable
  cmd = [python, "-m", "softmax_one_jax.cli", "compile",
         f"--config={ROOT}/experiments/configs/{family}.py:{size},{softmax},{optimizer}",
         f"--json={path}", *([f"--topology={gpu}"] if gpu else [])]
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    (OUT / f"{name}.err").write_text(proc.stdout + proc.stderr)
    return {"name": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": time.time() - t0}
  (OUT / f"{name}.md").write_text(proc.stdout.split("\n\n(written to")[0] + "\n")
  return json.loads(path.read_text())


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def table(records: list[dict]) -> str:
  head = ("| cell | slice | params | peak / HBM GiB per chip | fits (headroom) | collectives GiB "
          "per chip per step (x params) | OrthoAdam / AdamW collectives | kernels: Mosaic / cuDNN | "
          "roofline step ms (bound) | MFU at the roofline (upper bound) | compile s |\n|" + "---|" * 11)
  # A cell is its config's name on its slice (a GPU row shares its name with the TPU row).
  by_cell = {(r["name"], r.get("topology")): r for r in records}
  rows = [head]
  for r in records:
    if "error" in r:
      rows.append(f"| {r['name']} | FAILED: {' '.join(r['error'])} |" + " |" * 9)
      continue
    twin = by_cell.get((r["name"].replace("orthoadam", "adamw"), r.get("topology")))
    ratio = (f"{r['train']['collective_bytes'] / twin['train']['collective_bytes']:.3f}"
             if "orthoadam" in r["name"] and twin and "error" not in twin else "")
    # Recomputed from the record, so every row follows aot.step_roofline's rule.
    chip = next(c for c in CHIPS.values() if c.name == r["chip"])
    rl = step_roofline(r["roofline"]["compute_s"] * chip.peak_flops, r["model_flops"],
                       r["roofline"]["memory_s"] * chip.hbm_bandwidth,
                       r["train"]["collective_bytes"], chip)._asdict()
    mfu = r["model_flops"] / (rl["step_s"] * chip.peak_flops)
    rows.append(
        f"| {r['name']} | {r['topology']} | {r['num_params'] / 1e6:,.0f} M | "
        f"{_gib(r['peak_bytes'])} / {_gib(r['hbm_bytes'])} | "
        f"{'yes' if r['fits'] else 'NO'} ({1 - r['peak_bytes'] / r['hbm_bytes']:.0%}) | "
        f"{_gib(r['train']['collective_bytes'])} ({r['collective_ratio']:.2f}x) | {ratio} | "
        f"{r['train']['kernels'].get('mosaic', 0)} / {r['train']['kernels'].get('cudnn', 0)} | "
        f"{rl['step_s'] * 1e3:,.0f} ({rl['bound']}) | "
        f"{mfu:.0%} | {r['train']['compile_s'] + r['eval']['compile_s']:.0f} |")
  return "\n".join(rows) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", help="cells to compile: family[:size],... e.g. gpt2:60m,llama2")
  parser.add_argument("--table", action="store_true", help="only rewrite table.md from the JSONs")
  parser.add_argument("--gpu", help="compile for this NVIDIA node instead, e.g. h100:8")
  args = parser.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  failed = []
  if not args.table:
    for cell in tqdm(cells(args.only), unit="cell"):
      record = compile_cell(*cell, gpu=args.gpu)
      failed += [record] if "error" in record else []
  # The table holds every cell compiled so far (TPU slices and GPU nodes) and this run's failures.
  records = [json.loads(p.read_text()) for p in OUT.glob("*.json")] + failed
  records.sort(key=lambda r: ([f for f in SIZES].index(r["name"].split("-")[0]),
                             SIZES[r["name"].split("-")[0]].index(r["name"].split("-")[1]),
                             r["name"]))
  (OUT / "table.md").write_text(table(records))
  print(table(records))


if __name__ == "__main__":
  main()
