"""Reading compiled programs: collectives counted from shapes by hand, kernels, chips, roofline.

The CPU tests compile on the 8 virtual devices; the TPU tests compile for a v5e:2x2 slice from
this CPU machine (compile-only devices from libtpu), so they run wherever libtpu is installed.
"""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from softmax_one_jax.training import chips, hlo

# A compile-only TPU topology must not query the GCE metadata server, and several processes
# (pytest-xdist workers) may load libtpu at once when none of them drives a real TPU.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _cpu_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.devices("cpu")[:8]), ("x",))


def _compile_text(fn, mesh, in_specs, out_specs, *args: jax.ShapeDtypeStruct) -> str:
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  return jax.jit(mapped).lower(*args).compile().as_text()


def _arg(mesh, shape, dtype, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def test_each_collective_counted_with_its_result_bytes_on_cpu():
  mesh = _cpu_mesh()

  def f(a, b, c, d, e):
    return (jax.lax.all_gather(a, "x", tiled=True),              # f32[8,16] -> f32[64,16]
            jax.lax.psum(b, "x"),                                # s8[8,16]
            jax.lax.psum_scatter(c, "x", tiled=True),            # u16[8,32] -> u16[1,32]
            jax.lax.ppermute(d, "x", [(i, (i + 1) % 8) for i in range(8)]),  # s32[8,16]
            jax.lax.all_to_all(e, "x", 0, 0, tiled=True))        # f32[8,24], tuple of 8 [1,24]

  shapes = [((64, 16), jnp.float32), ((64, 16), jnp.int8), ((64, 32), jnp.uint16),
            ((64, 16), jnp.int32), ((64, 24), jnp.float32)]
  text = _compile_text(f, mesh, (P("x"),) * 5, (P(), P(), P("x"), P("x"), P("x")),
                       *[_arg(mesh, s, d, P("x")) for s, d in shapes])
  stats = hlo.collective_stats(text)
  assert stats["all-gather"] == (1, 64 * 16 * 4)
  assert stats["all-reduce"] == (1, 8 * 16 * 1)
  assert stats["reduce-scatter"] == (1, 1 * 32 * 2)
  assert stats["collective-permute"] == (1, 8 * 16 * 4)
  assert stats["all-to-all"] == (1, 8 * 24 * 4)
  assert stats["ragged-all-to-all"] == (0, 0)


def test_collectives_in_loops_count_once_per_trip_on_cpu():
  mesh = _cpu_mesh()

  def f(a):
    def inner(c, _):
      return jax.lax.psum(c, "x") * 0.5, None                   # f32[8,16], 7 trips

    def outer(c, _):
      c, _ = jax.lax.scan(inner, c, None, length=7)
      return jax.lax.all_gather(c, "x", tiled=True)[:8] + 1.0, None   # f32[64,16], 3 trips

    c, _ = jax.lax.scan(outer, a, None, length=3)
    return jax.lax.fori_loop(0, 5, lambda i, c: jax.lax.psum(c, "x"), c)  # 5 more psums

  text = _compile_text(f, mesh, P("x"), P(), _arg(mesh, (64, 16), jnp.float32, P("x")))
  stats = hlo.collective_stats(text)
  assert stats["all-reduce"] == (3 * 7 + 5, (3 * 7 + 5) * 8 * 16 * 4)
  assert stats["all-gather"] == (3, 3 * 64 * 16 * 4)
  assert sorted(hlo.while_trip_counts(text).values()) == [3, 5, 7]


def test_loop_of_unknown_length_counts_its_body_once_on_cpu():
  mesh = _cpu_mesh()

  def f(a, n):
    def body(carry):
      i, c = carry
      return i + 1, jax.lax.psum(c, "x")
    return jax.lax.while_loop(lambda carry: carry[0] < n[0], body, (0, a))[1]

  text = _compile_text(f, mesh, (P("x"), P()), P(), _arg(mesh, (64, 16), jnp.float32, P("x")),
                       _arg(mesh, (1,), jnp.int32, P()))
  assert list(hlo.while_trip_counts(text).values()) == [None]
  assert hlo.collective_stats(text)["all-reduce"] == (1, 8 * 16 * 4)


def test_async_pair_counts_once_with_the_done_shape():
  # The form of XLA's GPU async collectives, for 8 devices gathering f32[8,16] along dimension 0
  # and summing it: all-gather-start's result holds both the operand and the output buffer.
  text = """HloModule m, entry_computation_layout={(f32[8,16]{1,0})->f32[64,16]{1,0}}

ENTRY %main (p: f32[8,16]) -> f32[64,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %all-gather-start = (f32[8,16]{1,0}, f32[64,16]{1,0}) all-gather-start(%p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %all-reduce-start = f32[8,16]{1,0} all-reduce-start(%p), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %all-reduce-done = f32[8,16]{1,0} all-reduce-done(%all-reduce-start)
  ROOT %all-gather-done = f32[64,16]{1,0} all-gather-done(%all-gather-start)
}
"""
  stats = hlo.collective_stats(text)
  assert stats["all-gather"] == (1, 64 * 16 * 4)
  assert stats["all-reduce"] == (1, 8 * 16 * 4)


@pytest.mark.parametrize("dtype,np_dtype", [
    ("pred", np.bool_), ("s8", np.int8), ("u8", np.uint8), ("s16", np.int16),
    ("u16", np.uint16), ("bf16", np.float16), ("f16", np.float16), ("s32", np.int32),
    ("u32", np.uint32), ("f32", np.float32), ("s64", np.int64), ("u64", np.uint64),
    ("f64", np.float64), ("c64", np.complex64)])
def test_shape_bytes_matches_numpy_itemsize(dtype, np_dtype):
  want = np.dtype(np_dtype).itemsize * 256 * 2048 + 4 * 3
  assert hlo.shape_bytes(f"({dtype}[256,2048]{{1,0:T(8,128)(2,1)}}, f32[3]{{0}})") == want
  assert hlo.shape_bytes(f"{dtype}[]") == np.dtype(np_dtype).itemsize


def test_memory_report_from_a_compiled_program_and_the_peak_formula():
  x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  report = hlo.memory_report(jax.jit(lambda a: a * 2.0).lower(x).compile())
  assert report["argument_bytes"] == report["output_bytes"] == 128 * 256 * 4
  fake = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=50,
                               alias_size_in_bytes=30, temp_size_in_bytes=7,
                               generated_code_size_in_bytes=9)
  assert hlo.memory_report(fake) == {"argument_bytes": 100, "output_bytes": 50, "alias_bytes": 30,
                                     "temp_bytes": 7, "generated_code_bytes": 9,
                                     "peak_bytes": 127}


