"""``softmax-one compile``: the real TPU programs of our configs, built on this CPU host.

The command runs as a user runs it (a subprocess, the repository's configs, a v5e slice). It needs
libtpu (``pip install -e ".[tpu-aot]"``, which CI installs); without it only the error test runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from softmax_one_jax.models import preset
from softmax_one_jax.training import aot, chips, hlo
from tests.training._micro import REPO, cpu_env

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install -e ".[tpu-aot]"); CI installs it')


def _compile_command(tmp_path, config: str, topology: str, *overrides: str
                     ) -> tuple[list[str], pathlib.Path]:
  out = tmp_path / f"{config.replace(':', '_').replace(',', '_')}.json"
  cmd = [sys.executable, "-m", "softmax_one_jax.cli", "compile",
         f"--config={REPO}/experiments/configs/{config}", f"--topology={topology}",
         f"--json={out}", *overrides]
  return cmd, out


def _compile_all(tmp_path, runs: list[tuple[str, str, tuple[str, ...]]]) -> list[tuple[dict, str]]:
  """Runs ``softmax-one compile`` once per (config, topology, overrides), side by side.

  Each is its own subprocess, exactly as a user runs it. They run at the same time because a
  compile spends most of its time on one thread: on two cores the two overlap instead of queueing.
  Output goes to files, so that no process waits on a pipe that is not being read.
  """
  procs = []
  try:
    for i, (config, topology, overrides) in enumerate(runs):
      cmd, out = _compile_command(tmp_path, config, topology, *overrides)
      logs = tmp_path / f"compile{i}.stdout", tmp_path / f"compile{i}.stderr"
      with open(logs[0], "w", encoding="utf-8") as o, open(logs[1], "w", encoding="utf-8") as e:
        procs.append((subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=cpu_env(1),
                                       cwd=REPO), out, logs))
    results = []
    for proc, out, (stdout, stderr) in procs:
      proc.wait(timeout=900)
      assert proc.returncode == 0, stderr.read_text()[-3000:]
      results.append((json.loads(out.read_text()), stdout.read_text()))
    return results
  finally:
    for proc, _, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _compile(tmp_path, config: str, topology: str = "v5e:2x2", *overrides: str
             ) -> tuple[dict, str]:
  return _compile_all(tmp_path, [(config, topology, overrides)])[0]


@needs_libtpu
@pytest.mark.slow
def test_tiny_compiles_for_a_v5e_slice_with_the_splash_kernel(tmp_path):
  report, printed = _compile(tmp_path, "tiny.py")
  assert report["attention"] == "pallas_tpu" and report["num_chips"] == 4
  assert report["train"]["kernels"]["mosaic"] >= 3       # forward, dq, dkv in the train step
  assert report["eval"]["kernels"]["mosaic"] >= 1
  assert report["fits"] and report["peak_bytes"] < report["hbm_bytes"]
  assert "| fits" in printed and "pallas_tpu" in printed


@needs_libtpu
@pytest.mark.slow
def test_gpt2_60m_orthoadam_moves_what_adamw_moves_on_a_v5e_slice(tmp_path):
  # The 60m widths (512, 2048, the vocabulary padded to 50304) with one of its 11 layers and 16
  # sequences, on its own slice (v5e:4x4, fsdp=16): every parameter shape the rotations meet, at
  # a fraction of the compile time (FSDP moves weights, whose bytes do not depend on the batch).
  # Whole-axis mixing adds two all-to-alls of one shard per matrix: 2/16 of the parameter bytes.
  small = ("--config.model.num_layers=1", "--config.global_batch_size=16")
  (adamw, _), (ortho, _) = _compile_all(
      tmp_path, [("gpt2.py:60m,softmax1,adamw", "v5e:4x4", small),
                 ("gpt2.py:60m,softmax1,orthoadam", "v5e:4x4", small)])
  for r in (adamw, ortho):
    assert r["train"]["kernels"]["mosaic"] >= 3 and r["fits"]
    # FSDP moves weights: a few times the model's parameter bytes per chip per step.
    assert r["collective_ratio"] <= 4.0, r["train"]["collectives"]
  # OrthoAdam gathers nothing more than AdamW; what it adds is all-to-all: the gradient to its
  # moments' layout and the update back, one shard each per matrix (2x the per-chip parameter
  # bytes; the slack is the vectors, gathered to be rotated). The full 12-layer model on this
  # slice: 1.095x AdamW's bytes (experiments/results/compile_grid/README.md).
  oc, ac = ortho["train"]["collectives"], adamw["train"]["collectives"]
  assert oc["all-gather"]["bytes"] <= 1.01 * ac["all-gather"]["bytes"], (oc, ac)
  extra = ortho["train"]["collective_bytes"] - adamw["train"]["collective_bytes"]
  assert extra <= 2.1 * ortho["param_bytes"], (extra, ortho["param_bytes"], oc, ac)


def test_missing_libtpu_is_reported_with_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[tpu-aot\]"'):
    aot.slice_devices("v5e:2x2")


def test_unknown_topology_names_the_form():
  with pytest.raises(ValueError, match="v5e:4x4"):
    aot.slice_devices("v9:2x2")


@pytest.mark.parametrize("name,slices,slice_name,total", [
    ("2xv5e:4x4", 2, "v5e:4x4", 32), ("4xv5p:2x2x2", 4, "v5p:2x2x2", 32),
    ("1xv6e:2x2", 1, "v6e:2x2", 4), ("v5e:4x4", 1, "v5e:4x4", 16),
    (" 3xv4:2x2x1 ", 3, "v4:2x2x1", 12)])
def test_parse_topology_reads_a_slice_count(name, slices, slice_name, total):
  t = chips.parse_topology(name)
  assert (t.num_slices, t.name, t.total_chips) == (slices, slice_name, total)
  assert t.desc_kwargs.get("num_slices", 1) == slices     # libtpu is asked for them only if > 1
  assert ("num_slices" in t.desc_kwargs) == (slices > 1)


@pytest.mark.parametrize("bad,match", [
    ("0xv5e:4x4", r"asks for 0 slices.*'2xv5e:4x4'"), ("2x:4x4", r"'\[<n>x\]<generation>:<dims>'"),
    ("2xv5e", r"'\[<n>x\]<generation>:<dims>'"), ("2xv9:2x2", "'2xv5e:4x4'"),
    ("2xv5e:4x4x2", "2-D torus"), ("2x2xv5e:4x4", r"'\[<n>x\]<generation>:<dims>'"),
    ("-2xv5e:4x4", r"'\[<n>x\]<generation>:<dims>'")])
def test_parse_topology_rejects_bad_slice_counts_naming_the_form(bad, match):
  with pytest.raises(ValueError, match=match):
    chips.parse_topology(bad)


# One slice's program of a data-parallel step over two slices, cut down: what crosses slices is a
# send/recv pair for the megascale runtime (text as XLA's TPU back end prints it), once in ENTRY
# and once in a 3-trip loop; a plain host transfer and an ICI all-reduce are not DCN traffic.
_MEGASCALE_HLO = """\
HloModule jit_step, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %after-all = token[] after-all()
  %send = (f32[8,128]{1,0:T(8,128)}, u32[], token[]) send(%x, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.1_0",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[8,128]{1,0:T(8,128)}, u32[], token[]) recv(%after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %recv-done = (f32[8,128]{1,0:T(8,128)}, token[]) recv-done(%recv), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %y = f32[8,128]{1,0} get-tuple-element(%recv-done), index=0
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%next, %y)
}

