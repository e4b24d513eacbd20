"""The Pallas GPU (Triton) flash kernel, run in interpret mode on CPU, against float64 numpy.

Outputs and the gradients of q, k and v (computed by the Pallas backward kernels) and of learned
sinks are compared with an independent float64 numpy attention and its hand-written backward, on
fresh random inputs. The memory test lowers a causal 8192-long attention and checks the compiled
program holds no [T, S] buffer.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_one_jax.attention import (
    dot_product_attention,
    reference_attention,
    resolve_implementation,
)
from softmax_one_jax.attention import pallas_gpu
from tests.attention.reference_np import (np_attention, np_attention_grads, random_sinks,
                                          sink_grad_atol)


def out_and_grads(attn, q, k, v, w, sinks=None):
  """``(out, dq, dk, dv)`` of ``sum(w * attn(q, k, v))`` under jit, as float64 numpy.

  With ``sinks``, ``attn(q, k, v, sinks)`` and ``(out, dq, dk, dv, dsinks)``.
  """
  args = (q, k, v) if sinks is None else (q, k, v, jnp.asarray(sinks))
  def loss(*args):
    return jnp.sum(attn(*args).astype(jnp.float32) * w)
  out = jax.jit(attn)(*args)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  return [np.asarray(x, np.float64) for x in (out, *grads)]


def random_case(rng, b, t, s, n, kh, h, dtype, segments=None):
  """Random q, k, v (rounded to ``dtype``), cotangent ``w`` and optional segment ids."""
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  w = rng.standard_normal((b, t, n, h)).astype(np.float32)
  ids = None
  if segments == "self":
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)
  elif segments == "cross":  # ids drawn independently: some queries see no key at all
    ids = (jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1), jnp.int32),
           jnp.asarray(np.sort(rng.integers(1, 4, (b, s)), axis=1), jnp.int32))
  return q, k, v, w, ids


def check_against_numpy(attn, rng, shape, dtype, softmax, is_causal, segments, scale=None):
  """Asserts the kernel's output and q/k/v gradients (and sink gradients) match float64 numpy.

  float32: tight absolute/relative tolerances; the sink gradient, a sum over every query, within
  ``sink_grad_atol``. bfloat16: the kernel's root-mean-square error may be at most 1.5 times that
  of the XLA reference path run in bfloat16 on the same inputs (measured: 0.7-1.1 times), i.e. bf16
  rounding of the inputs to the matmuls, nothing worse. The RMS, not the largest element error:
  the kernel rounds other intermediates than XLA does, so single elements land on either side
  (max-error ratios of 0.3-2.4 on correct kernels). The sink gradient (one number per head, a sum
  over every query) may err by twice XLA's error plus one bf16 rounding (2^-8) of the summed terms.
  ``softmax="learned_sink"`` draws random sinks (``random_sinks``).
  """
  b, t, s, n, kh, h = shape
  q, k, v, w, ids = random_case(rng, b, t, s, n, kh, h, dtype, segments)
  sinks = random_sinks(rng, n) if softmax == "learned_sink" else None
  opts = dict(softmax=softmax, is_causal=is_causal, segment_ids=ids, scale=scale)
  if sinks is None:
    run = lambda fn: out_and_grads(lambda q, k, v: fn(q, k, v, **opts), q, k, v, w)  # noqa: E731
  else:
    run = lambda fn: out_and_grads(  # noqa: E731
        lambda q, k, v, c: fn(q, k, v, sinks=c, **opts), q, k, v, w, sinks)
  got = run(attn)
  np_ids = None if ids is None else (tuple(np.asarray(i) for i in ids) if isinstance(ids, tuple)
                                     else np.asarray(ids))
  want = np_attention_grads(q, k, v, w, softmax=softmax, is_causal=is_causal,
                            segment_ids=np_ids, scale=scale, sinks=sinks)
  names = ("out", "dq", "dk", "dv", "dsinks")
  if dtype == jnp.float32:
    for name, g, x in zip(names, got, want):
      atol = sink_grad_atol(w, want[0]) if name == "dsinks" else 2e-5
      np.testing.assert_allclose(g, x, rtol=2e-5, atol=atol, err_msg=name)
    return
  xla = run(reference_attention)
  for name, g, r, x in zip(names, got, xla, want):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    if name == "dsinks":
      err, err_xla = np.max(np.abs(g - x)), np.max(np.abs(r - x))
      bound = 2 * err_xla + sink_grad_atol(w, want[0], rel=2.0**-8)
    else:
      err, err_xla = np.sqrt(np.mean((g - x) ** 2)), np.sqrt(np.mean((r - x) ** 2))
      bound = 1.5 * err_xla
    assert err <= bound, f"{name}: kernel error {err} vs XLA bf16 error {err_xla}"


def gpu_kernel(block_sizes=None):
  def attn(q, k, v, **opts):
    return pallas_gpu.flash_attention(q, k, v, block_sizes=block_sizes, interpret=True, **opts)
  return attn


SMALL_TILES = pallas_gpu.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                                    block_q_dq=16, block_k_dq=32)


@pytest.mark.parametrize(
    "shape,softmax,is_causal,segments,tiles",
    [
        ((1, 16, 16, 2, 2, 64), "softmax1", False, None, None),
        ((2, 37, 37, 4, 2, 64), "softmax1", True, None, None),  # odd length, GQA
        ((2, 37, 50, 4, 1, 48), "softmax", False, "cross", None),  # T != S, MQA, head_dim pad
        ((1, 70, 70, 2, 2, 128), "softmax", True, "self", None),
        ((1, 150, 150, 4, 2, 64), "softmax1", True, "self", SMALL_TILES),  # many tiles
        ((1, 45, 90, 2, 1, 64), "softmax1", True, "cross", SMALL_TILES),  # causal, T < S
        ((1, 48, 48, 2, 2, 64), "softmax", False, None, SMALL_TILES),  # padded past a 16-tile
        ((2, 37, 37, 4, 2, 64), "learned_sink", True, "self", None),  # GQA, packed documents
        ((1, 150, 150, 4, 2, 64), "learned_sink", True, "cross", SMALL_TILES),  # no-key rows
        ((2, 37, 50, 2, 1, 48), "learned_sink", False, None, None),  # T != S, padded keys
    ],
)
def test_matches_numpy_float32(np_rng, shape, softmax, is_causal, segments, tiles):
  check_against_numpy(gpu_kernel(tiles), np_rng, shape, jnp.float32, softmax, is_causal,
                      segments)


@pytest.mark.parametrize("softmax,is_causal", [("softmax1", True), ("softmax", False),
                                               ("learned_sink", True)])
def test_matches_numpy_bfloat16(np_rng, softmax, is_causal):
  check_against_numpy(gpu_kernel(), np_rng, (1, 150, 150, 4, 2, 64), jnp.bfloat16, softmax,
                      is_causal, "self")


@pytest.mark.parametrize("softmax", ["softmax1", "softmax", "learned_sink"])
def test_fully_masked_rows_give_zeros_and_finite_grads(np_rng, softmax):
  q, k, v, w, _ = random_case(np_rng, 1, 24, 24, 2, 2, 64, jnp.float32)
  sinks = random_sinks(np_rng, 2) if softmax == "learned_sink" else None
  q_ids = jnp.asarray(np.repeat([[0, 1, 2]], 8, axis=1), jnp.int32)  # segment 2 has no keys
  kv_ids = jnp.asarray(np.repeat([[0, 1, 3]], 8, axis=1), jnp.int32)
  opts = dict(softmax=softmax, is_causal=True, segment_ids=(q_ids, kv_ids), scale=0.5)
  if sinks is None:
    got = out_and_grads(lambda q, k, v: gpu_kernel()(q, k, v, **opts), q, k, v, w)
  else:
    got = out_and_grads(lambda q, k, v, c: gpu_kernel()(q, k, v, sinks=c, **opts), q, k, v, w,
                        sinks)
  out, dq = got[:2]
  np.testing.assert_array_equal(out[:, 16:], 0.0)
  np.testing.assert_array_equal(dq[:, 16:], 0.0)
  assert all(np.isfinite(x).all() for x in got)
  want = np_attention_grads(q, k, v, w, softmax=softmax, is_causal=True,
                            segment_ids=(np.asarray(q_ids), np.asarray(kv_ids)), scale=0.5,
                            sinks=sinks)
  for name, g, x in zip(("out", "dq", "dk", "dv", "dsinks"), got, want):
    atol = sink_grad_atol(w, want[0]) if name == "dsinks" else 2e-5
    np.testing.assert_allclose(g, x, rtol=2e-5, atol=atol, err_msg=name)


def test_causal_output_ignores_future_keys(np_rng):
  """Property: changing keys/values after position t leaves outputs up to t unchanged."""
  q, k, v, _, _ = random_case(np_rng, 1, 40, 40, 2, 1, 64, jnp.float32)
  attn = jax.jit(lambda q, k, v: gpu_kernel(SMALL_TILES)(q, k, v, is_causal=True))
  k2 = k.at[:, 25:].set(jnp.asarray(np_rng.standard_normal(k[:, 25:].shape), jnp.float32))
  v2 = v.at[:, 25:].add(1.0)
  np.testing.assert_array_equal(attn(q, k, v)[:, :25], attn(q, k2, v2)[:, :25])


def test_dispatch_runs_the_kernel_in_interpret_mode(np_rng):
  q, k, v, _, ids = random_case(np_rng, 2, 20, 20, 4, 2, 64, jnp.float32, "self")
  got = dot_product_attention(q, k, v, is_causal=True, segment_ids=ids, implementation="pallas",
                              interpret=True)
  want, _ = np_attention(q, k, v, is_causal=True, segment_ids=np.asarray(ids))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_resolve_implementation():
  assert resolve_implementation(None, backend="tpu") == "pallas_tpu"
  assert resolve_implementation(None, backend="cpu") == "xla"
  assert resolve_implementation(None, backend="gpu", mask=jnp.ones((1, 1), bool)) == "xla"
  assert resolve_implementation(None, backend="gpu", dtype=jnp.float64) == "xla"
  assert resolve_implementation("pallas", backend="tpu") == "pallas_tpu"
  assert resolve_implementation("pallas", backend="cpu", interpret=True) == "pallas_gpu"
  with pytest.raises(ValueError, match="interpret=True"):
    resolve_implementation("pallas", backend="cpu")
  with pytest.raises(ValueError, match="not known"):
    resolve_implementation("triton")


def test_bad_arguments_raise_clear_errors():
  q = jnp.zeros((1, 16, 2, 64))
  with pytest.raises(ValueError, match="dense mask"):
    dot_product_attention(q, q, q, mask=jnp.ones((16, 16), bool), implementation="pallas_gpu",
                          interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pallas_gpu.BlockSizes(block_q=48)
  with pytest.raises(ValueError, match="dtype"):
    pallas_gpu.flash_attention(q.astype(jnp.int32), q, q, interpret=True)


def _compiled_temp_bytes(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled.as_text()


@pytest.mark.parametrize("with_grad", [False, True])
def test_long_sequence_holds_no_seq_by_seq_buffer(with_grad):
  """Compiles (does not run) causal attention at T = S = 8192 on the interpret path.

  The interpreter lowers the pallas_call to XLA loops over the same tiles the GPU kernel uses, so
  its compiled temporaries are what the kernel program keeps. The XLA reference path, compiled
  the same way, holds a [T, S] float32 buffer; the kernel's temporaries must be a fraction of
  one, grow linearly (8192 vs 4096: at most 2.2x, where quadratic memory grows 4x), and no
  [8192, 8192] shape may appear in its HLO.
  """

  def wrap(attn):
    if not with_grad:
      return attn
    return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))

  def temp_bytes(attn, t):
    x = jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)
    return _compiled_temp_bytes(wrap(attn), x, x, x)

  def kernel(q, k, v):
    return gpu_kernel()(q, k, v, is_causal=True)

  t = 8192
  xla_bytes, xla_hlo = temp_bytes(lambda q, k, v: reference_attention(q, k, v, is_causal=True), t)
  kernel_bytes, kernel_hlo = temp_bytes(kernel, t)
  half_bytes, _ = temp_bytes(kernel, t // 2)
  seq_by_seq = t * t * 4
  assert xla_bytes >= seq_by_seq and f"{t},{t}" in xla_hlo  # the check can see a [T, S] buffer
  assert f"{t},{t}" not in kernel_hlo
  assert kernel_bytes < seq_by_seq // 4, kernel_bytes
  assert kernel_bytes <= 2.2 * half_bytes, (kernel_bytes, half_bytes)


def test_bench_scripts_parse():
  """bench/gpu_check.sh is valid bash and bench/attention.py refuses --mode gpu without a GPU.

  (The script's full Python runs on CPU in ``test_gpu_check_smoke_runs_every_path``.)
  """
  root = pathlib.Path(__file__).resolve().parents[2]
  subprocess.run(["bash", "-n", str(root / "bench" / "gpu_check.sh")], check=True)
  done = subprocess.run([sys.executable, str(root / "bench" / "attention.py"), "--mode", "gpu"],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2 and "--cpu-smoke" in done.stdout, done.stdout + done.stderr


def test_gqa_backward_writes_dk_dv_once_per_key_value_head(np_rng):
  """With 4 query heads per key/value head the dk/dv kernel sums the group in registers and
  writes ``[B, S, K, H]`` in K's dtype: no ``[B, S, N, H]`` array exists anywhere in the
  backward (it used to write one float32 copy per query head), and the gradients still match
  float64 numpy (``check_against_numpy`` above covers every kind)."""
  q = jnp.asarray(np_rng.standard_normal((1, 64, 8, 64)), jnp.bfloat16)
  kv = jnp.asarray(np_rng.standard_normal((1, 128, 2, 64)), jnp.bfloat16)
  loss = lambda q, k, v: pallas_gpu.flash_attention(q, k, v, interpret=True).astype(  # noqa: E731
      jnp.float32).sum()
  text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv))
  assert "flash_bwd_dkv" in text
  assert "[1,128,8,64]" not in text            # no per-query-head key-side buffer
  dkv_line = next(line for line in text.splitlines()
                  if "= pallas_call[" in line and "bf16[1,128,2,64]" in line)
  assert dkv_line.count("bf16[1,128,2,64]") == 2, dkv_line   # dk and dv, in K's dtype
  _, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, kv, kv)
  assert dk.shape == dv.shape == kv.shape and dk.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_default_tiles_fit_an_a100s_shared_memory(head_dim, dtype):
  """Per (head dim, dtype), every kernel's tiles (a query tile and ``num_stages`` buffered key
  and value tiles, in the padded head width) fit the 164 KiB of shared memory of an A100 SM
  (H100: 228 KiB), and 16-bit 128-wide heads keep the largest tiles."""
  bs = pallas_gpu.default_block_sizes(head_dim, dtype)
  width = 1 << (head_dim - 1).bit_length()          # Triton tiles are powers of two
  item = jnp.dtype(dtype).itemsize
  for bq, bk in ((bs.block_q, bs.block_k), (bs.block_q_dkv, bs.block_k_dkv),
                 (bs.block_q_dq, bs.block_k_dq)):
    # q (and dO in the backward) once, k and v per pipelining stage.
    smem = (2 * bq + 2 * bk * bs.num_stages) * width * item
    assert smem <= 164 * 1024, (head_dim, dtype, bq, bk, smem)
  if item == 2 and head_dim <= 128:
    assert bs == pallas_gpu.BlockSizes()
  # And the kernel runs at that width: all-ones inputs, every logit sqrt(H), query t sees
  # n = t + 1 keys and the null key, so every output entry is n e^c / (1 + n e^c).
  q = jnp.ones((1, 40, 2, head_dim), dtype)
  out = pallas_gpu.flash_attention(q, q, q, is_causal=True, interpret=True)
  n_e = np.arange(1, 41) * np.exp(np.sqrt(head_dim))
  np.testing.assert_allclose(np.asarray(out, np.float32)[0, :, 0, 0], n_e / (1 + n_e), rtol=1e-2)


def test_kernel_matmuls_follow_the_default_matmul_precision():
  """Every tile product of the forward and both backward kernels takes its precision from
  ``jax.default_matmul_precision``, as XLA's matmuls do: unset (TF32 for float32 on GPUs) by
  default, HIGHEST (exact float32) under "highest"."""
  q = jnp.ones((1, 64, 4, 64), jnp.float32)
  kv = jnp.ones((1, 64, 2, 64), jnp.float32)
  loss = lambda q, k, v: pallas_gpu.flash_attention(q, k, v, is_causal=True).sum()  # noqa: E731
  fwd_bwd = jax.grad(loss, argnums=(0, 1, 2))

  def precisions():
    text = str(jax.make_jaxpr(fwd_bwd)(q, kv, kv))
    assert text.count("pallas_call") >= 3            # forward, dq, dk/dv
    # Each dot_general's parameters, up to the result type every one of them names last.
    params = [chunk.split("preferred_element_type")[0] for chunk in text.split("dot_general[")[1:]]
    assert len(params) >= 7, len(params)   # forward 2, dq 3, dk/dv 4 tile products
    return {(re.search(r"precision=\(?(\S+?),", p) or re.search("()", p)).group(1)
            for p in params}

  assert precisions() == {""}                    # no precision: the config's default
  with jax.default_matmul_precision("highest"):
    assert precisions() == {"Precision.HIGHEST"}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_path():
  """``bash bench/gpu_check.sh --cpu-smoke``: the GPU check's code at tiny shapes on CPU (cuDNN's
  construction through jax.nn's XLA attention, Pallas in its interpreter); measures nothing, but
  every correctness row and every train-step row must pass."""
  root = pathlib.Path(__file__).resolve().parents[2]
  done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--cpu-smoke"],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  rows = [line for line in done.stdout.splitlines() if line.endswith(("PASS |", "FAIL |"))]
  assert len(rows) == 12 + 3 and all(r.endswith("PASS |") for r in rows), rows
  assert "cuDNN softmax-1 (zero key)" in done.stdout and "Pallas softmax-1" in done.stdout


@pytest.mark.parametrize(
    "dtype,softmax,is_causal,segments,heads,h",
    [(jnp.bfloat16, "softmax1", True, True, (8, 2), 128),
     (jnp.float32, "softmax", False, False, (4, 4), 64),
     (jnp.bfloat16, "learned_sink", True, False, (8, 2), 64)],
)
def test_kernels_lower_to_triton_for_cuda(dtype, softmax, is_causal, segments, heads, h):
  """Cross-lowers forward, backward and the stats variants for CUDA on this CPU machine.

  This runs Pallas's real Triton lowering (not the interpreter): every op in the kernels must
  have a Triton lowering rule. No GPU is needed; the Triton-to-PTX compile happens only on one.
  """
  from jax import export  # pylint: disable=g-import-not-at-top

  b, t = 2, 1000
  q = jax.ShapeDtypeStruct((b, t, heads[0], h), dtype)
  kv = jax.ShapeDtypeStruct((b, t, heads[1], h), dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
  sinks = jnp.linspace(-2.0, 2.0, heads[0]) if softmax == "learned_sink" else None
  opts = dict(softmax=softmax, is_causal=is_causal, sinks=sinks)

  def fwd_bwd(q, k, v, ids):
    def loss(q, k, v, sinks):  # the sinks, when present, are differentiated too
      kwargs = {**opts, "sinks": sinks}
      return jnp.sum(pallas_gpu.flash_attention(q, k, v, segment_ids=ids, **kwargs))
    return jax.grad(loss, argnums=(0, 1, 2) if sinks is None else (0, 1, 2, 3))(q, k, v, sinks)

  def stats(q, k, ids):
    return pallas_gpu.flash_stats(q, k, segment_ids=ids, **opts)

  triton = "__gpu$xla.gpu.triton"
  for fn, args, kernels in ((fwd_bwd, (q, kv, kv, ids), 3), (stats, (q, kv, ids), 1)):
    with _abstract_gpu_target():
      exported = export.export(
          jax.jit(fn), platforms=["cuda"],
          disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(*args)
    assert exported.mlir_module().count(f"@{triton}(") == kernels


def _abstract_gpu_target():
  """An abstract H100 as the lowering target: newer jax asks Triton lowering for a GPU's kind."""
  abstract_device = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract_device)
  return jax.sharding.use_abstract_mesh(mesh)
