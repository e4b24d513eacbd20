"""The package's layers (ARCHITECTURE.md): no module imports a layer above its own.

Every module of ``softmax_one_jax`` is parsed with ``ast``; every import in it (top level and
inside functions, ``import x`` and ``from x import y``, relative ones resolved) that names a
module of the package is checked against ``ALLOWED``. Imports inside functions count: a lazy
import still couples the layers, it only hides the cycle.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

PACKAGE = "softmax_one_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

_BOTTOM = {"errors", "runtime", "softmax", "sharding", "checkpoint_reads"}
# layer -> the layers it may import (besides itself), bottom to top; mirrors ARCHITECTURE.md.
# "__init__" is the package's own __init__.py (its public names), reached by
# ``from softmax_one_jax import softmax1``.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "runtime": set(),
    "softmax": {"errors"},
    "sharding": {"errors"},
    "checkpoint_reads": {"errors"},
    "attention": _BOTTOM,
    "optim": _BOTTOM,
    "models": _BOTTOM | {"attention"},
    "data": _BOTTOM,
    "rundir": _BOTTOM | {"attention", "models", "data"},
    "training": _BOTTOM | {"attention", "optim", "models", "data", "rundir"},
    "analysis": _BOTTOM | {"attention", "models", "data", "rundir"},
    "__init__": _BOTTOM | {"attention", "optim"},
    "cli": _BOTTOM | {"attention", "optim", "models", "data", "rundir", "training", "analysis",
                      "__init__"},
}

# Imports that may stay inside a function in the layers that must have none: optional or heavy
# third-party packages only (cli.py keeps jax-heavy imports in its subcommands on purpose).
LAZY_OK = {"torch", "transformers", "datasets", "tqdm", "matplotlib", "tensorboard",
           "tensorboardX", "array_record", "google"}     # google: the GCS client of the ".[gcs]" extra
NO_FUNCTION_IMPORTS = ("training", "analysis", "rundir")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
  """``softmax_one_jax.training.loop`` -> ``training``; the package itself -> ``__init__``."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _is_module(module: str) -> bool:
  path = ROOT.parent.joinpath(*module.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> Iterator[tuple[int, str, bool]]:
  """``(line, imported module, inside a function)`` for every import in the file."""
  module = _module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  tree = ast.parse(path.read_text(), filename=str(path))
  in_function: set[int] = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    inner = id(node) in in_function
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, inner
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      for alias in node.names:  # `from pkg import submodule` imports the submodule
        sub = f"{target}.{alias.name}"
        yield node.lineno, sub if _is_module(sub) else target, inner


def _modules() -> list[pathlib.Path]:
  return sorted(ROOT.rglob("*.py"))


def _internal_edges() -> Iterator[tuple[str, int, str, str]]:
  """``(file, line, importing layer, imported layer)`` for imports of the package's modules."""
  for path in _modules():
    layer = _layer(_module_name(path))
    for line, target, _ in _imports(path):
      if target == PACKAGE or target.startswith(PACKAGE + "."):
        yield str(path.relative_to(ROOT.parent)), line, layer, _layer(target)


def test_every_module_has_a_layer():
  unknown = sorted({_layer(_module_name(p)) for p in _modules()} - set(ALLOWED))
  assert not unknown, f"add these to ALLOWED (and ARCHITECTURE.md): {unknown}"


def test_no_module_imports_a_higher_layer():
  bad = [f"{file}:{line}: {src} imports {dst}" for file, line, src, dst in _internal_edges()
         if dst != src and dst not in ALLOWED.get(src, set())]
  assert not bad, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(bad)


@pytest.mark.parametrize("src,dst", [("training", "analysis"), ("analysis", "training")])
def test_training_and_analysis_are_siblings(src: str, dst: str):
  assert dst not in ALLOWED[src]
  bad = [f"{file}:{line}" for file, line, s, d in _internal_edges() if (s, d) == (src, dst)]
  assert not bad, f"{src} imports {dst} at " + ", ".join(bad)


def test_no_imports_inside_functions_where_there_is_no_cycle_to_dodge():
  bad = []
  for path in _modules():
    if _layer(_module_name(path)) not in NO_FUNCTION_IMPORTS:
      continue
    for line, target, inner in _imports(path):
      if inner and target.split(".")[0] not in LAZY_OK:
        bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {target}")
  assert not bad, "move these imports to the top of their module:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
  fake = tmp_path / PACKAGE
  (fake / "training").mkdir(parents=True)
  (fake / "analysis").mkdir()
  for p in (fake / "__init__.py", fake / "training" / "__init__.py",
            fake / "analysis" / "__init__.py", fake / "analysis" / "outliers.py"):
    p.write_text("")
  (fake / "training" / "loop.py").write_text(
      "def f():\n  from ..analysis import outliers\n  import softmax_one_jax.analysis\n")
  monkeypatch.setitem(globals(), "ROOT", fake)
  edges = {(s, d, line) for _, line, s, d in _internal_edges()}
  assert edges == {("training", "analysis", 2), ("training", "analysis", 3)}
