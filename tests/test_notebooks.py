"""The Colab notebooks: each .ipynb matches its jupytext .py, and each runs top to bottom.

Every ``notebooks/*.ipynb`` must be listed in ``NOTEBOOKS`` and have a paired ``.py`` (percent
format). The execution tests run each notebook in a fresh python3 kernel on CPU in the small
setting (``SOFTMAX_ONE_NOTEBOOK_SMALL=1``), from the ``notebooks`` directory, as CI does; they skip
when nbclient, nbformat, jupytext or ipykernel is missing (``pip install -r
notebooks/requirements.txt``).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

# Every notebook, by stem, with its per-cell timeout in seconds in the small setting.
NOTEBOOKS = {
    "softmax_one_tour": 600,
    "extreme_token_lab": 600,
    "orthoadam_in_your_code": 600,
    "outliers_and_quantisation": 600,
    "scale_out": 600,
}

_MISSING = [m for m in ("nbclient", "nbformat", "jupytext", "ipykernel")
            if importlib.util.find_spec(m) is None]
needs_notebook_tools = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs {', '.join(_MISSING)}: pip install -e \".[notebooks]\"")


def _sources(notebook) -> list[tuple[str, str]]:
  """(cell type, source) of each code and markdown cell; outputs and metadata are ignored."""
  return [(c.cell_type, c.source.strip()) for c in notebook.cells
          if c.cell_type in ("code", "markdown")]


def test_every_notebook_is_listed_and_paired():
  on_disk = {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
  assert on_disk == set(NOTEBOOKS), (
      f"notebooks/*.ipynb {sorted(on_disk)} != NOTEBOOKS {sorted(NOTEBOOKS)} in "
      "tests/test_notebooks.py: list every notebook there.")
  unpaired = [s for s in NOTEBOOKS if not (NOTEBOOK_DIR / f"{s}.py").is_file()]
  assert not unpaired, (f"{unpaired} have no paired .py: jupytext --set-formats ipynb,py:percent "
                        "notebooks/NAME.ipynb")


@pytest.mark.skipif(importlib.util.find_spec("jupytext") is None,
                    reason="needs jupytext: pip install -e \".[notebooks]\"")
@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_ipynb_matches_its_py(stem):
  import jupytext  # pylint: disable=import-outside-toplevel
  ipynb = jupytext.read(NOTEBOOK_DIR / f"{stem}.ipynb")
  py = jupytext.read(NOTEBOOK_DIR / f"{stem}.py")
  assert _sources(ipynb) == _sources(py), (
      f"notebooks/{stem}.ipynb and .py differ: edit the .py, then "
      f"`jupytext --sync notebooks/{stem}.py` (or --update --to ipynb) and re-execute.")


@needs_notebook_tools
@pytest.mark.parametrize("stem", sorted(NOTEBOOKS))
def test_notebook_runs_in_the_small_setting(stem):
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  notebook = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
  # The kernel sees the devices a user's CPU runtime has: one, not the eight fake devices of this
  # test session (the notebooks that need a mesh make eight themselves). With eight, every
  # collective waits for eight device threads sharing two cores; once, XLA's rendezvous timed out
  # and aborted the kernel.
  one_device_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  env_overrides = {
      "SOFTMAX_ONE_NOTEBOOK_SMALL": "1",
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": one_device_flags,
      "MPLBACKEND": "module://matplotlib_inline.backend_inline",
      "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
  }
  saved = {k: os.environ.get(k) for k in env_overrides}
  os.environ.update(env_overrides)  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(notebook, timeout=NOTEBOOKS[stem], kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
