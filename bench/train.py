"""Training throughput: tokens/s and model-FLOP utilisation (MFU), JAX vs PyTorch/HF GPT-2.

For each shape ("tiny", and a gpt2-60m-shaped model) this times our jitted train step (the
training system's ``jit_train_step``: fp32, AdamW, GPT-2 flavour with plain softmax so both sides
compute the same model) and, when torch and transformers are installed, Hugging Face's
``GPT2LMHeadModel`` trained with ``torch.optim.AdamW`` on the same batches. MFU is model FLOPs per
second over this machine's measured matmul peak (a jitted float32 matmul), FLOPs per token being
``6 * matmul parameters + 12 * layers * d_model * seq_len`` (PaLM's formula, attention included).
It also times our default variant (softmax-1 + OrthoAdam) for reference.

Usage::

  python bench/train.py                     # both shapes
  python bench/train.py --shapes=tiny --steps=10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments.configs.base import get_base_config, model_config  # noqa: E402
from softmax_one_jax.data import build_train_iterator, get_tokenizer  # noqa: E402
from softmax_one_jax.training import mesh as mesh_lib  # noqa: E402
from softmax_one_jax.training.config import model_config_from  # noqa: E402
from softmax_one_jax.training.state import build_optimizer, init_train_state, make_setup  # noqa: E402
from softmax_one_jax.training.step import jit_train_step  # noqa: E402

# name -> (preset, tokenizer, bpe vocab, batch, seq)
SHAPES = {
    "tiny": ("tiny", "bpe", 4096, 16, 128),
    "gpt2-60m": ("gpt2-60m", "gpt2", 0, 4, 256),
}


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best float32 matmul FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def flops_per_token(cfg) -> float:
  d, L, f, v = cfg.d_model, cfg.num_layers, cfg.mlp_dim, cfg.vocab_size
  per_layer = 4 * d * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
  return 6 * (L * per_layer + v * d)


def attention_flops_per_token(cfg, seq: int) -> float:
  return 12 * cfg.num_layers * cfg.d_model * seq


def _config(shape: str, softmax: str, optimizer: str):
  preset, tokenizer, bpe_vocab, batch, seq = SHAPES[shape]
  c = get_base_config()
  c.seq_len, c.global_batch_size = seq, batch
  norm = "scalar_rmsnorm" if optimizer == "orthoadam" else "layernorm"
  c.model = model_config(preset, softmax=softmax, norm=norm, max_seq_len=max(seq, 128))
  c.data.tokenizer = tokenizer
  if bpe_vocab:
    c.data.bpe_vocab_size = bpe_vocab
  c.optimizer.name = optimizer
  c.optimizer.warmup_steps = 0
  c.mesh.fsdp = 1
  return c


def batches(c, tok, n: int) -> list[dict[str, np.ndarray]]:
  it = build_train_iterator(c.data, tokenizer=tok, seq_len=c.seq_len,
                            global_batch_size=c.global_batch_size, seed=0)
  return [next(it) for _ in range(n)]


def time_jax(c, tok, data, warmup: int) -> tuple[float, object]:
  """Seconds per step of our train step (median of the timed steps) and the model config."""
  mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  model_cfg = model_config_from(c, tok.vocab_size)
  tx, schedule = build_optimizer(c.optimizer, c.num_train_steps)
  setup = make_setup(model_cfg, tx, schedule, mesh, seed=0)
  state = init_train_state(setup, model_cfg, seed=0)
  step = jit_train_step(setup, 1, c.global_batch_size)
  sh = mesh_lib.batch_sharding(mesh, c.global_batch_size)
  glob = [mesh_lib.global_batch(b, sh) for b in data]
  times = []
  for i, b in enumerate(glob):
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return float(np.median(times)), model_cfg


def time_torch(model_cfg, data, warmup: int) -> float | None:
  """Seconds per step of HF GPT2LMHeadModel + torch AdamW on the same batches (None: no torch)."""
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
  times = []
  for i, b in enumerate(data):
    x = torch.from_numpy(np.asarray(b["inputs"], np.int64))
    y = torch.from_numpy(np.asarray(b["targets"], np.int64))
    w = torch.from_numpy(np.asarray(b["weights"], np.float32))
    pos = torch.from_numpy(np.asarray(b["positions"], np.int64))
    t = time.perf_counter()
    logits = model(input_ids=x, position_ids=pos).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    loss = (nll * w.reshape(-1)).sum() / w.sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--json", default="", help="also write the rows to this file")
  args = p.parse_args(argv)
  peak = matmul_peak_flops()
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; measured fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
  rows = []
  for shape in args.shapes.split(","):
    for variant in (("softmax", "adamw"), ("softmax1", "orthoadam")):
      c = _config(shape, *variant)
      tok = get_tokenizer(c.data)
      data = batches(c, tok, args.warmup + args.steps)
      sec, model_cfg = time_jax(c, tok, data, args.warmup)
      tokens = c.global_batch_size * c.seq_len
      fpt = flops_per_token(model_cfg) + attention_flops_per_token(model_cfg, c.seq_len)
      row = {"shape": shape, "impl": f"jax ({variant[0]}+{variant[1]})",
             "batch": c.global_batch_size, "seq": c.seq_len, "tokens_per_s": tokens / sec,
             "mfu": fpt * tokens / sec / peak}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if variant == ("softmax", "adamw") and not args.no_torch:
        tsec = time_torch(model_cfg, data, args.warmup)
        if tsec is not None:
          trow = {"shape": shape, "impl": "pytorch HF GPT2LMHeadModel (softmax+adamw)",
                  "batch": c.global_batch_size, "seq": c.seq_len, "tokens_per_s": tokens / tsec,
                  "mfu": fpt * tokens / tsec / peak}
          rows.append(trow)
          print(json.dumps(trow), f"# jax/torch = {tsec / sec:.2f}x", flush=True)
  print("\n| shape | implementation | batch x seq | tokens/s | MFU (of measured peak) |")
  print("|---|---|---|---:|---:|")
  for r in rows:
    print(f"| {r['shape']} | {r['impl']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f} | "
          f"{100 * r['mfu']:.0f}% |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_flops": peak, "rows": rows}, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
