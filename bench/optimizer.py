"""OrthoAdam rotation families vs optax.adamw: update time, train-step time, state bytes.

Times (medians over interleaved repetitions, side by side in one process, ratios to AdamW):
  update: jit(tx.update + optax.apply_updates) on fixed gradients;
  step:   jit(forward + cross-entropy + grad + tx.update + apply_updates) of the Transformer.
State bytes: jax.eval_shape(tx.init, abstract params) for every preset (no weights built).

Usage:
  python bench/optimizer.py                       # tiny + gpt2-60m timings, all presets' bytes
  python bench/optimizer.py --time_presets tiny --reps 7 --batch 8 --seq 128
  python bench/optimizer.py --no_host_allocator   # glibc's default malloc, for comparison

The train step's batch defaults to the tiny experiment's (experiments/configs/tiny.py: 16 x 128),
the step the issue's "<= 1.05x AdamW at tiny" is about.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


from experiments.configs import tiny as tiny_config  # noqa: E402
from softmax_one_jax.models import PRESET_NAMES, Transformer, preset  # noqa: E402
from softmax_one_jax.optim import DEFAULT_ROTATION, Block, Dense, Kronecker, orthoadam  # noqa: E402
from softmax_one_jax.runtime import apply_cpu_workarounds, configure_host_allocator  # noqa: E402

FAMILIES = ("hadamard", "kronecker", "block", "dense", "identity")
MAX_STATE_BYTES_TO_TIME = 4 * 2**30  # Skip timing a family whose state would not fit comfortably.
MAX_HAAR_DIM_TO_TIME = 1024  # jnp.linalg.qr of a 4096^2 Gaussian takes minutes on a small CPU.


def _family_spec(name: str, unlimited: bool = False) -> Any:
  if name == "kronecker":
    return Kronecker(max_dim=None) if unlimited else "kronecker"
  if name == "block":
    return Block(size=64)
  if name == "dense":
    return Dense(max_size=2**62) if unlimited else "dense"
  return name


def make_tx(name: str, unlimited: bool = False) -> optax.GradientTransformation:
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=0.1)
  return orthoadam(1e-3, weight_decay=0.1, rotation=_family_spec(name, unlimited))


def abstract_params(cfg) -> Any:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def state_bytes(name: str, params: Any) -> int:
  """Optimizer-state bytes; dense is n^2 per parameter, counted analytically (too big to trace)."""
  if name == "dense":
    adam = state_bytes("adamw", params)
    return adam + sum(4 * x.size**2 for x in jax.tree.leaves(params))
  state = jax.eval_shape(make_tx(name, unlimited=True).init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _median_times(fns: dict[str, Callable[[], Any]], reps: int, inner: int) -> dict[str, float]:
  """Interleaved timing: each repetition runs every function ``inner`` times; medians per call."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(inner):
        out = fn()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / inner)
  return {k: statistics.median(v) for k, v in times.items()}


