"""The logical-axis rules table: mapping, replication fallbacks, mesh shape resolution."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from softmax_one_jax.rundir import abstract_model, model_config_from, param_shardings
from softmax_one_jax.training import mesh as mesh_lib
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
