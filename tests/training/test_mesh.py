"""The logical-axis rules table: mapping, replication fallbacks, mesh shape resolution, and the
hybrid mesh of several slices."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from softmax_one_jax.rundir import abstract_model, model_config_from, param_shardings
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.config import validate_config
from tests.training._micro import micro_config


def test_resolve_mesh_shape():
  assert mesh_lib.resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
  assert mesh_lib.resolve_mesh_shape(2, 2, -1, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="At most one mesh axis may be -1"):
    mesh_lib.resolve_mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="not a multiple"):
    mesh_lib.resolve_mesh_shape(3, -1, 1, 8)
  with pytest.raises(ValueError, match="mesh.tensor=0 is invalid"):
    mesh_lib.resolve_mesh_shape(1, 1, 0, 8)


def test_rules_map_logical_names_and_fall_back_to_replication():
  mesh = mesh_lib.make_mesh(1, 4, 2)
  spec = lambda names, shape: mesh_lib.logical_to_mesh_spec(names, shape, mesh)
  assert spec(("vocab", "embed"), (512, 64)) == P("tensor", "fsdp")
  assert spec(("embed", "mlp"), (64, 256)) == P("fsdp", "tensor")
  assert spec(("embed", "mlp"), (6, 256)) == P(None, "tensor")         # 6 % 4: replicated
  assert spec(("heads", "embed"), (3, 64)) == P(None, "fsdp")           # 3 % 2: replicated
  assert spec(("embed",), (64,)) == P("fsdp")
  assert spec((None, "embed"), (32, 64)) == P(None, "fsdp")
  assert spec(("batch", None), (8, 16)) == P("fsdp")                    # data axis has size 1
  assert spec((), ()) == P()
  # An axis is used at most once per array.
  assert spec(("heads", "mlp"), (8, 8)) == P("tensor")
  full = mesh_lib.make_mesh(2, 2, 2)
  assert mesh_lib.logical_to_mesh_spec(("batch",), (8,), full) == P(("data", "fsdp"))
  assert mesh_lib.logical_to_mesh_spec(("batch",), (6,), full) == P("data")
  with pytest.raises(ValueError, match="no entry in LOGICAL_AXIS_RULES"):
    spec(("nonsense",), (8,))


def test_model_parameters_get_shardings_from_their_annotations():
  cfg = model_config_from(micro_config(norm="scalar_rmsnorm"), 512)
  _, abstract, _ = abstract_model(cfg)
  mesh = mesh_lib.make_mesh(1, 4, 2)
  shardings = param_shardings(abstract, mesh)
  flat = {jax.tree_util.keystr(k).removesuffix(".value"): v.spec
          for k, v in jax.tree_util.tree_leaves_with_path(shardings)}
  assert flat["['embed']['embedding']"] == P("tensor", "fsdp")
  assert flat["['blocks'][0]['attn']['qkv_proj']['kernel']"] == P("fsdp", "tensor")  # [D, K, ...]
  assert flat["['blocks'][0]['attn']['o_proj']['kernel']"] == P("tensor", "fsdp")
  assert flat["['blocks'][0]['mlp']['down_proj']['kernel']"] == P("tensor", "fsdp")
  assert flat["['blocks'][0]['attn_norm']['scale']"] == P()          # scalar gain


# --- several slices: the data axis across them (DCN), fsdp and tensor inside one (ICI) ---

@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What the mesh needs of a device: an id, its slice, a platform jax lays out by reshaping."""
  id: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "fake"


def _interleaved(num: int, slices: int) -> list[FakeDevice]:
  """Devices listed with their slices interleaved, so that a plain reshape would mix them."""
  return [FakeDevice(i, i % slices) for i in range(num)]


def _row_slices(mesh) -> list[set[int]]:
  return [{d.slice_index for d in row.flat} for row in mesh.devices]


