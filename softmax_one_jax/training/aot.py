"""Ahead-of-time compilation of a run's train and eval steps for a slice this host does not have.

``compile_run(config, "v5e:4x4")`` builds the devices of a TPU slice from libtpu's topology
description (no TPU needed), lays the run's mesh over them, and lowers and compiles the very train
and eval steps ``softmax-one train`` would run there: the model traced under a mesh of TPU devices
takes the TPU paths (splash attention per shard, the platform's OrthoAdam transforms) although this
process's own backend is the CPU. From the compiled programs it reads, per chip: parameter and
optimizer-state bytes, XLA's memory analysis against the chip's HBM, the collectives and their
bytes, the Pallas kernels present, XLA's cost analysis, and a roofline estimate of step time.

Several slices (``"2xv5e:4x4"``) get the hybrid mesh of ``mesh.make_mesh``: the data axis across
slices. XLA then compiles ONE slice's program: its collectives (``hlo.collective_stats``) run
inside the slice, over ICI, and what crosses slices is a pair of host-transfer ``send``/``recv``
ops for the megascale runtime, counted apart by ``hlo.dcn_transfers``.

Example:
  >>> report = compile_run(config, "v5e:2x2")          # config: experiments/configs/gpt2.py:60m,...
  >>> print(format_report(report))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from softmax_one_jax.attention import resolve_implementation
from softmax_one_jax.data import BATCH_KEYS
from softmax_one_jax.training import chips as chips_lib
from softmax_one_jax.training import gpu_targets
from softmax_one_jax.training import hlo
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.config import validate_config
from softmax_one_jax.training.state import build_run
from softmax_one_jax.training.step import jit_eval_step, jit_train_step

TPU_AOT_HINT = ('Compiling for a TPU slice needs libtpu: pip install -e ".[tpu-aot]" (it installs '
                'the libtpu that matches the installed jax).')
GPU_AOT_HINT = ("Compiling for NVIDIA GPUs needs the CUDA PJRT plugin of the installed jax: "
                'pip install "jax-cuda12-pjrt==$(python -c \'import jax; print(jax.__version__)\')"'
                " (no GPU or CUDA libraries needed).")

# libtpu's accelerator-type names, from the slice's chip count (v4 and v5p count TensorCores).
_ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}",
                     "v6e": "v6e-{chips}"}


@dataclasses.dataclass(frozen=True)
class StepReport:
  """What one compiled program costs per chip.

  Attributes:
    compile_s: seconds to lower and compile.
    memory: ``hlo.memory_report`` (bytes: argument, output, alias, temp, generated code, peak).
    collectives: kind -> ``hlo.CollectiveStats`` (count, result bytes per chip).
    kernels: custom kernels in the program (``hlo.custom_kernels``: Mosaic, Triton and Mosaic
      GPU kernels, cuDNN attention calls).
    flops: XLA's cost analysis, FLOPs per chip (Pallas kernels are not costed by XLA).
    bytes_accessed: XLA's cost analysis, HBM bytes per chip.
    dcn: kind -> ``hlo.CollectiveStats`` of the transfers across slices (``hlo.dcn_transfers``);
      empty on one slice.
  """

  compile_s: float
  memory: dict[str, int]
  collectives: dict[str, Any]
  kernels: dict[str, int]
  flops: float
  bytes_accessed: float
  dcn: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def collective_bytes(self) -> int:
    return int(sum(c.bytes for c in self.collectives.values()))

  @property
  def dcn_bytes(self) -> int:
    return int(sum(c.bytes for c in self.dcn.values()))


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """A run's train and eval steps compiled for one slice (every byte figure is per chip)."""

  name: str
  topology: str
  chip: chips_lib.Chip
  num_chips: int
  mesh: dict[str, int]
  attention: str
  num_params: int
  param_bytes: int               # this chip's shard of the parameters
  model_param_bytes: int         # all the parameters, unsharded (collectives are compared to it)
  opt_state_bytes: int           # this chip's shard of the optimizer state
  tokens_per_step: int
  model_flops: float             # per chip per step: 6 N D + attention (PaLM's formula)
  train: StepReport
  eval: StepReport
  roofline: Any                  # hlo.Roofline of the train step (communication: ICI + DCN)
  num_slices: int = 1
  dcn_mesh: dict[str, int] = dataclasses.field(default_factory=dict)  # axis -> slices it spans
  dcn_s: float | None = None     # the train step's DCN seconds; None: no DCN bandwidth figure

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.chip.hbm_bytes

  @property
  def peak_bytes(self) -> int:
    return max(self.train.memory["peak_bytes"], self.eval.memory["peak_bytes"])

  @property
  def collective_ratio(self) -> float:
    """The train step's collective bytes per chip over the whole model's parameter bytes."""
    return self.train.collective_bytes / self.model_param_bytes

  @property
  def mfu(self) -> float:
    """Model FLOPs utilisation at the roofline's (no-overlap) step time."""
    return self.model_flops / (self.roofline.step_s * self.chip.peak_flops)