%cond (q: (s32[], f32[8,128])) -> pred[] {
  %q = (s32[], f32[8,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main (w: bf16[4,4,128], x: f32[8,128]) -> f32[8,128] {
  %w = bf16[4,4,128]{2,1,0} parameter(0)
  %x0 = f32[8,128]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,128]{1,0}) tuple(%zero, %x0)
  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %after-all.1 = token[] after-all()
  %send.1 = (bf16[4,4,128]{2,1,0:T(4,128)(2,1)}, u32[], token[]) send(%w, %after-all.1), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done.1 = token[] send-done(%send.1), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime"}
  %send.2 = (f32[8,128]{1,0}, u32[], token[]) send(%x0, %after-all.1), channel_id=6, is_host_transfer=true
  %send-done.2 = token[] send-done(%send.2), channel_id=6, is_host_transfer=true
  %ici = f32[8,128]{1,0} all-reduce(%x0), channel_id=8, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  ROOT %out = f32[8,128]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_dcn_transfers_count_the_megascale_sends_with_their_loops():
  dcn = hlo.dcn_transfers(_MEGASCALE_HLO)
  assert dcn == {"all-reduce": (1 + 3, 4 * 4 * 128 * 2 + 3 * 8 * 128 * 4)}, dcn
  # The ICI collective is the census's, not DCN traffic.
  assert hlo.collective_stats(_MEGASCALE_HLO)["all-reduce"] == (1, 8 * 128 * 4)
  assert hlo.dcn_transfers(_MEGASCALE_HLO.replace("xla_megascale_runtime", "other")) == {}


def test_dcn_time_adds_to_the_roofline_communication():
  v5e = chips.chip_for("TPU v5 lite")
  base = hlo.roofline(197e12, 0.0, 0.0, v5e)           # 1 s of compute, no communication
  rl = aot.with_dcn(base, 2.0)
  assert (rl.comm_s, rl.step_s, rl.step_overlap_s, rl.bound) == (2.0, 3.0, 2.0, "communication")
  assert v5e.dcn_bandwidth == 25e9 / 8                 # 2 x 100 Gbps NICs per 8-chip host


@needs_libtpu
@pytest.mark.slow
def test_gpt2_60m_compiles_for_two_v5e_slices_with_data_across_them(tmp_path):
  # Two layers of the 60m model, the data axis across two v5e 4x4 slices (DCN), fsdp=16 inside.
  report, printed = _compile(tmp_path, "gpt2.py:60m,softmax1,orthoadam", "2xv5e:4x4",
                             "--config.model.num_layers=2", "--config.mesh.data=2")
  assert (report["num_slices"], report["num_chips"]) == (2, 32)
  assert report["mesh"] == {"data": 2, "fsdp": 16, "tensor": 1}
  assert report["dcn_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  assert report["train"]["kernels"]["mosaic"] >= 3 and report["fits"]
  # The gradient's data-parallel reduction crosses the slices: per chip, its shard (fsdp=16) of
  # the parameters; collectives inside a slice are the ICI census's.
  dcn = report["train"]["dcn"]
  assert set(dcn) == {"all-reduce"} and dcn["all-reduce"]["count"] >= 1, dcn
  assert 0.5 * report["param_bytes"] <= report["train"]["dcn_bytes"] <= 2 * report["param_bytes"]
  assert report["train"]["collective_bytes"] > 0 and report["dcn_s"] > 0
  assert "data=2 (2 across slices, over DCN) x fsdp=16" in printed
  assert "| train DCN transfers" in printed


def test_model_flops_per_token_is_six_n_plus_causal_attention():
  cfg = preset("llama2-60m")           # RoPE: no position table
  n, t = 58_000_000, 256
  want = 6 * n + 6 * cfg.num_layers * t * cfg.num_heads * cfg.head_dim
  assert aot.model_flops_per_token(cfg, n, t) == want
  gpt = preset("gpt2-60m")             # learned positions are a lookup, not a matmul
  assert aot.model_flops_per_token(gpt, n, t) == (
      6 * (n - gpt.max_seq_len * gpt.d_model) + 6 * gpt.num_layers * t * gpt.d_model)


needs_cuda_plugin = pytest.mark.skipif(
    not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)),
    reason="the CUDA PJRT plugin is not installed (.ci/run installs jax-cuda12-pjrt)")


@needs_cuda_plugin
@pytest.mark.slow
def test_tiny_compiles_for_an_h100_node_with_the_triton_kernels_by_name(tmp_path):
  report, printed = _compile(tmp_path, "tiny.py", "h100:8",
                             "--config.model.attention_impl=pallas_gpu")
  assert report["attention"] == "pallas_gpu" and report["num_chips"] == 8
  assert report["chip"] == "NVIDIA H100 SXM"
  assert report["train"]["kernels"]["triton"] >= 3       # forward, dq, dkv in the train step
  assert report["train"]["kernels"]["mosaic"] == 0
  assert report["fits"] and "pallas_gpu" in printed


# A python whose jax finds cuDNN: the CUDA plugin with its pip-packaged libraries, kept out of the
# test environment (it prints a CUDA-init error on every CPU start); .ci/run makes one.
CUDA_PYTHON = os.environ.get("SOFTMAX_ONE_CUDA_PYTHON")
needs_cudnn = pytest.mark.skipif(
    not CUDA_PYTHON,
    reason="no python with cuDNN: set SOFTMAX_ONE_CUDA_PYTHON to one with "
           "jax-cuda12-plugin[with-cuda] installed (.ci/run makes .ci/cuda-venv)")


@needs_cudnn
@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["softmax1", "softmax"])
def test_the_paper_config_compiles_for_an_h100_node_with_cudnn_attention(tmp_path, softmax):
  """Two layers of gpt2-60m (bf16, packed documents: segment ids) for h100:8, by default."""
  cmd, out = _compile_command(tmp_path, f"gpt2.py:60m,{softmax},orthoadam", "h100:8",
                              "--config.model.num_layers=2")
  proc = subprocess.run([CUDA_PYTHON, *cmd[1:]], capture_output=True, text=True, cwd=REPO,
                        env=cpu_env(1), timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["attention"] == "cudnn", report["attention"]
  # One forward and one backward cuDNN call per layer in the train step, one per layer in eval.
  assert report["train"]["kernels"] == {"mosaic": 0, "triton": 0, "mosaic_gpu": 0, "cudnn": 4}
  assert report["eval"]["kernels"]["cudnn"] == 2
  assert "cudnn (train step: 4 cuDNN attention calls, 0 Triton, 0 Mosaic)" in proc.stdout


def test_gpu_target_description_carries_the_chip():
  from softmax_one_jax.training import chips, gpu_targets  # pylint: disable=import-outside-toplevel
  h200 = chips.CHIPS["NVIDIA H200"]
  text = gpu_targets.gpu_target_config(h200)
  assert f"device_memory_size: {141 * 2**30}" in text and "memory_bandwidth: 4800000000000" in text
  assert 'device_description_str: "NVIDIA H200"' in text and "major: 9" in text
  node = gpu_targets.parse_gpu_topology("h200:4x8")
  assert (node.num_chips, node.topology, node.chip) == (32, "1x4x8", h200)
  with pytest.raises(ValueError, match="h100:8"):
    gpu_targets.parse_gpu_topology("h100:eight")
