"""NVIDIA GPU nodes for ahead-of-time compilation: topology names and XLA's GPU target description.

XLA compiles for a GPU it cannot see from a ``GpuTargetConfigProto`` (the device properties its
cost models and code generators read); with the CUDA PJRT plugin installed (``jax-cuda12-pjrt``
matching the installed jax) and ``JAX_PLATFORMS=cpu``, ``get_topology_desc(platform="cuda",
topology="1xHOSTSxGPUS", target_config=...)`` gives the devices of such a node. Seen working with
jax 0.10.2 and jax-cuda12-pjrt 0.10.2 (Pallas Triton kernels included); fragile across jax
versions (jax issues 23971, 28376).

Device properties below are NVIDIA's published figures for compute capability 9.0 (CUDA C++
Programming Guide, "Compute Capabilities" table; Hopper Tuning Guide) and the H100 / H200 SXM
datasheets (132 SMs, 50 MB L2, 1.98 GHz boost clock).

Example:
  >>> t = parse_gpu_topology("h100:2x8")
  >>> t.num_chips, t.topology
  (16, '1x2x8')
"""

from __future__ import annotations

import re
from typing import NamedTuple

from softmax_one_jax.training.chips import CHIPS, Chip

# topology prefix -> jax's device_kind for that GPU
GPU_KINDS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}

# Compute capability 9.0 limits and the SXM parts' size (the same GH100 die in both).
_SM90 = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 << 10,
             shared_memory_per_core=228 << 10, shared_memory_per_block_optin=227 << 10,
             threads_per_core_limit=2048, registers_per_core_limit=65536,
             registers_per_block_limit=65536, block_dim_limit_x=2**31 - 1,
             block_dim_limit_y=65535, block_dim_limit_z=65535, core_count=132, fpus_per_core=128,
             l2_cache_size=50 << 20, clock_rate_ghz=1.98)
# cuDNN version XLA may assume for library calls (jax's CUDA 12 wheels need cuDNN >= 9.8).
_CUDNN = (9, 8, 0)


class GpuTopology(NamedTuple):
  """A GPU node or cluster: ``hosts`` machines of ``gpus_per_host`` GPUs of one ``chip``."""
  name: str
  chip: Chip
  hosts: int
  gpus_per_host: int

  @property
  def num_chips(self) -> int:
    return self.hosts * self.gpus_per_host

  @property
  def topology(self) -> str:
    """The CUDA plugin's topology string: partitions x hosts per partition x GPUs per host."""
    return f"1x{self.hosts}x{self.gpus_per_host}"


def is_gpu_topology(name: str) -> bool:
  """Whether ``name`` names a GPU node ("h100:8") rather than a TPU slice."""
  return name.split(":")[0].strip().lower() in GPU_KINDS


def parse_gpu_topology(name: str) -> GpuTopology:
  """``"h100:8"`` (one host of 8) or ``"h200:4x8"`` (4 hosts of 8) -> ``GpuTopology``.

  Example:
    >>> parse_gpu_topology("h200:8").chip.name
    'NVIDIA H200 SXM'
  """
  kind, _, dims = name.strip().lower().partition(":")
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)", dims)
  if kind not in GPU_KINDS or match is None or int(match.group(2)) < 1:
    raise ValueError(f"GPU topology {name!r}: expected GPU:N or GPU:HOSTSxN with GPU one of "
                     f"{', '.join(GPU_KINDS)}, e.g. h100:8 (one node) or h100:2x8 (two nodes).")
  return GpuTopology(name.strip(), CHIPS[GPU_KINDS[kind]], int(match.group(1) or 1),
                     int(match.group(2)))


def gpu_target_config(chip: Chip) -> str:
  """XLA's ``GpuTargetConfigProto`` (text format) for one SXM Hopper GPU of ``chip``.

  Example:
    >>> "core_count: 132" in gpu_target_config(CHIPS["NVIDIA H200"])
    True
  """
  fields = dict(_SM90, memory_bandwidth=int(chip.hbm_bandwidth), device_memory_size=chip.hbm_bytes)
  lines = ["gpu_device_info {"]
  lines += [f"  {k}: {v}" for k, v in fields.items()]
  lines += ["  cuda_compute_capability {", "    major: 9", "    minor: 0", "  }", "}",
            'platform_name: "CUDA"',
            "dnn_version_info {", f"  major: {_CUDNN[0]}", f"  minor: {_CUDNN[1]}",
            f"  patch: {_CUDNN[2]}", "}",
            f'device_description_str: "{next(k for k, c in CHIPS.items() if c == chip)}"']
  return "\n".join(lines) + "\n"