def _set_libtpu_environment(generation: str, chips: int) -> None:
  """Lets libtpu start on a host that is not a TPU VM, quietly, in several processes at once (it
  takes a host-wide lock by default); sets only what is unset."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE",
                        _ACCELERATOR_TYPE[generation].format(chips=chips, cores=2 * chips))


def slice_devices(topology: str) -> list[Any]:
  """The devices of a TPU slice, e.g. ``"v5e:4x4"`` (16 chips), from libtpu without a TPU, or of
  GPU nodes, e.g. ``"h100:8"`` (``gpu_targets``), from the CUDA plugin without a GPU.

  Raises:
    ValueError: an unknown topology name (says the form).
    RuntimeError: libtpu is not installed (says how to install it).

  Example:
    >>> len(slice_devices("v5e:2x2")), slice_devices("v5e:2x2")[0].device_kind
    (4, 'TPU v5 lite')
  """
  if gpu_targets.is_gpu_topology(topology):
    return _gpu_devices(gpu_targets.parse_gpu_topology(topology))
  slice_ = chips_lib.parse_topology(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(TPU_AOT_HINT)
  _set_libtpu_environment(slice_.name.split(":")[0], slice_.num_chips)
  return list(topologies.get_topology_desc(platform="tpu", topology_name=slice_.name,
                                           **slice_.desc_kwargs).devices)


def _gpu_devices(node: gpu_targets.GpuTopology) -> list[Any]:
  if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
    raise RuntimeError(GPU_AOT_HINT)
  if jax.config.jax_platforms != "cpu":
    raise RuntimeError("Compiling for absent GPUs needs JAX_PLATFORMS=cpu (the CUDA plugin "
                       "otherwise looks for a local GPU); `softmax-one compile` sets it.")
  return list(topologies.get_topology_desc(
      platform="cuda", topology=node.topology,
      target_config=gpu_targets.gpu_target_config(node.chip)).devices)


def with_dcn(roofline: hlo.Roofline, dcn_s: float) -> hlo.Roofline:
  """The roofline with ``dcn_s`` seconds of cross-slice traffic added to its communication: the
  DCN part of a hierarchical reduction waits for its ICI part, so the two add.

  Example:
    >>> with_dcn(hlo.Roofline(1.0, 0.5, 0.2, 1.2, 1.0, "compute"), 1.0).step_s
    2.2
  """
  compute_s, memory_s, comm_s = roofline.compute_s, roofline.memory_s, roofline.comm_s + dcn_s
  times = {"compute": compute_s, "memory": memory_s, "communication": comm_s}
  return hlo.Roofline(compute_s, memory_s, comm_s, max(compute_s, memory_s) + comm_s,
                      max(times.values()), max(times, key=times.__getitem__))


def _per_chip_bytes(abstract_tree: Any) -> int:
  """Bytes of one device's shard of every leaf (``ShapeDtypeStruct`` with a sharding)."""
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return int(total)


def _compile_step(jitted: Any, *abstract_args: Any) -> StepReport:
  t0 = time.perf_counter()
  compiled = jitted.lower(*abstract_args).compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):   # older jax: one dict per program
    cost = cost[0] if cost else {}
  return StepReport(compile_s=compile_s, memory=hlo.memory_report(compiled),
                    collectives=hlo.collective_stats(text), kernels=hlo.custom_kernels(text),
                    flops=float(cost.get("flops", 0.0)),
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                    dcn=hlo.dcn_transfers(text))


