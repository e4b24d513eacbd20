"""The grid configs change one factor per axis: the optimizer never changes the norm.

Each family keeps its own norm for every optimizer (tiny and gpt2: layernorm, llama2: rmsnorm);
the paper's pairing of OrthoAdam with a scalar-gain norm is the explicit norm argument.
"""

from __future__ import annotations

import re

import pytest

from experiments.configs import base, bigram_backcopy, gpt2, llama2, tiny
from softmax_one_jax.models.config import NORMS
from softmax_one_jax.training.config import validate_config

# module, argument prefix (the size), the family's own norm
FAMILIES = [(tiny, "", "layernorm"), (gpt2, "60m,", "layernorm"), (llama2, "60m,", "rmsnorm")]


@pytest.mark.parametrize("module,size,own", FAMILIES)
def test_the_optimizer_never_changes_the_norm(module, size, own):
  adamw, ortho = (module.get_config(f"{size}softmax1,{o}") for o in ("adamw", "orthoadam"))
  assert adamw.model.norm == ortho.model.norm == own
  assert (adamw.optimizer.name, ortho.optimizer.name) == ("adamw", "orthoadam")
  # Nothing else in the model differs between the two optimizer cells.
  assert adamw.model.to_dict() == ortho.model.to_dict()
  assert module.get_config().model.norm == own  # the default cell, softmax1 + orthoadam


@pytest.mark.parametrize("module,size,own", FAMILIES)
def test_an_explicit_norm_is_honoured_and_named(module, size, own):
  names = set()
  for norm in NORMS:
    for optimizer in ("adamw", "orthoadam"):
      c = module.get_config(f"{size}softmax1,{optimizer},{norm}")
      validate_config(c, num_devices=8)
      assert (c.model.norm, c.optimizer.name) == (norm, optimizer)
      assert c.name.endswith(f"-{optimizer}") if norm == own else c.name.endswith(f"-{norm}")
      names.add(c.name)
  assert len(names) == 2 * len(NORMS)  # every (optimizer, norm) cell has its own run name
  # Naming the family's own norm is the default cell, under the default cell's name.
  assert module.get_config(f"{size}softmax1,orthoadam,{own}").name == module.get_config(
      f"{size}softmax1,orthoadam").name


@pytest.mark.parametrize("module,arg,norm", [
    (tiny, "softmax1,orthoadam,scalar_layernorm", "scalar_layernorm"),
    (gpt2, "60m,softmax1,orthoadam,scalar_layernorm", "scalar_layernorm"),
    (llama2, "60m,softmax1,orthoadam,scalar_rmsnorm", "scalar_rmsnorm"),
])
def test_the_papers_pairing_is_one_explicit_argument_away(module, arg, norm):
  c = module.get_config(arg)
  assert (c.model.softmax, c.optimizer.name, c.model.norm) == ("softmax1", "orthoadam", norm)
  assert f"``{arg}``" in module.__doc__  # documented where the config is


@pytest.mark.parametrize("module,norm", [(gpt2, "scalar_layernorm"), (llama2, "scalar_rmsnorm")])
def test_the_papers_recipe_is_one_word(module, norm):
  c = module.get_config("60m,paper")
  assert (c.model.softmax, c.optimizer.name, c.model.norm) == ("softmax1", "orthoadam", norm)
  assert c.optimizer.rotation is None   # the default, whole-axis "hadamard"
  assert c.name == module.get_config(f"60m,softmax1,orthoadam,{norm}").name
  assert "``60m,paper``" in module.__doc__


def test_parse_variant_defaults_and_errors():
  assert base.parse_variant("softmax1,orthoadam") == ("softmax1", "orthoadam", "layernorm")
  assert base.parse_variant("softmax,orthoadam", default_norm="rmsnorm") == (
      "softmax", "orthoadam", "rmsnorm")
  assert base.parse_variant(" learned_sink , adamw , scalar_layernorm ") == (
      "learned_sink", "adamw", "scalar_layernorm")
  with pytest.raises(ValueError) as e:
    base.parse_variant("softmax1,orthoadam,batchnorm")
  assert "norm='batchnorm' is not allowed; choose one of " + ", ".join(NORMS) in str(e.value)
  with pytest.raises(ValueError, match=re.escape("must be 'softmax,optimizer[,norm]'")):
    base.parse_variant("softmax1")


@pytest.mark.parametrize("module,size", [(tiny, ""), (gpt2, "60m,"), (llama2, "60m,")])
def test_a_bad_norm_names_the_allowed_values(module, size):
  with pytest.raises(ValueError) as e:
    module.get_config(f"{size}softmax1,orthoadam,scalar_norm")
  assert "norm='scalar_norm' is not allowed; choose one of" in str(e.value)
  for norm in NORMS:
    assert norm in str(e.value)


def test_the_lab_takes_every_norm_and_keeps_layernorm_as_its_default():
  assert bigram_backcopy.NORMS == NORMS
  for norm in NORMS:
    c = bigram_backcopy.get_config(f"softmax1,orthoadam,{norm}")
    assert c.model.norm == norm and c.name == f"bb-softmax1-orthoadam-{norm}-L1"
  assert bigram_backcopy.get_config("softmax1,orthoadam").model.norm == "layernorm"