def test_resolve_hybrid_shape_splits_data_over_the_slices():
  assert mesh_lib.resolve_hybrid_shape(2, -1, 1, 0, 32, 2) == ((1, 16, 1), (2, 1, 1))
  assert mesh_lib.resolve_hybrid_shape(4, -1, 2, 2, 32, 2) == ((2, 4, 2), (2, 1, 1))
  assert mesh_lib.resolve_hybrid_shape(-1, 8, 1, 0, 32, 2) == ((2, 8, 1), (2, 1, 1))
  assert mesh_lib.resolve_hybrid_shape(1, -1, 1, 0, 8, 1) == ((1, 8, 1), (1, 1, 1))
  assert mesh_lib.resolve_hybrid_shape(1, -1, 1, 1, 8, 1) == ((1, 8, 1), (1, 1, 1))
  with pytest.raises(ValueError, match=r"mesh.data=1 does not split over the 2 slices.*"
                                       r"--config.mesh.data=2"):
    mesh_lib.resolve_hybrid_shape(1, -1, 1, 0, 32, 2)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=1 .* 2 slices.*set mesh.dcn_data=0"):
    mesh_lib.resolve_hybrid_shape(2, -1, 1, 1, 32, 2)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=2 .* one slice.*--topology=2xv5e:4x4"):
    mesh_lib.resolve_hybrid_shape(2, -1, 1, 2, 16, 1)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=-1 is invalid"):
    mesh_lib.resolve_hybrid_shape(2, -1, 1, -1, 32, 2)
  with pytest.raises(ValueError, match="do not split evenly into 3 slices"):
    mesh_lib.resolve_hybrid_shape(3, -1, 1, 0, 32, 3)


@pytest.mark.parametrize("data,fsdp,tensor,slices", [(2, -1, 1, 2), (4, 2, -1, 2), (6, -1, 2, 3)])
def test_hybrid_mesh_keeps_every_data_row_inside_one_slice(data, fsdp, tensor, slices):
  devices = _interleaved(8 * slices, slices)
  mesh = mesh_lib.make_mesh(data, fsdp, tensor, devices=devices)
  assert mesh.axis_names == mesh_lib.MESH_AXES and mesh.devices.size == len(devices)
  per_slice = data // slices
  rows = _row_slices(mesh)
  assert all(len(r) == 1 for r in rows), rows                   # a data row: one slice
  assert [r.pop() for r in rows] == [i // per_slice for i in range(data)]  # slice by slice
  assert mesh_lib.dcn_axes(mesh) == {"data": slices, "fsdp": 1, "tensor": 1}
  assert mesh_lib.num_slices(devices) == slices


def test_one_slice_mesh_is_jax_make_mesh():
  mesh = mesh_lib.make_mesh(2, -1, 2)
  want = jax.make_mesh((2, 2, 2), mesh_lib.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  assert mesh.shape == want.shape and (mesh.devices == want.devices).all()
  assert mesh_lib.num_slices(jax.devices()) == 1
  assert mesh_lib.dcn_axes(mesh) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_hybrid_mesh_of_two_compile_only_v5e_slices(tpu_slices):
  devices = tpu_slices("2xv5e:4x4")
  assert len(devices) == 32 and sorted({d.slice_index for d in devices}) == [0, 1]
  mesh = mesh_lib.make_mesh(2, -1, 1, devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 16, "tensor": 1}
  assert _row_slices(mesh) == [{0}, {1}]
  # Inside a slice the layout is the one jax.make_mesh gives that slice alone.
  for s in (0, 1):
    alone = jax.make_mesh((1, 16, 1), mesh_lib.MESH_AXES,
                          devices=[d for d in devices if d.slice_index == s])
    assert [d.id for d in mesh.devices[s].flat] == [d.id for d in alone.devices.flat]
  with pytest.raises(ValueError, match=r"--config.mesh.data=2"):
    mesh_lib.make_mesh(1, -1, 1, devices=devices)


@pytest.fixture(scope="module")
def tpu_slices():
  """``aot.slice_devices`` (libtpu's compile-only devices), or a skip where libtpu is missing."""
  pytest.importorskip("libtpu", reason="libtpu is not installed: no compile-only TPU devices")
  from softmax_one_jax.training import aot  # pylint: disable=import-outside-toplevel
  return aot.slice_devices


def test_config_checks_dcn_data_against_the_slices():
  cfg = micro_config()                     # global batch 8
  validate_config(cfg, num_devices=8, num_slices=1)
  cfg.mesh.data = 2
  validate_config(cfg, num_devices=8, num_slices=2)
  cfg.mesh.dcn_data = 2
  validate_config(cfg, num_devices=8, num_slices=2)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=2 .* one slice"):
    validate_config(cfg, num_devices=8, num_slices=1)
  cfg.mesh.data, cfg.mesh.dcn_data = 1, 0
  with pytest.raises(ValueError, match=r"--config.mesh.data=2"):
    validate_config(cfg, num_devices=8, num_slices=2)
  cfg.mesh.dcn_data = -1
  with pytest.raises(ValueError, match=r"config.mesh.dcn_data=-1 must be an integer >= 0"):
    validate_config(cfg)                   # the field's form, without devices
  del cfg.mesh["dcn_data"]                 # a run saved before the field: one factor per slice
  validate_config(cfg, num_devices=8, num_slices=1)
