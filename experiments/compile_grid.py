"""Compiles every cell of the paper grid for its TPU slice on this CPU host; writes the table.

Each cell is ``softmax-one compile --config=experiments/configs/FAMILY.py:SIZE,SOFTMAX,OPTIMIZER``
for the slice in ``config.topology`` (experiments/configs/paper.py), in its own process; its JSON
report lands in ``experiments/results/compile_grid/``. A cell whose JSON exists is not compiled
again, so an interrupted run continues where it stopped. Needs ``pip install -e ".[tpu-aot]"``.

Usage::

  python experiments/compile_grid.py                  # the whole grid (about 2 hours on 2 cores)
  python experiments/compile_grid.py --only=gpt2:60m  # some cells; --table rewrites the table only
"""

from __future__ import annotations

import argparse
import json
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


def compile_cell(family: str, size: str, softmax: str, optimizer: str) -> dict:
  name = f"{family}-{size}-{softmax}-{optimizer}"
  path = OUT / f"{name}.json"
  if path.exists():
    return json.loads(path.read_text())
  cmd = [sys.executable, "-m", "softmax_one_jax.cli", "compile",
         f"--config={ROOT}/experiments/configs/{family}.py:{size},{softmax},{optimizer}",
         f"--json={path}"]
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
          "per chip per step (x params) | OrthoAdam / AdamW collectives | Mosaic kernels | "
          "roofline step ms (bound) | MFU at the roofline (upper bound) | compile s |\n|" + "---|" * 11)
  by_name = {r["name"]: r for r in records}
  rows = [head]
  for r in records:
    if "error" in r:
      rows.append(f"| {r['name']} | FAILED: {' '.join(r['error'])} |" + " |" * 9)
      continue
    twin = by_name.get(r["name"].replace("orthoadam", "adamw"))
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
        f"{r['train']['kernels'].get('mosaic', 0)} | {rl['step_s'] * 1e3:,.0f} ({rl['bound']}) | "
        f"{mfu:.0%} | {r['train']['compile_s'] + r['eval']['compile_s']:.0f} |")
  return "\n".join(rows) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", help="cells to compile: family[:size],... e.g. gpt2:60m,llama2")
  parser.add_argument("--table", action="store_true", help="only rewrite table.md from the JSONs")
  args = parser.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  todo = cells(args.only)
  records = []
  for cell in tqdm(todo, unit="cell", disable=args.table):
    path = OUT / f"{'-'.join(cell)}.json"
    if args.table:
      if path.exists():
        records.append(json.loads(path.read_text()))
      continue
    records.append(compile_cell(*cell))
  records.sort(key=lambda r: ([f for f in SIZES].index(r["name"].split("-")[0]),
                             SIZES[r["name"].split("-")[0]].index(r["name"].split("-")[1]),
                             r["name"]))
  (OUT / "table.md").write_text(table(records))
  print(table(records))


if __name__ == "__main__":
  main()