def time_preset(name: str, families: tuple[str, ...], batch: int, seq: int, reps: int,
                inner: int) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
  cfg = preset(name)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens_bt = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
  grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(2), p.shape, p.dtype),
                       params)

  def loss_fn(p, tokens_bt):
    logits_btv = nnx.merge(graphdef, p, rest)(tokens_bt[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:]).mean()

  upd_fns, step_fns, skipped = {}, {}, {}
  for fam in ("adamw",) + families:
    if fam == "kronecker":
      longest = max(max(x.shape, default=1) for x in jax.tree.leaves(params))
      if longest > MAX_HAAR_DIM_TO_TIME:
        skipped[fam] = f"init needs a {longest}^2 Haar QR: minutes on CPU"
        continue
    if fam == "dense":
      largest = max(x.size for x in jax.tree.leaves(params))
      if largest > Dense().max_size:
        skipped[fam] = f"refused: a {largest}-element param > Dense().max_size"
        continue
    if fam != "adamw":
      nbytes = state_bytes(fam, params)
      if fam == "dense" or nbytes > MAX_STATE_BYTES_TO_TIME:
        try:
          jax.eval_shape(make_tx(fam).init, params)
        except ValueError as e:
          skipped[fam] = "refused: " + str(e).split(" above ")[0].split(" has an axis")[0][-60:]
          continue
        if nbytes > MAX_STATE_BYTES_TO_TIME:
          skipped[fam] = f"state {nbytes / 2**30:.1f} GiB"
          continue
    tx = make_tx(fam)
    t0 = time.perf_counter()
    opt_state = jax.block_until_ready(jax.jit(tx.init)(params))
    print(f"  {name} {fam}: init (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)

    @jax.jit
    def update(g, s, p, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    @jax.jit
    def step(p, s, tokens_bt, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(p, tokens_bt)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    jax.block_until_ready(update(grads, opt_state, params))  # Compile + warm up.
    jax.block_until_ready(step(params, opt_state, tokens_bt))
    upd_fns[fam] = lambda update=update, s=opt_state: update(grads, s, params)
    step_fns[fam] = lambda step=step, s=opt_state: step(params, s, tokens_bt)
  upd = _median_times(upd_fns, reps, inner)
  stp = _median_times(step_fns, reps, inner)
  return upd, stp, skipped


def machine() -> str:
  cpu = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
  devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return (f"{nproc} CPUs ({cpu}); jax {jax.__version__} on {jax.default_backend()} "
          f"[{devices}]; python {platform.python_version()}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--time_presets", default="tiny,gpt2-60m")
  ap.add_argument("--bytes_presets", default=",".join(PRESET_NAMES))
  ap.add_argument("--families", default=",".join(FAMILIES))
  tiny = tiny_config.get_config()
  ap.add_argument("--batch", type=int, default=tiny.global_batch_size)
  ap.add_argument("--seq", type=int, default=tiny.seq_len)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--inner", type=int, default=3)
  ap.add_argument("--no_host_allocator", action="store_true",
                  help="leave glibc's malloc at its defaults (for comparison)")
  args = ap.parse_args()
  families = tuple(f for f in args.families.split(",") if f)
  # Haar families' inits can deadlock jax 0.10's CPU runtime; the workaround slows the step, so
  # time "hadamard" against AdamW in a run without Haar families (--families hadamard,identity).
  workaround = apply_cpu_workarounds(families)
  # Before jax starts its CPU threads; as `softmax-one train` and bench/train.py do (without it
  # every update's fresh buffers page-fault).
  allocator = not args.no_host_allocator and configure_host_allocator()
  print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  print(f"machine: {machine()}")
  print(f"default rotation: {DEFAULT_ROTATION}; batch {args.batch} x seq {args.seq}; "
        f"medians of {args.reps} interleaved reps x {args.inner} calls"
        + ("; XLA_FLAGS has the jax 0.10 CPU deadlock workaround (slower steps)" if workaround
           else "") + f"; glibc malloc keeps freed memory: {allocator}\n")

  for name in filter(None, args.time_presets.split(",")):
    upd, stp, skipped = time_preset(name, families, args.batch, args.seq, args.reps, args.inner)
    print(f"### time, preset {name!r} (ratio to optax.adamw; adamw update "
          f"{1e3 * upd['adamw']:.2f} ms, step {1e3 * stp['adamw']:.1f} ms)\n")
    print("| rotation | update ms | update / adamw | train step ms | step / adamw |")
    print("|---|---|---|---|---|")
    for fam in families:
      if fam in skipped:
        print(f"| {fam} | - | n/a ({skipped[fam]}) | - | n/a |")
        continue
      print(f"| {fam} | {1e3 * upd[fam]:.2f} | {upd[fam] / upd['adamw']:.2f}x | "
            f"{1e3 * stp[fam]:.1f} | {stp[fam] / stp['adamw']:.3f}x |")
    print()

  print("### optimizer-state bytes (ratio to optax.adamw; float32 params; eval_shape)\n")
  print("| preset | params | adamw GiB | " + " | ".join(families) + " |")
  print("|---|---|---|" + "---|" * len(families))
  for name in filter(None, args.bytes_presets.split(",")):
    params = abstract_params(preset(name))
    n = sum(x.size for x in jax.tree.leaves(params))
    adam = state_bytes("adamw", params)
    cells = []
    for fam in families:
      ratio = state_bytes(fam, params) / adam
      cells.append(f"{ratio:.4f}x" if ratio < 100 else f"{ratio:.3g}x")
    print(f"| {name} | {n / 1e6:.1f}M | {adam / 2**30:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
