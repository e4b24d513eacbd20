"""Reading a compiled program: collectives, custom kernels, memory, and a roofline estimate.

The input is ``compiled.as_text()`` for ``compiled = jax.jit(f).lower(...).compile()``: optimised,
SPMD-partitioned HLO that ONE device runs, so every shape in it is per device.

Example:
  >>> text = jax.jit(step).lower(*args).compile().as_text()
  >>> collective_stats(text)["all-gather"], custom_kernels(text)["mosaic"]
  (CollectiveStats(count=24, bytes=50331648), 0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from softmax_one_jax.training.chips import Chip

COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
    "ragged-all-to-all")

# custom_call_target -> kernel family. Pallas TPU lowers to Mosaic ("tpu_custom_call"); Pallas
# GPU's Triton lowering uses "__gpu$xla.gpu.triton" up to jaxlib 0.10.2, "triton_kernel_call_ffi"
# after; Pallas Mosaic GPU uses "mosaic_gpu_v2".
KERNEL_TARGETS: dict[str, str] = {
    "tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton",
    "triton_kernel_call_ffi": "triton", "triton_kernel_call": "triton",
    "mosaic_gpu_v2": "mosaic_gpu", "mosaic_gpu": "mosaic_gpu"}
# cuDNN's fused attention: one target per variant ("__cudnn$fmhaSoftmax", its "Backward", ...).
CUDNN_ATTENTION_PREFIX = "__cudnn$fmha"


class CollectiveStats(NamedTuple):
  """Executions of one collective kind per step, and the bytes of their results on one device."""
  count: int
  bytes: int


class _Instr(NamedTuple):
  shape: str
  opcode: str
  args: str  # the text between the opcode's parentheses
  attrs: str  # the text after them

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.args)


class _Module(NamedTuple):
  comps: dict[str, dict[str, _Instr]]  # computation -> instruction name -> instruction
  roots: dict[str, str]  # computation -> its ROOT instruction's name
  entry: list[str]  # the ENTRY computation's name, once read


_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTR = re.compile(r"^\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_CALLED = re.compile(r"\b([a-z_]+)=(%[\w.\-]+|\{%[^}]*\})")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _closing(text: str) -> int:
  """Index just past the parenthesis that closes the one at ``text[0]``."""
  depth = 0
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return i + 1
  return len(text)


def _instruction_lines(hlo_text: str) -> list[str]:
  """The text's lines with each instruction on one line: a Mosaic kernel's backend_config holds
  raw newlines, so its instruction continues on unindented lines."""
  lines: list[str] = []
  for line in hlo_text.splitlines():
    starts_item = (line[:1].isspace() or line.strip() in ("", "}")
                   or line.startswith("HloModule") or _HEADER.match(line))
    if not starts_item and lines and lines[-1][:1].isspace():
      lines[-1] += " " + line
    else:
      lines.append(line)
  return lines


def _parse(hlo_text: str) -> _Module:
  """Splits HLO text into computations of instructions."""
  module, current = _Module({}, {}, []), None
  for line in _instruction_lines(hlo_text):
    if not line[:1].isspace():  # a computation's header, its closing brace, or module metadata
      header = _HEADER.match(line)
      current = header.group(2) if header else None
      if header:
        module.comps[current] = {}
        module.entry.extend([current] if header.group(1) else [])
      continue
    m = _INSTR.match(line) if current else None
    if not m:
      continue
    rest = m.group(3)  # "<shape> <opcode>(<operands>)<attributes>"; a tuple shape has spaces
    split = _closing(rest) if rest.startswith("(") else rest.find(" ")
    shape, tail = rest[:split], rest[split:].lstrip()
    op = re.match(r"([a-z][a-z0-9\-]*)\(", tail)
    if op:
      close = op.end() - 1 + _closing(tail[op.end() - 1:])
      module.comps[current][m.group(2)] = _Instr(shape, op.group(1), tail[op.end():close - 1],
                                                 tail[close:])
      if m.group(1):
        module.roots[current] = m.group(2)
  return module


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, summed over tuple elements; layouts and memory spaces are ignored.

  Example:
    >>> shape_bytes("(bf16[256,2048]{1,0:T(8,128)(2,1)}, f32[], pred[3])")
    1048583
  """
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in ("token", "opaque"):
      bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
      n = math.prod(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
      total += (n * bits + 7) // 8  # sub-byte types (s4, f4e2m1fn) come packed
  return total


def _called(attrs: str) -> list[tuple[str, str]]:
  """``(attribute, computation)`` for each computation an instruction calls."""
  return [(key, name) for key, value in _CALLED.findall(attrs)
          for name in re.findall(r"%([\w.\-]+)", value)]


def _expr(module: _Module, comp: str, name: str, params: list[tuple] | None = None) -> tuple:
  """A scalar as ("const", v) | ("gte", k) | ("add", a, b) | ("compare", dir, a, b) | ("?",).

  Looks through copies, bitcasts, converts and fusions (their parameters substituted);
  ``("gte", k)`` is element k of the computation's tuple parameter: a loop's state.
  """
  ins = module.comps.get(comp, {}).get(name)
  sub = lambda n: _expr(module, comp, n, params)  # noqa: E731
  if ins is None:
    return ("?",)
  if ins.opcode == "constant":
    return ("const", int(ins.args)) if re.fullmatch(r"-?\d+", ins.args) else ("?",)
  if ins.opcode == "parameter":
    index = int(ins.args)
    return params[index] if params is not None and index < len(params) else ("param", index)
  if ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
    return sub(ins.operands[0])
  if ins.opcode == "get-tuple-element" and sub(ins.operands[0])[0] == "param":
    return ("gte", int(re.search(r"index=(\d+)", ins.attrs).group(1)))
  if ins.opcode == "add":
    return ("add", *map(sub, ins.operands))
  if ins.opcode == "compare":
    direction = re.search(r"direction=(\w+)", ins.attrs)
    return ("compare", direction and direction.group(1), *map(sub, ins.operands))
  fused = dict(_called(ins.attrs)).get("calls") if ins.opcode == "fusion" else None
  if fused in module.roots:
    return _expr(module, fused, module.roots[fused], [sub(o) for o in ins.operands])
  return ("?",)


def _trip_count(module: _Module, comp: str, loop: _Instr) -> int | None:
  """Trips of a ``while``: XLA's ``known_trip_count``, else read from a counted loop, else None.

  XLA's TPU back end leaves ``known_trip_count`` out of the compiled text, but scan and
  fori_loop compile to ``for (i = c0; i < n; i += s)``: the condition compares one element of the
  loop state with a constant, the body adds a constant to it, the initial state holds a constant.
  """
  known = _TRIP.search(loop.attrs)
  if known:
    return int(known.group(1))
  called = dict(_called(loop.attrs))
  cond, body = called.get("condition"), called.get("body")
  if cond not in module.roots or body not in module.roots or not loop.operands:
    return None
  test = _expr(module, cond, module.roots[cond])
  if test[0] == "compare" and len(test) == 4 and test[2][0] == "const":
    test = ("compare", {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(test[1]), test[3],
            test[2])
  if test[0] != "compare" or len(test) != 4 or test[2][0] != "gte" or test[3][0] != "const":
    return None
  (_, direction, (_, k), (_, limit)), state = test, module.comps[comp].get(loop.operands[0])
  update = module.comps[body][module.roots[body]]
  if not (state and state.opcode == update.opcode == "tuple"
          and k < min(len(state.operands), len(update.operands))):
    return None
  init = _expr(module, comp, state.operands[k])
  update = _expr(module, body, update.operands[k])
  steps = [t[1] for t in update[1:] if t[0] == "const"] if update[0] == "add" else []
  if init[0] != "const" or ("gte", k) not in update[1:] or len(steps) != 1 or steps[0] == 0:
    return None
  start, step = init[1], steps[0]
  span = {"LT": limit - start, "LE": limit - start + step, "GT": start - limit,
          "GE": start - limit - step}.get(direction)
  if span is None or (step > 0) != (direction in ("LT", "LE")):
    return None
  return max(0, -(-span // abs(step)))


def while_trip_counts(hlo_text: str) -> dict[str, int | None]:
  """Trip count of every ``while`` op (None where it cannot be read), by instruction name.

  Example:
    >>> while_trip_counts(jax.jit(f).lower(x).compile().as_text())  # f: one scan of length 7
    {'while.10': 7}
  """
  module = _parse(hlo_text)
  return {name: _trip_count(module, comp, ins) for comp, instrs in module.comps.items()
          for name, ins in instrs.items() if ins.opcode == "while"}


def _async_head(module: _Module, callee: str, caller: _Instr) -> bool:
  """Whether ``callee`` starts or continues a TPU async collective rather than finishing it.

  XLA's TPU back end splits an overlapped collective into fusions that each hold a copy of it:
  one ending in custom-call "AsyncCollectiveStart", continuations (a "continuation_config" in the
  caller's backend_config), and one ending in "AsyncCollectiveDone"; only that last one counts.
  """
  return '"continuation_config"' in caller.attrs or any(
      ins.opcode == "custom-call" and 'custom_call_target="AsyncCollectiveStart"' in ins.attrs
      for ins in module.comps.get(callee, {}).values())


Tally = dict[str, list[int]]      # kind -> [count, bytes]


def _tally(module: _Module, comp: str, leaf: Callable[[Any], tuple[str, int] | None],
           memo: dict[str, Tally]) -> Tally:
  """``kind -> [count, bytes]`` of the instructions ``leaf`` counts, for one execution of
  ``comp``, its callees included: an op in a ``while`` body or condition once per trip, one in
  any other callee once per call site.

  ``leaf(ins)`` gives ``(kind, bytes)`` for an instruction to count, else None. An async
  collective is a start/done pair whose done ``leaf`` counts; the start, update and done ops are
  not descended into (async-start's callee holds the op, and is).
  """
  if comp in memo:
    return memo[comp]
  totals: Tally = {}
  for ins in module.comps.get(comp, {}).values():
    counted = leaf(ins)
    if counted is not None:
      entry = totals.setdefault(counted[0], [0, 0])
      entry[0] += 1
      entry[1] += counted[1]
    elif not ins.opcode.endswith(("-start", "-update", "-done")) or ins.opcode == "async-start":
      trips = (_trip_count(module, comp, ins) or 1) if ins.opcode == "while" else 1
      for key, callee in _called(ins.attrs):
        if not _async_head(module, callee, ins):
          times = trips if key in ("body", "condition") else 1
          for kind, (count, nbytes) in _tally(module, callee, leaf, memo).items():
            entry = totals.setdefault(kind, [0, 0])
            entry[0] += times * count
            entry[1] += times * nbytes
  memo[comp] = totals
  return totals


def _collective(ins: Any) -> tuple[str, int] | None:
  """A collective's kind and result bytes (the done of an async pair: its shape is the result;
  the start's is a tuple of operand and result buffers)."""
  kind = ins.opcode.removesuffix("-done")
  return (kind, shape_bytes(ins.shape)) if kind in COLLECTIVE_KINDS else None


def _entry_tally(hlo_text: str, leaf: Callable[[Any], tuple[str, int] | None]) -> Tally:
  module = _parse(hlo_text)
  if not module.entry:
    raise ValueError("No ENTRY computation in the HLO text; pass compiled.as_text().")
  return _tally(module, module.entry[0], leaf, {})


def collective_stats(hlo_text: str) -> dict[str, CollectiveStats]:
  """Collectives one device executes per run of the program, by kind.

  Args:
    hlo_text: ``compiled.as_text()``.

  Returns:
    ``{kind: CollectiveStats(count, bytes)}`` for every kind in ``COLLECTIVE_KINDS`` (zeros where
    absent). ``bytes`` sums the results' sizes on one device (an all-gather's gathered output, a
    reduce-scatter's shard; tuple results summed) over executions: an op in a ``while`` body
    (what scan and fori_loop compile to) counts once per trip, or once if the trip count cannot
    be read (see ``while_trip_counts``); one in a fusion, call or conditional branch counts once
    per call site, every branch as if taken.

  Example:
    >>> collective_stats(text)["all-reduce"]  # a psum of f32[8,16] inside a 5-trip fori_loop
    CollectiveStats(count=5, bytes=2560)
  """
  totals = _entry_tally(hlo_text, _collective)
  return {kind: CollectiveStats(*totals.get(kind, (0, 0))) for kind in COLLECTIVE_KINDS}


_MEGASCALE = '_xla_host_transfer_handler_name="xla_megascale_runtime"'
_TRANSFER_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_PAYLOAD = re.compile(r"\(?\s*([a-z][a-z0-9]*\[[^\]]*\])")


def dcn_transfers(hlo_text: str) -> dict[str, CollectiveStats]:
  """Transfers across slices that one device makes per run of the program, by kind.

  A program compiled for several slices sends what crosses slices to the megascale runtime as
  host-transfer ``send``/``recv`` pairs; ``_xla_megascale_transfer_type`` says which collective
  ("ALL_REDUCE" -> "all-reduce"). Each ``send`` counts once, with its payload's bytes, times the
  trips of the ``while`` loops around it (as ``hlo.collective_stats`` counts).

  Example:
    >>> dcn_transfers(compiled.as_text())    # a data-parallel gradient over two slices
    {'all-reduce': CollectiveStats(count=15, bytes=10549248)}
  """
  totals = _entry_tally(hlo_text, _megascale_send)
  return {kind: CollectiveStats(count, nbytes) for kind, (count, nbytes) in totals.items()}


def _megascale_send(ins: Any) -> tuple[str, int] | None:
  """A cross-slice send's collective kind and payload bytes."""
  if ins.opcode != "send" or _MEGASCALE not in ins.attrs:
    return None
  kind = _TRANSFER_TYPE.search(ins.attrs)
  payload = _PAYLOAD.match(ins.shape)
  return (kind.group(1).lower().replace("_", "-") if kind else "send",
          shape_bytes(payload.group(1)) if payload else 0)


def custom_kernels(hlo_text: str) -> dict[str, int]:
  """Custom kernels in the program by family, counting call sites (not executions).

  Returns:
    ``{"mosaic": n, "triton": n, "mosaic_gpu": n, "cudnn": n}``: Pallas TPU (Mosaic) kernels,
    Pallas GPU Triton kernels, Mosaic GPU kernels (``KERNEL_TARGETS``) and cuDNN fused attention
    calls, forward and backward (targets starting with ``CUDNN_ATTENTION_PREFIX``).

  Example:
    >>> custom_kernels(jax.jit(pallas_add).lower(x, y).compile().as_text())  # for a TPU
    {'mosaic': 1, 'triton': 0, 'mosaic_gpu': 0, 'cudnn': 0}
  """
  counts = dict.fromkeys((*KERNEL_TARGETS.values(), "cudnn"), 0)
  for instrs in _parse(hlo_text).comps.values():
    for ins in instrs.values():
      target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
      if ins.opcode != "custom-call" or not target:
        continue
      if target.group(1) in KERNEL_TARGETS:
        counts[KERNEL_TARGETS[target.group(1)]] += 1
      elif target.group(1).startswith(CUDNN_ATTENTION_PREFIX):
        counts["cudnn"] += 1
  return counts


class Roofline(NamedTuple):
  """Seconds per step that each resource alone needs on one chip, and two step estimates.

  ``step_s = max(compute_s, memory_s) + comm_s`` lets communication overlap nothing: the upper
  of the two roofline estimates. ``step_overlap_s = max(compute_s, memory_s, comm_s)`` overlaps
  all three: the lower one. Both assume peak rates, which a real step does not reach.
  ``bound`` names the largest time: "compute" | "memory" | "communication" (ties: that order).
  """
  compute_s: float
  memory_s: float
  comm_s: float
  step_s: float
  step_overlap_s: float
  bound: str


def roofline(flops: float, hbm_bytes: float, collective_bytes: float, chip: Chip) -> Roofline:
  """Roofline times of one device's step: each amount over the chip's peak rate.

  compute_s = flops / peak_flops, memory_s = hbm_bytes / hbm_bandwidth and
  comm_s = collective_bytes / interconnect_bandwidth (one direction's: see ``chips``), with
  flops and hbm_bytes from ``compiled.cost_analysis()`` ("flops", "bytes accessed") and
  collective_bytes the sum of ``collective_stats`` bytes.

  Example:
    >>> r = roofline(197e12, 819e9, 200e9, chip_for("TPU v5 lite"))  # 1 s of each on a v5e
    >>> r.step_s, r.step_overlap_s, r.bound
    (2.0, 1.0, 'compute')
  """
  amounts = {"flops": flops, "hbm_bytes": hbm_bytes, "collective_bytes": collective_bytes}
  for label, value in amounts.items():
    if not value >= 0:
      raise ValueError(f"roofline: {label}={value} must be a non-negative number.")
  times = {"compute": flops / chip.peak_flops, "memory": hbm_bytes / chip.hbm_bandwidth,
           "communication": collective_bytes / chip.interconnect_bandwidth}
  compute_s, memory_s, comm_s = times.values()
  return Roofline(compute_s, memory_s, comm_s, max(compute_s, memory_s) + comm_s,
                  max(times.values()), max(times, key=times.__getitem__))


def memory_report(compiled: Any) -> dict[str, int]:
  """One device's memory for a ``jax.stages.Compiled`` (or its ``memory_analysis()`` result).

  Returns ``{"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
  "generated_code_bytes", "peak_bytes"}`` with ``peak_bytes = argument + output - alias + temp``:
  arguments, outputs and XLA's peak of temporaries live together, and an output donated into an
  argument's buffer (alias) counts once. Generated code (the program binary) is not in the peak.

  Example:
    >>> x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
    >>> memory_report(jax.jit(lambda a: a * 2.0).lower(x).compile())["peak_bytes"]  # on a CPU
    262144
  """
  stats = compiled.memory_analysis() if hasattr(compiled, "memory_analysis") else compiled
  if stats is None:
    raise ValueError("This backend's compiled program has no memory_analysis(); no report.")
  report = {f"{key}_bytes": int(getattr(stats, f"{key}_size_in_bytes"))
            for key in ("argument", "output", "alias", "temp", "generated_code")}
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"]
                          - report["alias_bytes"] + report["temp_bytes"])
  return report
