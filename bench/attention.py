"""Attention benchmarks: softmax-1 must cost nothing.

Modes:
  --mode cpu (default)  XLA softmax-1 vs XLA softmax (same code path) and jax.nn's XLA softmax,
                        forward and forward+backward, float32; prints times and ratios.
  --mode gpu            on a GPU: correctness first (cuDNN softmax-1 by the zero-key construction
                        and the Pallas kernel, softmax / softmax-1 / learned sinks, causal,
                        segment ids, against the float32 reference, outputs and q/k/v
                        gradients), then forward and forward+backward times / TFLOP/s of cuDNN
                        softmax (jax.nn), cuDNN softmax-1 (zero key), Pallas softmax-1 and XLA
                        softmax-1, bf16, causal, head_dim 128, seq 1024/4096/16384; then a few
                        train steps of a tiny bf16 model on each path (the same losses).
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

import optax  # noqa: E402
from flax import nnx  # noqa: E402

from softmax_one_jax.attention import (cudnn, dot_product_attention, pallas_gpu,  # noqa: E402
                                       reference_attention)
from softmax_one_jax.models import Transformer, preset  # noqa: E402


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


# The GPU paths under test: name -> (implementation, dtypes it takes). On --cpu-smoke cuDNN is
# replaced by jax.nn's XLA attention inside the same zero-key construction, and the Pallas
# kernel runs in its interpreter.
GPU_PATHS = {"cudnn": (jnp.bfloat16,), "pallas_gpu": (jnp.bfloat16, jnp.float32)}


def gpu_attention(path: str, smoke: bool, **opts):
  """``dot_product_attention`` on ``path`` ("cudnn", "pallas_gpu", "xla"); on CPU (smoke) the
  cuDNN construction runs through jax.nn's XLA attention and Pallas in its interpreter."""
  if path == "cudnn" and smoke:
    return functools.partial(cudnn.null_key_attention, implementation="xla", **opts)
  interp = dict(interpret=True) if smoke and path == "pallas_gpu" else {}
  return functools.partial(dot_product_attention, implementation=path, **opts, **interp)


def check_correctness(smoke: bool) -> bool:
  """cuDNN (zero key) and Pallas vs the float32 XLA reference; returns True if all pass."""
  rng = np.random.default_rng(1)
  ok = True
  b, t, n, kh, h = (1, 45, 4, 2, 64) if smoke else (2, 1000, 8, 2, 128)
  print("## correctness: each path vs the float32 XLA reference (max |error|)")
  print("| path | dtype | softmax | causal | segments | out | dq | dk | dv | xla-bf16 worst | ok |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  cases = (("softmax1", True, False), ("softmax", True, True), ("softmax1", False, True),
           ("learned_sink", True, False))
  for path, dtypes in GPU_PATHS.items():
    for dtype in dtypes:
      for softmax, causal, seg in cases:
        hd = 64 if softmax == "learned_sink" else h   # 64 + 8 sink columns: every GPU's cuDNN
        q = jnp.asarray(rng.standard_normal((b, t, n, hd)), dtype)
        k, v = (jnp.asarray(rng.standard_normal((b, t, kh, hd)), dtype) for _ in range(2))
        ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), 1), jnp.int32) if seg else None
        sinks = (jnp.asarray(rng.standard_normal(n) * 2, jnp.float32)
                 if softmax == "learned_sink" else None)
        opts = dict(softmax=softmax, is_causal=causal, segment_ids=ids, sinks=sinks)
        kernel = gpu_attention(path, smoke, **opts)
        ref = functools.partial(reference_attention, **opts)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        with jax.default_matmul_precision("highest"):  # no TF32 in the reference
          want = [jax.jit(ref)(*f32), *fwd_bwd(ref)(*f32)]
        label = f"| {path} | {jnp.dtype(dtype).name} | {softmax} | {causal} | {seg} |"
        # float32 in exact float32 (the kernel follows jax.default_matmul_precision: TF32 by
        # default on GPUs, as XLA's matmuls).
        exact = jnp.dtype(dtype) == jnp.float32
        try:
          with jax.default_matmul_precision("highest" if exact else None):
            got = [jax.jit(kernel)(q, k, v), *fwd_bwd(kernel)(q, k, v)]
        except Exception as e:  # noqa: BLE001 (e.g. Triton out of shared memory): report, go on
          print(f"{label} ERROR {type(e).__name__}: {str(e)[:200]} | | | | | FAIL |", flush=True)
          ok = False
          continue
        errs = [float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) for g, w in zip(got, want)]
        scale = max(1.0, max(float(jnp.max(jnp.abs(w))) for w in want))
        if dtype == jnp.bfloat16:  # the XLA path in bf16 sets what bf16 rounding costs
          xla = [jax.jit(ref)(q, k, v), *fwd_bwd(ref)(q, k, v)]
          base = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - w)))
                     for x, w in zip(xla, want))
          good = max(errs) <= 2 * base + 2e-3 * scale
        else:
          base = float("nan")
          good = max(errs) <= 1e-4 * scale  # exact float32 in the kernel and the reference
        ok &= good
        cells = " | ".join(f"{e:.2e}" for e in errs)
        print(f"{label} {cells} | {base:.2e} | {'PASS' if good else 'FAIL'} |", flush=True)
  return ok