def test_roofline_on_hand_numbers():
  chip = chips.Chip("hand", "tpu", peak_flops=100.0, hbm_bytes=1, hbm_bandwidth=10.0,
                    interconnect_bandwidth=5.0, source="test")
  r = hlo.roofline(flops=300.0, hbm_bytes=20.0, collective_bytes=5.0, chip=chip)
  assert (r.compute_s, r.memory_s, r.comm_s) == (3.0, 2.0, 1.0)
  assert (r.step_s, r.step_overlap_s, r.bound) == (4.0, 3.0, "compute")
  r = hlo.roofline(flops=100.0, hbm_bytes=50.0, collective_bytes=40.0, chip=chip)
  assert (r.step_s, r.step_overlap_s, r.bound) == (13.0, 8.0, "communication")
  assert hlo.roofline(0.0, 50.0, 0.0, chip).bound == "memory"
  with pytest.raises(ValueError, match="flops=-1"):
    hlo.roofline(-1.0, 0.0, 0.0, chip)


def test_chip_for_knows_the_table_and_names_the_known_kinds_otherwise():
  assert chips.chip_for("TPU v5 lite").name == "TPU v5e"
  assert chips.chip_for("NVIDIA H100 80GB HBM3").platform == "gpu"
  for chip in chips.CHIPS.values():
    assert chip.peak_flops > 0 and chip.hbm_bytes > 0 and chip.source
    assert chip.hbm_bandwidth > 0 and chip.interconnect_bandwidth > 0
  with pytest.raises(ValueError, match=r"TPU v7.*'TPU v5 lite'.*'NVIDIA H200'"):
    chips.chip_for("TPU v7")


@pytest.mark.parametrize("name,kind,dims", [
    ("v5e:4x4", "TPU v5 lite", (4, 4)), ("v5p:2x2x2", "TPU v5", (2, 2, 2)),
    ("v4:2x2x1", "TPU v4", (2, 2, 1)), ("v6e:2x2", "TPU v6 lite", (2, 2))])
def test_parse_topology(name, kind, dims):
  t = chips.parse_topology(name)
  assert (t.chip, t.dims, t.num_chips, t.platform) == (
      chips.chip_for(kind), dims, int(np.prod(dims)), "tpu")