def _abstract_batch(batch: int, seq: int, mesh: Any) -> dict[str, jax.ShapeDtypeStruct]:
  sharding = mesh_lib.batch_sharding(mesh, batch)
  return {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "weights" else jnp.int32,
                                  sharding=sharding) for k in BATCH_KEYS}


def model_flops_per_token(model_cfg: Any, num_params: int, seq_len: int) -> float:
  """Training FLOPs per token: ``6 N`` plus causal attention's ``6 L T H_total`` (PaLM, App. B,
  halved for the causal mask), N without the position table.

  Example:
    >>> model_flops_per_token(preset("tiny"), 1_000_000, 128) / 1e6
    6.1...
  """
  c = model_cfg
  positions = c.max_seq_len * c.d_model if c.position == "learned" else 0
  return 6.0 * (num_params - positions) + attention_flops_per_token(c, seq_len)


def attention_flops_per_token(model_cfg: Any, seq_len: int) -> float:
  """Causal attention's training FLOPs per token, ``6 L T H_total`` (the attention matmuls).

  Example:
    >>> attention_flops_per_token(preset("tiny"), 128)   # 4 layers, 4 heads of 32
    393216
  """
  c = model_cfg
  return 6 * c.num_layers * seq_len * c.num_heads * c.head_dim


def step_roofline(xla_flops: float, model_flops: float, hbm_bytes: float,
                  collective_bytes: float, chip: chips_lib.Chip) -> hlo.Roofline:
  """``hlo.roofline`` of a train step whose compute is at least the model's FLOPs.

  XLA's cost analysis counts a loop body once (the fused loss scans over sequence chunks) and
  is absent for GPU programs compiled without a GPU, so the compute time uses the larger of its
  count and ``model_flops`` (a floor: remat adds to it).

  Example:
    >>> step_roofline(0.0, 197e12, 0.0, 0.0, chips_lib.chip_for("TPU v5 lite")).compute_s
    1.0
  """
  return hlo.roofline(max(xla_flops, model_flops), hbm_bytes, collective_bytes, chip)


def compile_run(config: ml_collections.ConfigDict, topology: str) -> CompileReport:
  """Compiles the run's train and eval steps for a TPU slice and measures them (see module doc).

  Args:
    config: a run config (experiments/configs/*.py), validated against the slice's chip count.
    topology: the slice, e.g. "v5e:4x4", or several over DCN, e.g. "2xv5e:4x4" (then
      ``config.mesh.data`` must be a multiple of the slice count: see ``mesh.make_mesh``).

  Returns:
    A ``CompileReport``.
  """
  devices = slice_devices(topology)
  validate_config(config, num_devices=len(devices), process_count=1,
                  num_slices=mesh_lib.num_slices(devices))  # before build_run lays the mesh
  _, config, model_cfg, setup = build_run(config, devices=devices)
  chip = chips_lib.chip_for(devices[0].device_kind)
  b, t = config.global_batch_size, config.seq_len
  train = _compile_step(jit_train_step(setup, config.grad_accum_steps, b),
                        setup.abstract_state, _abstract_batch(b, t, setup.mesh))
  eval_ = _compile_step(jit_eval_step(setup, config.eval_batch_size),
                        setup.abstract_state.params,
                        _abstract_batch(config.eval_batch_size, t, setup.mesh))
  params = jax.tree.leaves(setup.abstract_state.params)
  num_params = sum(math.prod(x.shape) for x in params)
  tokens_per_chip = b * t / len(devices)
  model_flops = model_flops_per_token(model_cfg, num_params, t) * tokens_per_chip
  # Pallas kernels and cuDNN's attention are custom calls that XLA does not cost: their attention
  # FLOPs are added.
  attention_flops = 0.0
  if any(train.kernels.get(k) for k in ("mosaic", "triton", "mosaic_gpu", "cudnn")):
    attention_flops = attention_flops_per_token(model_cfg, t) * tokens_per_chip
  roofline = step_roofline(train.flops + attention_flops, model_flops, train.bytes_accessed,
                           train.collective_bytes, chip)
  slices, dcn_s = mesh_lib.num_slices(devices), None
  if slices > 1 and chip.dcn_bandwidth is not None:
    dcn_s = train.dcn_bytes / chip.dcn_bandwidth
    roofline = with_dcn(roofline, dcn_s)
  return CompileReport(
      name=config.name, topology=topology, chip=chip, num_chips=len(devices),
      mesh=dict(setup.mesh.shape),
      attention=resolve_implementation(
          model_cfg.attention_impl, dtype=model_cfg.dtype, backend=devices[0].platform,
          softmax=model_cfg.softmax, head_dim=model_cfg.head_dim, q_len=t, kv_len=t),
      num_params=int(num_params),
      param_bytes=_per_chip_bytes(setup.abstract_state.params),
      model_param_bytes=int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                for x in params)),
      opt_state_bytes=_per_chip_bytes(setup.abstract_state.opt_state),
      tokens_per_step=b * t, model_flops=model_flops, train=train, eval=eval_,
      roofline=roofline, num_slices=slices,
      dcn_mesh=mesh_lib.dcn_axes(setup.mesh), dcn_s=dcn_s)