def gpu_table(smoke: bool, reps: int) -> None:
  heads, h = (2, 64) if smoke else (16, 128)
  seqs = (32, 64) if smoke else (1024, 4096, 16384)
  tokens = 64 if smoke else 16384  # batch * seq held fixed
  nn_cudnn = "xla" if smoke else "cudnn"
  impls = {
      "cuDNN softmax (jax.nn)": functools.partial(
          jax.nn.dot_product_attention, is_causal=True, implementation=nn_cudnn),
      "cuDNN softmax-1 (zero key)": gpu_attention("cudnn", smoke, softmax="softmax1",
                                                  is_causal=True),
      "Pallas softmax-1": gpu_attention("pallas_gpu", smoke, softmax="softmax1", is_causal=True),
      "XLA softmax-1": functools.partial(reference_attention, softmax="softmax1", is_causal=True),
  }
  base_name = next(iter(impls))
  print(f"\n## timing: bf16, causal, head_dim {h}, {heads} heads, batch*seq = {tokens}")
  print("| seq | batch | pass | implementation | ms | TFLOP/s | speed vs cuDNN softmax |")
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


def train_steps(smoke: bool, steps: int = 6) -> bool:
  """A tiny bf16 model trained a few AdamW steps per attention path, same data and init: the
  losses must agree across paths (to bf16 rounding) and fall; prints ms per step."""
  paths = ("xla", "cudnn", "pallas_gpu")
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(0, 256, (4, 65)), jnp.int32)
  ids = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 4, axis=0), jnp.int32)  # two documents
  print(f"\n## train steps: tiny bf16 model, {steps} AdamW steps, packed documents")
  print("| path | losses | ms/step | ok |")
  print("|---|---|---|---|")
  curves, ok = {}, True
  for path in paths:
    overrides = dict(vocab_size=256, dtype="bfloat16", attention_impl=path,
                     attention_interpret=smoke and path == "pallas_gpu")
    if smoke and path == "cudnn":   # no cuDNN on CPU: the XLA path stands in
      overrides["attention_impl"] = "xla"
    model = Transformer(preset("tiny", **overrides), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens, ids):
      def loss_fn(model):
        logits = model(tokens[:, :-1], segment_ids=ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    losses, times = [], []
    for _ in range(steps):
      t0 = time.perf_counter()
      losses.append(float(step(model, opt, tokens, ids)))
      times.append(time.perf_counter() - t0)
    curves[path] = losses
    good = all(np.isfinite(losses)) and losses[-1] < losses[0]
    good &= bool(np.allclose(losses, curves["xla"], rtol=0.02, atol=0.02))
    ok &= good
    print(f"| {path} | {' '.join(f'{x:.3f}' for x in losses)} | "
          f"{1e3 * statistics.median(times[1:]):.1f} | {'PASS' if good else 'FAIL'} |",
          flush=True)
  return ok


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
    print("\nCORRECTNESS FAILED: timings below include a wrong path.")
  gpu_table(args.cpu_smoke, reps)
  ok &= train_steps(args.cpu_smoke)
  if args.tune and not args.cpu_smoke:
    tune(reps)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
