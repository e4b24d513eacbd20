"""Attention benchmarks: softmax-1 must cost nothing.

Modes:
  --mode cpu (default)  XLA softmax-1 vs XLA softmax (same code path) and jax.nn's XLA softmax,
                        forward and forward+backward, float32; prints times and ratios.
  --mode gpu            on a GPU: correctness of the Pallas kernel against the float32 reference
                        first, then forward and forward+backward times / TFLOP/s of the Pallas
                        softmax-1 kernel, the same kernel with softmax, XLA softmax-1 and
                        jax.nn.dot_product_attention(implementation="cudnn") (standard softmax)
                        for bf16, causal, head_dim 128, seq 1024/4096/16384.
  --mode gpu --cpu-smoke  the gpu mode's code at tiny shapes on CPU (Pallas interpreter; cuDNN
                        replaced by jax.nn's XLA path): checks the script, measures nothing.
  --tune                with --mode gpu: also sweep a few Pallas block sizes at seq 4096.

Usage:
  python bench/attention.py                      # CPU figures for bench/RESULTS.md
  bash bench/gpu_check.sh                        # on a GPU machine
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from softmax_one_jax.attention import pallas_gpu, reference_attention  # noqa: E402


def time_fn(fn, *args, reps: int = 5, warmup: int = 1) -> float:
  """Median wall time in seconds of ``fn(*args)`` (compiled first, results blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def fwd_bwd(attn):
  """jit of ``grad(sum(attn(q, k, v)))`` wrt q, k, v: one forward plus one backward."""
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def machine() -> str:
  dev = jax.devices()[0]
  return (f"{platform.node()} | {dev.platform}:{dev.device_kind} | nproc={os.cpu_count()} | "
          f"jax {jax.__version__}")


# ---------------------------------------------------------------------------------- CPU mode


def interleaved_times(fns: dict, args, reps: int) -> dict[str, tuple[float, float]]:
  """``{name: (min, median)}`` seconds, the callables timed in turn each round.

  Taking turns spreads drift from other processes on a shared machine evenly over all of them;
  the minimum is the least disturbed run.
  """
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  samples = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - t0)
  return {name: (min(x), statistics.median(x)) for name, x in samples.items()}


def cpu_mode(reps: int) -> None:
  print(f"# {machine()}")
  print("Times in ms, min (median) of interleaved runs; ratio = softmax-1 min / softmax min.")
  print()
  print("| shape B,T,N,H | causal | pass | XLA softmax-1 | XLA softmax | ratio s1/s | "
        "jax.nn XLA softmax |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for b, t, n, h in [(4, 256, 8, 64), (2, 1024, 8, 64), (1, 2048, 8, 128)]:
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(3))
    for causal in (False, True):
      impls = {
          "s1": functools.partial(reference_attention, softmax="softmax1", is_causal=causal),
          "s": functools.partial(reference_attention, softmax="softmax", is_causal=causal),
          "nn": functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                  implementation="xla"),
      }
      for name, wrap in (("fwd", jax.jit), ("fwd+bwd", fwd_bwd)):
        ts = interleaved_times({key: wrap(fn) for key, fn in impls.items()}, (q, k, v), reps)
        cell = {key: f"{1e3 * lo:.2f} ({1e3 * med:.2f})" for key, (lo, med) in ts.items()}
        print(f"| {b},{t},{n},{h} | {causal} | {name} | {cell['s1']} | {cell['s']} | "
              f"{ts['s1'][0] / ts['s'][0]:.3f} | {cell['nn']} |", flush=True)


# ---------------------------------------------------------------------------------- GPU mode


def attention_flops(b, t, n, h, causal, with_bwd) -> float:
  """Matmul FLOPs: forward 4*B*N*T*S*H (halved when causal); backward 2.5x the forward."""
  f = 4.0 * b * n * t * t * h * (0.5 if causal else 1.0)
  return f * 3.5 if with_bwd else f


def check_correctness(smoke: bool) -> bool:
  """Pallas kernel (bf16 and f32) vs the float32 XLA reference; returns True if all pass."""
  rng = np.random.default_rng(1)
  ok = True
  b, t, n, kh, h = (1, 45, 4, 2, 64) if smoke else (2, 1000, 8, 2, 128)
  print("## correctness: Pallas kernel vs float32 XLA reference (max |error|)")
  print("| dtype | softmax | causal | segments | out | dq | dk | dv | xla-bf16 worst | ok |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for dtype in (jnp.bfloat16, jnp.float32):
    for softmax, causal, seg in (("softmax1", True, False), ("softmax", True, True),
                                 ("softmax1", False, True)):
      q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
      k, v = (jnp.asarray(rng.standard_normal((b, t, kh, h)), dtype) for _ in range(2))
      ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), 1), jnp.int32) if seg else None
      opts = dict(softmax=softmax, is_causal=causal, segment_ids=ids)
      kernel = functools.partial(pallas_gpu.flash_attention, interpret=smoke, **opts)
      ref = functools.partial(reference_attention, **opts)
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      with jax.default_matmul_precision("highest"):  # no TF32 in the reference
        want = [jax.jit(ref)(*f32), *fwd_bwd(ref)(*f32)]
      try:
        got = [jax.jit(kernel)(q, k, v), *fwd_bwd(kernel)(q, k, v)]
      except Exception as e:  # noqa: BLE001 (e.g. Triton out of shared memory): report, go on
        print(f"| {jnp.dtype(dtype).name} | {softmax} | {causal} | {seg} | ERROR "
              f"{type(e).__name__}: {str(e)[:200]} | | | | | FAIL |", flush=True)
        ok = False
        continue
      errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) for g, w in zip(got, want)]
      scale = max(1.0, max(float(jnp.max(jnp.abs(w))) for w in want))
      if dtype == jnp.bfloat16:  # the XLA path in bf16 sets what bf16 rounding costs
        xla = [jax.jit(ref)(q, k, v), *fwd_bwd(ref)(q, k, v)]
        base = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - w))) for x, w in zip(xla, want))
        good = max(errs) <= 2 * base + 2e-3 * scale
      else:
        base = float("nan")
        good = max(errs) <= 1e-4 * scale  # TF32 is off in the kernel and the reference
      ok &= good
      cells = " | ".join(f"{e:.2e}" for e in errs)
      print(f"| {jnp.dtype(dtype).name} | {softmax} | {causal} | {seg} | {cells} | {base:.2e} | "
            f"{'PASS' if good else 'FAIL'} |", flush=True)
  return ok