def _kernel_calls(kernels: dict[str, int]) -> str:
  """``"4 cuDNN attention calls, 0 Triton, 0 Mosaic"``: what the compiled step calls."""
  return (f"{kernels.get('cudnn', 0)} cuDNN attention calls, {kernels.get('triton', 0)} Triton, "
          f"{kernels.get('mosaic', 0)} Mosaic")


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _collectives_line(step: StepReport) -> str:
  return _stats_line(step.collectives)


def _mib(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def _stats_line(stats: dict[str, Any], unit: Any = _gib) -> str:
  parts = [f"{kind} {c.count} x, {unit(c.bytes)}" for kind, c in sorted(stats.items()) if c.count]
  return "; ".join(parts) or "none"


def _slice_line(r: CompileReport) -> str:
  """``"2xv5e:4x4: 32 x TPU v5e in 2 slices, mesh data=2 (2 across slices) x fsdp=16 x ..."``."""
  slices = f" in {r.num_slices} slices" if r.num_slices > 1 else ""
  axes = []
  for k, v in r.mesh.items():
    across = r.dcn_mesh.get(k, 1)
    axes.append(f"{k}={v}" + (f" ({across} across slices, over DCN)" if across > 1 else ""))
  return f"{r.topology}: {r.num_chips} x {r.chip.name}{slices}, mesh " + " x ".join(axes)


def _comm_split(r: CompileReport) -> str:
  """`` (ICI 1.3 ms + DCN 3.4 ms)`` where the communication time holds DCN time."""
  if r.dcn_s is None:
    return ""
  ici_s = r.roofline.comm_s - r.dcn_s
  return f" (ICI {ici_s * 1e3:.1f} ms + DCN {r.dcn_s * 1e3:.1f} ms)"


def _dcn_line(r: CompileReport, step: StepReport, label: str) -> str:
  line = _stats_line(step.dcn, _mib)   # a shard per chip: MiB, where the ICI rows need GiB
  if label == "train" and r.dcn_s is not None:
    line += (f": {r.dcn_s * 1e3:.1f} ms at {r.chip.dcn_bandwidth * 8 / 1e9:.0f} Gbps per chip "
             "(in the roofline's communication)")
  elif label == "train":
    line += f" (no DCN bandwidth for {r.chip.name} in chips.CHIPS: not in the roofline)"
  return line


def format_report(r: CompileReport) -> str:
  """The report as the Markdown that ``softmax-one compile`` prints."""
  headroom = 1.0 - r.peak_bytes / r.chip.hbm_bytes
  fit = (f"fits, {headroom:.0%} headroom" if r.fits else
         f"DOES NOT FIT: {_gib(r.peak_bytes - r.chip.hbm_bytes)} over")
  rl = r.roofline
  ici = " (ICI, inside a slice)" if r.num_slices > 1 else ""
  rows = [
      ("slice", _slice_line(r)),
      ("attention path", f"{r.attention} (train step: {_kernel_calls(r.train.kernels)})"),
      ("parameters", f"{r.num_params / 1e6:,.1f} M; {_gib(r.param_bytes)} per chip"),
      ("optimizer state", f"{_gib(r.opt_state_bytes)} per chip"),
      ("train step memory", f"peak {_gib(r.train.memory['peak_bytes'])} (temporaries "
                            f"{_gib(r.train.memory['temp_bytes'])}) of {_gib(r.chip.hbm_bytes)}"),
      ("eval step memory", f"peak {_gib(r.eval.memory['peak_bytes'])}"),
      ("fits", fit),
      (f"train collectives{ici}", f"{_collectives_line(r.train)} (total "
                                   f"{_gib(r.train.collective_bytes)} = "
                                   f"{r.collective_ratio:.2f}x the model's parameter bytes)"),
      (f"eval collectives{ici}", _collectives_line(r.eval)),
      *([("train DCN transfers", _dcn_line(r, r.train, "train")),
         ("eval DCN transfers", _dcn_line(r, r.eval, "eval"))] if r.num_slices > 1 else []),
      ("custom kernels", f"train {dict(r.train.kernels)}, eval {dict(r.eval.kernels)}"),
      ("compile time", f"train {r.train.compile_s:.0f} s, eval {r.eval.compile_s:.0f} s"),
      ("XLA cost (train)", f"{r.train.flops / 1e12:.2f} TFLOP, "
                           f"{r.train.bytes_accessed / 1e9:.1f} GB accessed" if r.train.flops else
                           "none for this platform: compute time from the model's FLOPs, no "
                           "memory time"),
      ("roofline (train)", f"compute {rl.compute_s * 1e3:.1f} ms, memory {rl.memory_s * 1e3:.1f} ms,"
                           f" communication {rl.comm_s * 1e3:.1f} ms{_comm_split(r)}: "
                           f"{rl.bound}-bound; step "
                           f"{rl.step_s * 1e3:.1f} ms without overlap ({rl.step_overlap_s * 1e3:.1f}"
                           " ms with perfect overlap)"),
      ("throughput", f"{r.tokens_per_step / rl.step_s:,.0f} tokens/s; MFU {r.mfu:.0%} at the "
                     f"roofline, an upper bound ({r.model_flops / 1e12:.2f} model TFLOP per chip "
                     "per step)"),
  ]
  width = max(len(k) for k, _ in rows)
  lines = [f"## {r.name} on {r.topology} (per chip)", "", "| | |", "|---|---|"]
  lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
  return "\n".join(lines)


def report_record(r: CompileReport) -> dict[str, Any]:
  """A JSON-ready summary of the report (one row of the paper-grid table)."""
  def step(s: StepReport) -> dict[str, Any]:
    return {"compile_s": s.compile_s, "memory": s.memory, "kernels": dict(s.kernels),
            "collectives": {k: {"count": c.count, "bytes": c.bytes}
                            for k, c in s.collectives.items()},
            "collective_bytes": s.collective_bytes, "flops": s.flops,
            "bytes_accessed": s.bytes_accessed,
            "dcn": {k: {"count": c.count, "bytes": c.bytes} for k, c in s.dcn.items()},
            "dcn_bytes": s.dcn_bytes}
  return {"name": r.name, "topology": r.topology, "chip": r.chip.name, "num_chips": r.num_chips,
          "num_slices": r.num_slices, "mesh": r.mesh, "dcn_mesh": r.dcn_mesh, "dcn_s": r.dcn_s,
          "attention": r.attention, "num_params": r.num_params,
          "param_bytes": r.param_bytes, "model_param_bytes": r.model_param_bytes,
          "collective_ratio": r.collective_ratio, "opt_state_bytes": r.opt_state_bytes,
          "hbm_bytes": r.chip.hbm_bytes, "peak_bytes": r.peak_bytes, "fits": r.fits,
          "tokens_per_step": r.tokens_per_step, "model_flops": r.model_flops,
          "roofline": dataclasses.asdict(r.roofline) if dataclasses.is_dataclass(r.roofline)
          else r.roofline._asdict(),
          "mfu": r.mfu, "train": step(r.train), "eval": step(r.eval)}
