"""Training throughput: tokens/s and model-FLOP utilisation (MFU), JAX vs PyTorch/HF GPT-2.

For each shape ("tiny", and a gpt2-60m-shaped model) this times our jitted train step (the
training system's ``jit_train_step``: fp32, AdamW, GPT-2 flavour with plain softmax so both sides
compute the same model) and, when torch and transformers are installed, Hugging Face's
``GPT2LMHeadModel`` trained with ``torch.optim.AdamW`` on the same batches. MFU is model FLOPs per
second over this machine's measured matmul peak (a jitted float32 matmul), FLOPs per token being
``6 * matmul parameters + 12 * layers * d_model * seq_len`` (PaLM's formula, attention included).
It also times our default variant (softmax-1 + OrthoAdam) for reference.

The **matmul floor** of a shape: every ``dot_general`` of the traced AdamW train step (found by
walking its jaxpr, a scan's body counted ``length`` times), each jitted alone with the same shapes,
dtypes and dimension numbers and run as many times as the step runs it, less the time of as many
trivial jitted calls (dispatch, which the compiled step does not pay per matmul). It is reported in
two parts. The 2-D matmuls (projections, LM head) use every core alone as in the step, so their
time is a floor for the step: a PyTorch ratio that needs a step shorter than it needs faster
matmuls, not a better step. XLA:CPU runs a *batched* matmul (attention) on one core, and the step
may overlap independent ones, so their time alone only bounds them from above. For small shapes
(tiny) the figures are approximate: a matmul of ~0.1 ms alone is not what it is in the step.

The implementations take turns, one step each, so that a noisy machine slows them alike, and the
median step of each is reported. Like ``softmax-one train``, the script first makes glibc keep
freed memory in the process (``runtime.configure_host_allocator``); PyTorch runs in the same
process, under the same allocator.

Usage::

  python bench/train.py                     # both shapes
  python bench/train.py --shapes=tiny --steps=10
  python bench/train.py --no_host_allocator   # glibc's default malloc, for comparison
  python bench/train.py --no_floor          # skip timing the step's matmuls alone
  python bench/train.py --loss_chunk_logits=524288   # also with a lower logit cap in the loss
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.configs.base import get_base_config, model_config  # noqa: E402
from softmax_one_jax.data import build_train_iterator, get_tokenizer  # noqa: E402
from softmax_one_jax.rundir import model_config_from  # noqa: E402
from softmax_one_jax.runtime import configure_host_allocator  # noqa: E402
from softmax_one_jax.training import mesh as mesh_lib  # noqa: E402
from softmax_one_jax.training.state import build_optimizer, init_train_state, make_setup  # noqa: E402
from softmax_one_jax.training.step import jit_train_step, make_train_step  # noqa: E402

# name -> (preset, tokenizer, bpe vocab, batch, seq)
SHAPES = {
    "tiny": ("tiny", "bpe", 4096, 16, 128),
    "gpt2-60m": ("gpt2-60m", "gpt2", 0, 4, 256),
}


def _best_seconds(f: Callable, *args, repeats: int) -> float:
  """Best wall time of ``f(*args)`` over ``repeats`` calls after one warm-up call."""
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best float32 matmul FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  return 2 * n**3 / _best_seconds(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)


# (lhs shape, lhs dtype, rhs shape, rhs dtype, ((lhs contracting, rhs contracting), (lhs batch,
# rhs batch)), preferred element type)
DotSpec = tuple


# time_in_turns runner names: (matmuls alone, their dispatch alone) of each kind of matmul.
_FLOOR_RUNNERS = {kind: (f"{kind} matmuls alone", f"{kind} dispatch alone")
                  for kind in ("2-D", "batched")}


def jaxpr_matmuls(jaxpr, repeat: int = 1, found: Counter | None = None) -> Counter:
  """How many times each distinct ``dot_general`` of ``jaxpr`` runs (sub-jaxprs included).

  A scan's body counts ``length`` times; other sub-jaxprs (jit, remat, cond branches, while
  bodies) once each.

  Example:
    >>> j = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4)))
    >>> [(spec[0], spec[2], n) for spec, n in jaxpr_matmuls(j.jaxpr).items()]
    [((2, 3), (3, 4), 1)]
  """
  found = Counter() if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      dims = jax.tree.map(int, eqn.params["dimension_numbers"])
      found[(lhs.shape, str(lhs.dtype), rhs.shape, str(rhs.dtype), dims,
             eqn.params.get("preferred_element_type"))] += repeat
    times = repeat * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          jaxpr_matmuls(sub.jaxpr, times, found)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          jaxpr_matmuls(sub, times, found)
  return found


def _matmuls_of_kind(counts: Counter, kind: str) -> Counter:
  """The "2-D" (no batch dimensions) or "batched" matmuls of ``counts``."""
  def has_batch_dims(spec: DotSpec) -> bool:
    _, _, _, _, (_, (lhs_batch, _)), _ = spec
    return bool(lhs_batch)
  want = kind == "batched"
  return Counter({spec: n for spec, n in counts.items() if has_batch_dims(spec) == want})


def dot_flops(spec: DotSpec) -> int:
  """``2 * M * N * K * batch`` of one ``dot_general``."""
  lhs_shape, _, rhs_shape, _, ((_, rhs_contract), (_, rhs_batch)), _ = spec
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
  return 2 * int(np.prod(lhs_shape)) * int(np.prod(rhs_free))


def matmuls_alone(counts: Counter) -> tuple[Callable[[int], None], Callable[[int], None]]:
  """Two runners for ``time_in_turns``: every matmul of ``counts``, each jitted alone and run
  (blocking) as many times as it is counted; and as many trivial jitted calls on the same
  operands, whose time (dispatch and synchronisation) the first runner's time includes but a
  compiled step does not pay per matmul. The difference of their times: the matmuls' own time.
  """
  calls = []
  for spec, n in counts.items():
    lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, dims, preferred = spec
    a = jax.random.normal(jax.random.key(0), lhs_shape, lhs_dtype)
    b = jax.random.normal(jax.random.key(1), rhs_shape, rhs_dtype)
    dot = jax.jit(lambda x, y, dims=dims, preferred=preferred: jax.lax.dot_general(
        x, y, dims, preferred_element_type=preferred))
    calls.append((dot, a, b, n))

  def run(fns: list[tuple[Callable, jax.Array, jax.Array, int]]) -> Callable[[int], None]:
    def runner(i: int) -> None:
      del i
      for f, x, y, n in fns:
        for _ in range(n):
          jax.block_until_ready(f(x, y))
    return runner

  trivial = jax.jit(lambda x, y: x.ravel()[0] + y.ravel()[0])
  return run(calls), run([(trivial, a, b, n) for _, a, b, n in calls])


def flops_per_token(cfg) -> float:
  d, L, f, v = cfg.d_model, cfg.num_layers, cfg.mlp_dim, cfg.vocab_size
  per_layer = 4 * d * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
  return 6 * (L * per_layer + v * d)


def attention_flops_per_token(cfg, seq: int) -> float:
  return 12 * cfg.num_layers * cfg.d_model * seq


def _config(shape: str, softmax: str, optimizer: str, loss_chunk_logits: int = 0):
  preset, tokenizer, bpe_vocab, batch, seq = SHAPES[shape]
  c = get_base_config()
  c.seq_len, c.global_batch_size = seq, batch
  # One norm for every optimizer, so the ratio measures the optimizer alone.
  c.model = model_config(preset, softmax=softmax, norm="layernorm", max_seq_len=max(seq, 128))
  c.data.tokenizer = tokenizer
  if bpe_vocab:
    c.data.bpe_vocab_size = bpe_vocab
  c.optimizer.name = optimizer
  c.optimizer.warmup_steps = 0
  c.mesh.fsdp = 1
  c.loss_chunk_logits = loss_chunk_logits
  return c


def batches(c, tok, n: int) -> list[dict[str, np.ndarray]]:
  it = build_train_iterator(c.data, tokenizer=tok, seq_len=c.seq_len,
                            global_batch_size=c.global_batch_size, seed=0)
  return [next(it) for _ in range(n)]


def jax_stepper(c, tok, data, census: bool = False
                ) -> tuple[Callable[[int], None], object, Counter | None]:
  """One-step runner of our jitted train step on batch ``i`` (blocking), the model config, and,
  if ``census``, the step's matmuls (``jaxpr_matmuls``; else None)."""
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model_cfg = model_config_from(c, tok.vocab_size)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, mesh, seed=0,
                     loss_chunk_logits=c.loss_chunk_logits or None)
  state = init_train_state(setup, model_cfg, seed=0)
  step = jit_train_step(setup, 1, c.global_batch_size)
  sh = mesh_lib.batch_sharding(mesh, c.global_batch_size)
  glob = [mesh_lib.global_batch(b, sh) for b in data]
  matmuls = (jaxpr_matmuls(jax.make_jaxpr(make_train_step(setup, 1))(state, glob[0]).jaxpr)
             if census else None)

  def run(i: int) -> None:
    nonlocal state
    state, m = step(state, glob[i % len(glob)])
    jax.block_until_ready(m["loss"])
  return run, model_cfg, matmuls


