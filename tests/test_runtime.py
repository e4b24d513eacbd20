"""Process-level settings: the glibc allocator policy for CPU runs."""

import importlib
import platform
import subprocess
import sys
import textwrap

import pytest

from softmax_one_jax.runtime import _runs_on_cpu_only, configure_host_allocator

# Allocates, fills and frees a 64 MiB block six times (as XLA does with a step's buffers) and
# prints the page faults of the last five.
_FAULTS_PER_REALLOCATION = textwrap.dedent("""
    import ctypes, resource, sys
    from softmax_one_jax.runtime import configure_host_allocator
    if sys.argv[1] == "configured":
      assert configure_host_allocator({"JAX_PLATFORMS": "cpu"})
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def fill_and_free():
      block = libc.malloc(64 << 20)
      ctypes.memset(block, 1, 64 << 20)
      libc.free(block)
    fill_and_free()
    before = faults()
    for _ in range(5):
      fill_and_free()
    print(faults() - before)
""")


def _faults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _FAULTS_PER_REALLOCATION, mode], check=True,
                       capture_output=True, text=True).stdout
  return int(out.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="configures glibc's malloc")
def test_configured_allocator_reuses_freed_pages():
  # A freed 64 MiB block goes back to the kernel by default, so allocating it again faults in
  # fresh pages each time (16,384 of 4 KiB here; fewer where transparent huge pages are always
  # on); configured, the process keeps and reuses them.
  default, configured = _faults("default"), _faults("configured")
  assert default >= 5, default             # at least one fault per reallocation
  assert configured <= default // 10, (configured, default)


def test_only_for_processes_that_compute_on_the_cpu():
  assert _runs_on_cpu_only({"JAX_PLATFORMS": "cpu"})
  assert not _runs_on_cpu_only({"JAX_PLATFORMS": "tpu,cpu"})
  assert not _runs_on_cpu_only({"JAX_PLATFORMS": "cuda"})
  assert not configure_host_allocator({"JAX_PLATFORMS": "cuda"})


def test_an_accelerator_plugin_on_the_path_counts_as_an_accelerator(tmp_path, monkeypatch):
  # jax discovers PJRT plugins as modules of the jax_plugins namespace package.
  (tmp_path / "jax_plugins").mkdir()
  (tmp_path / "jax_plugins" / "xla_some_accelerator.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()
  assert not _runs_on_cpu_only({})
  assert _runs_on_cpu_only({"JAX_PLATFORMS": "cpu"})  # an explicit choice wins


def test_haar_families_are_the_rotation_families_that_draw_by_qr(monkeypatch):
  import jax
  from softmax_one_jax.optim import rotations
  from softmax_one_jax.runtime import HAAR_FAMILIES
  drawn = set()
  real = rotations.haar_orthogonal
  for name, family in rotations.FAMILIES.items():
    monkeypatch.setattr(rotations, "haar_orthogonal",
                        lambda *a, name=name, **k: (drawn.add(name), real(*a, **k))[1])
    family.init(jax.random.key(0), (4, 6))
  assert set(HAAR_FAMILIES) == drawn
  assert rotations.HAAR_FAMILIES is HAAR_FAMILIES