def gpu_table(smoke: bool, reps: int) -> None:
  heads, h = (2, 64) if smoke else (16, 128)
  seqs = (32, 64) if smoke else (1024, 4096, 16384)
  tokens = 64 if smoke else 16384  # batch * seq held fixed
  interp = dict(interpret=True) if smoke else {}
  cudnn = "xla" if smoke else "cudnn"
  impls = {
      "pallas softmax-1": functools.partial(pallas_gpu.flash_attention, softmax="softmax1",
                                            is_causal=True, **interp),
      "pallas softmax": functools.partial(pallas_gpu.flash_attention, softmax="softmax",
                                          is_causal=True, **interp),
      "xla softmax-1": functools.partial(reference_attention, softmax="softmax1", is_causal=True),
      f"{cudnn} softmax (jax.nn)": functools.partial(
          jax.nn.dot_product_attention, is_causal=True, implementation=cudnn),
  }
  base_name = list(impls)[-1]
  print(f"\n## timing: bf16, causal, head_dim {h}, {heads} heads, batch*seq = {tokens}")
  print("| seq | batch | pass | implementation | ms | TFLOP/s | speed vs cuDNN |")
  print("|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(2)
  for t in seqs:
    b = max(1, tokens // t)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.bfloat16) for _ in range(3))
    for name, wrap, with_bwd in (("fwd", jax.jit, False), ("fwd+bwd", fwd_bwd, True)):
      ms = {}
      for impl, fn in impls.items():
        try:
          ms[impl] = 1e3 * time_fn(wrap(fn), q, k, v, reps=reps)
        except Exception as e:  # noqa: BLE001 (e.g. XLA's [T, S] buffers running out of memory)
          ms[impl] = float("nan")
          print(f"<!-- {impl} {name} seq {t} failed: {type(e).__name__}: {str(e)[:120]} -->")
      flops = attention_flops(b, t, heads, h, True, with_bwd)
      for impl, m in ms.items():
        print(f"| {t} | {b} | {name} | {impl} | {m:.3f} | {flops / (m * 1e9):.1f} | "
              f"{ms[base_name] / m:.2f} |", flush=True)


def tune(reps: int) -> None:
  """Forward and forward+backward of the Pallas softmax-1 kernel for a few block sizes."""
  b, t, heads, h = 4, 4096, 16, 128
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.bfloat16) for _ in range(3))
  print("\n## block-size sweep: softmax-1, bf16, causal, B=4, T=4096, N=16, H=128")
  print("| block_q | block_k | bwd q/k (dkv) | bwd q/k (dq) | warps | stages | fwd ms | "
        "fwd+bwd ms |")
  print("|---|---|---|---|---|---|---|---|")
  configs = [
      pallas_gpu.BlockSizes(),
      pallas_gpu.BlockSizes(block_q=128, block_k=128),
      pallas_gpu.BlockSizes(block_q=64, block_k=64, num_stages=3),
      pallas_gpu.BlockSizes(block_q=128, block_k=64, num_stages=3),
      pallas_gpu.BlockSizes(block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32),
      pallas_gpu.BlockSizes(block_q_dkv=64, block_k_dkv=64, block_q_dq=64, block_k_dq=64,
                            num_warps=4),
  ]
  for bs in configs:
    fn = functools.partial(pallas_gpu.flash_attention, is_causal=True, block_sizes=bs)
    try:
      f = 1e3 * time_fn(jax.jit(fn), q, k, v, reps=reps)
      fb = 1e3 * time_fn(fwd_bwd(fn), q, k, v, reps=reps)
    except Exception as e:  # noqa: BLE001
      f = fb = float("nan")
      print(f"<!-- {bs} failed: {type(e).__name__}: {str(e)[:120]} -->")
    print(f"| {bs.block_q} | {bs.block_k} | {bs.block_q_dkv}/{bs.block_k_dkv} | "
          f"{bs.block_q_dq}/{bs.block_k_dq} | {bs.num_warps or 'auto'} | {bs.num_stages} | "
          f"{f:.3f} | {fb:.3f} |", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--cpu-smoke", action="store_true",
                      help="gpu mode at tiny shapes on CPU in the Pallas interpreter")
  parser.add_argument("--tune", action="store_true", help="gpu mode: sweep block sizes")
  parser.add_argument("--reps", type=int, default=None)
  args = parser.parse_args(argv)
  if args.mode == "cpu":
    cpu_mode(args.reps or 5)
    return 0
  if not args.cpu_smoke and jax.default_backend() != "gpu":
    print(f"--mode gpu needs a GPU (backend is {jax.default_backend()!r}); use --cpu-smoke.")
    return 2
  print(f"# {machine()}")
  reps = args.reps or (1 if args.cpu_smoke else 20)
  ok = check_correctness(args.cpu_smoke)
  if not ok:
    print("\nCORRECTNESS FAILED: timings below are of a wrong kernel.")
  gpu_table(args.cpu_smoke, reps)
  if args.tune and not args.cpu_smoke:
    tune(reps)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