@pytest.mark.parametrize("bad", ["v7x:2x2", "v5e", "v5e:4x4x2", "v5p:2xq", "v5e:0x4", "v4:2"])
def test_parse_topology_rejects(bad):
  with pytest.raises(ValueError, match="opolog"):
    chips.parse_topology(bad)


@pytest.fixture(scope="module")
def tpu_topology():
  """``get_topology_desc`` on this CPU machine, or a skip where libtpu is not installed."""
  pytest.importorskip("libtpu", reason="libtpu is not installed: no compile-only TPU devices")
  from jax.experimental import topologies

  def devices(name: str, **kwargs) -> list:
    return topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices
  return devices


@pytest.mark.parametrize("name", ["v5e:2x2", "v5e:1x1", "v5p:2x2x1", "v4:2x2x1", "v6e:2x2"])
def test_topology_gives_one_device_per_chip_of_its_kind(tpu_topology, name):
  t = chips.parse_topology(name)
  devices = tpu_topology(t.name, **t.desc_kwargs)
  assert len(devices) == t.num_chips
  assert {chips.chip_for(d.device_kind) for d in devices} == {t.chip}


def test_pallas_tpu_kernel_is_a_mosaic_kernel(tpu_topology):
  from jax.experimental import pallas as pl

  def add_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]

  def add(x, y):
    return pl.pallas_call(add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x, y)

  device = tpu_topology("v5e:2x2")[0]
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  text = jax.jit(add).lower(x, x).compile().as_text()
  assert hlo.custom_kernels(text) == {"mosaic": 1, "triton": 0, "mosaic_gpu": 0, "cudnn": 0}
  assert hlo.custom_kernels(_compile_text(
      lambda a: a, _cpu_mesh(), P("x"), P("x"), _arg(_cpu_mesh(), (8,), jnp.float32, P("x")))
  )["mosaic"] == 0


def test_tpu_collectives_and_loop_trips_without_known_trip_count(tpu_topology):
  mesh = jax.sharding.Mesh(np.array(tpu_topology("v5e:2x2")), ("x",))

  def f(a):
    g = jax.lax.all_gather(a, "x", tiled=True)                  # bf16[64,512] -> [256,512]
    c, _ = jax.lax.scan(lambda c, _: (jax.lax.psum(c, "x") * 0.5, None), a, None, length=7)
    _, c = jax.lax.while_loop(lambda s: s[0] < 10,                # i = 0, 3, 6, 9: 4 trips
                              lambda s: (s[0] + 3, jax.lax.psum(s[1], "x") * 0.5), (0, c))
    return g.sum() + c.sum()

  text = _compile_text(f, mesh, P("x"), P(), _arg(mesh, (256, 512), jnp.bfloat16, P("x")))
  assert '"known_trip_count"' not in text  # the TPU back end drops it: the loops are read
  assert sorted(hlo.while_trip_counts(text).values()) == [4, 7]
  stats = hlo.collective_stats(text)
  assert stats["all-gather"] == (1, 256 * 512 * 2)
  assert stats["all-reduce"] == (7 + 4, (7 + 4) * 64 * 512 * 2)


def test_tpu_overlapped_all_gathers_count_once(tpu_topology):
  # Each of M microbatches gathers each of L fsdp-sharded weights for the forward pass and again
  # for the backward pass (the scan keeps the sharded weight as its residual). XLA splits the
  # backward gathers into start / continuation / done fusions that each hold a copy of the op.
  mesh = jax.sharding.Mesh(np.array(tpu_topology("v5e:2x2")), ("fsdp",))
  num_layers, d, microbatches = 4, 1024, 3

  def loss(ws, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
    return (h.astype(jnp.float32) ** 2).mean()

  def step(ws, xs):
    def accumulate(g, x):
      return g + jax.grad(loss)(ws, x), None
    g, _ = jax.lax.scan(accumulate, jnp.zeros_like(ws), xs)
    return ws - 0.1 * g

  ws = _arg(mesh, (num_layers, d, d), jnp.bfloat16, P(None, "fsdp"))
  xs = _arg(mesh, (microbatches, 256, d), jnp.bfloat16, P(None, "fsdp"))
  text = jax.jit(step, donate_argnums=0).lower(ws, xs).compile().as_text()
  assert "AsyncCollectiveStart" in text
  gathers = 2 * num_layers * microbatches
  assert hlo.collective_stats(text)["all-gather"] == (gathers, gathers * d * d * 2)
