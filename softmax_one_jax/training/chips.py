"""What one accelerator chip can do, from vendors' published figures, and TPU topology names.

``chip_for(device.device_kind)`` gives the peak numbers a roofline needs;
``parse_topology("v5e:4x4")`` says which chip and how many of them a TPU slice has, and which
``get_topology_desc`` arguments give one compile-only device per chip; ``"2xv5e:4x4"`` names two
such slices joined over the data-centre network (DCN).

Conventions, the same for every row of the table:

- ``peak_flops``: dense bf16 matrix FLOP/s per chip (NVIDIA's datasheets quote bf16 "with sparsity":
  the dense figure is half of it).
- ``hbm_bytes``: HBM capacity per chip, the vendor's "GB"/"GiB" figure read as GiB (2**30 bytes),
  which is what the memory stacks hold (an H100 reports 79.6 GiB usable of its "80GB").
- ``hbm_bandwidth``: HBM bytes/s per chip, vendor figure (decimal: 1 GB/s = 1e9 B/s).
- ``interconnect_bandwidth``: ICI / NVLink bytes/s per chip in ONE direction, summed over all the
  chip's links, i.e. half the "bidirectional" figure that Google's current TPU pages and NVIDIA's
  NVLink figures quote (Google's older pages quote this one-direction figure in Gbps). A device
  receives its all-gather's output over this bandwidth, which is what ``hlo.roofline`` divides by.
- ``dcn_bandwidth``: data-centre network bytes/s per chip between slices (a host's NICs over its
  chips), where Google publishes the NICs; None elsewhere.

Example:
  >>> chip_for("TPU v5 lite").peak_flops
  197000000000000.0
  >>> t = parse_topology("v5e:4x4")
  >>> t.chip.name, t.num_chips
  ('TPU v5e', 16)
  >>> parse_topology("2xv5e:4x4").total_chips
  32
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from softmax_one_jax.errors import ConfigError

_GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's peak figures (units in the module docstring) and where they come from.

  Example:
    >>> chip_for("NVIDIA H200").hbm_bandwidth
    4800000000000.0
  """
  name: str
  platform: str  # "tpu" | "gpu", as jax names the platform
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  interconnect_bandwidth: float
  source: str
  # Data-centre network (DCN) bytes/s per chip, one direction: the host's NICs shared by its
  # chips; what crosses slices travels over it. None where no figure is published.
  dcn_bandwidth: float | None = None


_GOOGLE_V5P_BLOG = "cloud.google.com/blog 'Introducing Cloud TPU v5p' (Dec 2023)"

# device_kind, exactly as jax reports it -> chip.
CHIPS: Mapping[str, Chip] = {
    "TPU v4": Chip(
        "TPU v4", "tpu", 275e12, 32 * _GiB, 1200e9, 300e9,
        "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, HBM2 32 GiB at 1200 GBps; ICI 2400 Gbps "
        f"per chip from the v4/v5p comparison in {_GOOGLE_V5P_BLOG} (the v4 page gives none)"),
    "TPU v5 lite": Chip(
        "TPU v5e", "tpu", 197e12, 16 * _GiB, 819e9, 200e9,
        "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GiB HBM at 819 GBps, bidirectional "
        "ICI 400 GBps per chip (= 1600 Gbps one way, the page's older figure); DCN: 2 x 100 "
        "Gbps NICs per 8-chip host (6.4 Tbps per 256-chip pod) = 25 Gbps per chip",
        dcn_bandwidth=25e9 / 8),
    "TPU v5": Chip(
        "TPU v5p", "tpu", 459e12, 95 * _GiB, 2765e9, 600e9,
        "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GiB HBM at 2765 GBps, bidirectional "
        "ICI 1200 GBps per chip (= 4800 Gbps one way, the page's older figure)"),
    "TPU v6 lite": Chip(
        "TPU v6e", "tpu", 918e12, 32 * _GiB, 1640e9, 400e9,
        "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GB HBM at 1640 GBps (some versions "
        "of the page: 1600), bidirectional ICI 800 GBps per chip (= 3200 Gbps one way; one "
        "version of the page said 3584 Gbps)"),
    "NVIDIA H100 80GB HBM3": Chip(
        "NVIDIA H100 SXM", "gpu", 989.5e12, 80 * _GiB, 3.35e12, 450e9,
        "nvidia.com/en-us/data-center/h100 (H100 SXM): bf16 Tensor Core 1979 TFLOPS with "
        "sparsity (dense: half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional"),
    "NVIDIA H200": Chip(
        "NVIDIA H200 SXM", "gpu", 989.5e12, 141 * _GiB, 4.8e12, 450e9,
        "nvidia.com/en-us/data-center/h200 (H200 SXM): bf16 Tensor Core 1979 TFLOPS with "
        "sparsity (dense: half), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional"),
}


def chip_for(device_kind: str) -> Chip:
  """The chip whose ``device_kind`` (``jax.devices()[0].device_kind``) this is.

  Args:
    device_kind: the string jax reports, e.g. "TPU v5 lite" or "NVIDIA H100 80GB HBM3".

  Returns:
    The ``Chip`` row of ``CHIPS``.

  Raises:
    ValueError: the kind is not in the table; the message lists the known kinds.

  Example:
    >>> chip_for("TPU v5").name
    'TPU v5p'
  """
  chip = CHIPS.get(device_kind.strip())
  if chip is None:
    raise ConfigError(
        f"Unknown device_kind {device_kind!r}: no peak figures for it. Known kinds: "
        f"{', '.join(repr(k) for k in CHIPS)}. Add a row to softmax_one_jax.training.chips.CHIPS "
        "with its public source to support it.")
  return chip