def torch_stepper(model_cfg, data) -> Callable[[int], None] | None:
  """One-step runner of HF GPT2LMHeadModel + torch AdamW on batch ``i`` (None: no torch)."""
  try:
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel
  except ImportError:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.max_seq_len,
                   n_embd=model_cfg.d_model, n_layer=model_cfg.num_layers,
                   n_head=model_cfg.num_heads, n_inner=model_cfg.mlp_dim,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                   activation_function="gelu_new", tie_word_embeddings=True,
                   bos_token_id=0, eos_token_id=0)
  model = GPT2LMHeadModel(cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  batches = [{k: torch.from_numpy(np.asarray(b[k], np.float32 if k == "weights" else np.int64))
              for k in ("inputs", "targets", "weights", "positions")} for b in data]

  def run(i: int) -> None:
    b = batches[i % len(batches)]
    logits = model(input_ids=b["inputs"], position_ids=b["positions"]).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["targets"].reshape(-1),
                          reduction="none")
    loss = (nll * b["weights"].reshape(-1)).sum() / b["weights"].sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return run


def time_in_turns(runners: dict[str, Callable[[int], None]], steps: int, warmup: int
                  ) -> dict[str, float]:
  """Median seconds per step of each runner; they take turns, one step each, ``steps`` rounds."""
  for run in runners.values():
    for i in range(warmup):
      run(i)
  times: dict[str, list[float]] = {name: [] for name in runners}
  for i in range(steps):
    for name, run in runners.items():
      t = time.perf_counter()
      run(warmup + i)
      times[name].append(time.perf_counter() - t)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--no_floor", action="store_true", help="skip the matmul-floor runners")
  p.add_argument("--no_host_allocator", action="store_true",
                 help="leave glibc's malloc at its defaults (for comparison)")
  p.add_argument("--loss_chunk_logits", default="",
                 help="comma-separated budgets of config.loss_chunk_logits: each also times both "
                      "JAX variants with the loss's chunks of at most that many logits")
  args = p.parse_args(argv)
  # Before the first computation starts jax's CPU threads.
  allocator = not args.no_host_allocator and configure_host_allocator()
  peak = matmul_peak_flops()
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; measured fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
  print(f"# glibc malloc keeps freed memory (runtime.configure_host_allocator): {allocator}")
  rows = []
  for shape in args.shapes.split(","):
    baseline = ("softmax", "adamw")
    c = _config(shape, *baseline)
    tok = get_tokenizer(c.data)
    data = batches(c, tok, args.warmup + args.steps)
    runners, model_cfg, matmuls = {}, None, None
    budgets = [int(b) for b in args.loss_chunk_logits.split(",") if b]
    for variant in (baseline, ("softmax1", "orthoadam")):
      run, cfg, found = jax_stepper(_config(shape, *variant), tok, data,
                                    census=variant == baseline and not args.no_floor)
      runners[f"jax ({variant[0]}+{variant[1]})"] = run
      for budget in budgets:
        runners[f"jax ({variant[0]}+{variant[1]}), loss_chunk_logits={budget}"] = jax_stepper(
            _config(shape, *variant, loss_chunk_logits=budget), tok, data)[0]
      if variant == baseline:
        model_cfg, matmuls = cfg, found
        if not args.no_torch:
          torch_run = torch_stepper(cfg, data)
          if torch_run is not None:
            runners["pytorch HF GPT2LMHeadModel (softmax+adamw)"] = torch_run
    parts = {} if args.no_floor else {kind: _matmuls_of_kind(matmuls, kind)
                                      for kind in _FLOOR_RUNNERS}
    for kind, part in parts.items():
      mm_name, dispatch_name = _FLOOR_RUNNERS[kind]
      runners[mm_name], runners[dispatch_name] = matmuls_alone(part)
    seconds = time_in_turns(runners, args.steps, args.warmup)
    # kind -> seconds of the step's matmuls of that kind, alone
    floors = {kind: seconds.pop(_FLOOR_RUNNERS[kind][0]) - seconds.pop(_FLOOR_RUNNERS[kind][1])
              for kind in parts}
    tokens = c.global_batch_size * c.seq_len
    fpt = flops_per_token(model_cfg) + attention_flops_per_token(model_cfg, c.seq_len)
    torch_sec = next((v for k, v in seconds.items() if k.startswith("pytorch")), None)
    for impl, sec in seconds.items():
      baseline_row = impl == "jax (softmax+adamw)"
      row = {"shape": shape, "impl": impl, "batch": c.global_batch_size, "seq": c.seq_len,
             "step_s": sec, "tokens_per_s": tokens / sec, "mfu": fpt * tokens / sec / peak,
             "vs_pytorch": torch_sec / sec if torch_sec else None,
             "matmuls_2d_s": floors.get("2-D") if baseline_row else None,
             "matmuls_batched_s": floors.get("batched") if baseline_row else None}
      rows.append(row)
      print(json.dumps(row), flush=True)
    for kind, sec in floors.items():
      part = parts[kind]
      gflop = sum(n * dot_flops(spec) for spec, n in part.items()) / 1e9
      print(f"# {shape}: the AdamW step's {sum(part.values())} {kind} matmuls ({gflop:.1f} "
            f"GFLOP) take {sec:.3f} s alone ({gflop / sec:.0f} GFLOP/s)")
    if torch_sec:
      print(f"# {shape}: 1.2x PyTorch needs <= {torch_sec / 1.2:.3f} s/step")
  print("\n| shape | implementation | batch x seq | tokens/s | MFU (of measured peak) "
        "| / PyTorch | s/step | its 2-D matmuls alone | its batched matmuls alone |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    ratio = f"{r['vs_pytorch']:.2f}x" if r["vs_pytorch"] else ""
    alone = [f"{r[k]:.3f} s" if r[k] is not None else ""
             for k in ("matmuls_2d_s", "matmuls_batched_s")]
    print(f"| {r['shape']} | {r['impl']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f} | "
          f"{100 * r['mfu']:.0f}% | {ratio} | {r['step_s']:.3f} | {alone[0]} | {alone[1]} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_flops": peak, "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