# Topology generation prefix -> (device_kind, whether the torus is 2-D).
_TPU_GENERATIONS: Mapping[str, tuple[str, bool]] = {
    "v4": ("TPU v4", False),
    "v5e": ("TPU v5 lite", True),
    "v5p": ("TPU v5", False),
    "v6e": ("TPU v6 lite", True),
}
# libtpu's default host shape for compile-only topologies; smaller slices must say theirs.
_DEFAULT_HOST_BOUNDS = (2, 2, 1)


class Topology(NamedTuple):
  """TPU slices named as ``get_topology_desc`` names them: one, or several joined over DCN.

  Attributes:
    name: one slice's topology name, e.g. "v5e:4x4" (``get_topology_desc``'s ``topology_name``).
    chip: the chip of every device.
    dims: chips along each torus axis of one slice, e.g. ``(4, 4)``.
    num_chips: chips of one slice, ``prod(dims)``.
    desc_kwargs: extra keyword arguments for ``jax.experimental.topologies.get_topology_desc`` so
      that it returns one device per chip, as jax shows a real slice of this kind (v4 needs
      ``chip_config_name="megacore"``, else each of its two TensorCores is a device; a slice
      smaller than a 2x2 host needs ``chips_per_host_bounds``; several slices need
      ``num_slices``, which gives every device a ``slice_index``).
    num_slices: how many such slices, joined over DCN (1: a single slice).
  """
  name: str
  chip: Chip
  dims: tuple[int, ...]
  num_chips: int
  desc_kwargs: dict[str, Any]
  num_slices: int = 1

  @property
  def platform(self) -> str:
    """The jax platform, "tpu"."""
    return self.chip.platform

  @property
  def total_chips(self) -> int:
    """Chips of all the slices together."""
    return self.num_chips * self.num_slices


def split_slice_count(name: str) -> tuple[int, str]:
  """Splits ``"<n>x<slice>"`` into the slice count and the slice's name; 1 without a count.

  Example:
    >>> split_slice_count("2xv5e:4x4"), split_slice_count("v5e:4x4")
    ((2, 'v5e:4x4'), (1, 'v5e:4x4'))
  """
  name = name.strip()
  match = re.fullmatch(r"(\d+)x([a-z].*)", name)
  if match is None:
    return 1, name
  count = int(match.group(1))
  if count < 1:
    raise ConfigError(
        f"Topology {name!r} asks for {count} slices: write '<n>x<generation>:<dims>' with n >= 1, "
        "e.g. '2xv5e:4x4' (two v5e 4x4 slices over DCN), or the slice alone ('v5e:4x4').")
  return count, match.group(2)


def parse_topology(name: str) -> Topology:
  """Parses TPU topology names such as "v5e:4x4", "v5p:2x2x2", "v4:2x2x1", "v6e:2x2" or, for
  several slices over DCN, "2xv5e:4x4".

  Every dimension counts chips (for v4 and v5p too, whose chips have two TensorCores each).

  Args:
    name: ``"[<n>x]<generation>:<dims>"``: optionally the number of slices ``n`` (default 1), then
      generation one of v4, v5e, v5p, v6e; dims ``AxB`` for the 2-D tori (v5e, v6e; ``AxBx1`` is
      accepted) and ``AxB`` or ``AxBxC`` for v4 and v5p, the dims of ONE slice.

  Returns:
    The ``Topology``; compile-only devices for it, one per chip, come from
    ``get_topology_desc(platform="tpu", topology_name=t.name, **t.desc_kwargs).devices``.

  Raises:
    ValueError: an unknown generation, malformed dimensions or slice count.

  Example:
    >>> parse_topology("v4:2x2x1").desc_kwargs
    {'chip_config_name': 'megacore'}
    >>> parse_topology("v5e:1x1").desc_kwargs
    {'chips_per_host_bounds': (1, 1, 1)}
    >>> parse_topology("2xv5e:4x4").desc_kwargs
    {'num_slices': 2}
  """
  num_slices, slice_name = split_slice_count(name)
  generation, sep, shape = slice_name.partition(":")
  known = ", ".join(f"{g}:..." for g in _TPU_GENERATIONS)
  if not sep or generation not in _TPU_GENERATIONS:
    raise ConfigError(
        f"Unknown TPU topology {name!r}: expected '[<n>x]<generation>:<dims>' with generation one "
        f"of {known}, e.g. 'v5e:4x4', 'v5p:2x2x2' or '2xv5e:4x4' (two slices over DCN).")
  kind, two_d = _TPU_GENERATIONS[generation]
  parts = shape.split("x")
  if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) not in (2, 3):
    raise ConfigError(
        f"Topology {name!r} has dims {shape!r}: expected 2 or 3 positive integers joined by 'x', "
        "e.g. '4x4' or '2x2x2'.")
  dims = tuple(int(p) for p in parts)
  if two_d and len(dims) == 3 and dims[2] != 1:
    raise ConfigError(
        f"Topology {name!r}: {generation} chips form a 2-D torus; give 'AxB' (or 'AxBx1').")
  desc_kwargs: dict[str, Any] = {}
  if generation == "v4":
    desc_kwargs["chip_config_name"] = "megacore"
  dims3 = (dims + (1,))[:3]
  bounds = tuple(min(d, h) for d, h in zip(dims3, _DEFAULT_HOST_BOUNDS))
  if bounds != _DEFAULT_HOST_BOUNDS:
    desc_kwargs["chips_per_host_bounds"] = bounds
  # Only several slices need it: libtpu then gives each device its slice_index.
  if num_slices > 1:
    desc_kwargs["num_slices"] = num_slices
  return Topology(slice_name, chip_for(kind), dims, math.prod(dims), desc_kwargs, num_slices)
