"""``softmax-one``: train | eval | prepare | analyze | compare | compile.

Examples::

  softmax-one train --config=experiments/configs/tiny.py --workdir=runs/tiny
  softmax-one train --config=experiments/configs/gpt2.py:60m,softmax1,orthoadam \\
      --workdir=runs/gpt2-60m --config.optimizer.learning_rate=3e-4
  softmax-one eval --workdir=runs/tiny
  softmax-one prepare --source c4 --output_dir data/c4
  softmax-one analyze --workdir=runs/tiny
  softmax-one compare runs/tiny-*
  softmax-one compile --config=experiments/configs/gpt2.py:60m,softmax1,orthoadam \\
      --topology=v5e:4x4

``--config`` takes a config file (``path.py`` or ``path.py:arg``); a bare name such as
``tiny`` or ``gpt2:60m,softmax1,adamw`` is looked up in the repository's experiments/configs.
``compile`` builds the train and eval steps for an accelerator slice on this (CPU) host and prints
what they cost per chip (needs ``pip install -e ".[tpu-aot]"`` for TPU slices).
Multi-host: pass ``--multihost`` (TPU pods, SLURM and other auto-detected clusters) or
``--coordinator_address=host:port --num_processes=N --process_id=i`` on every process.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from softmax_one_jax.runtime import apply_cpu_workarounds, configure_host_allocator

COMMANDS = ("train", "eval", "prepare", "analyze", "compare", "compile")
USAGE = __doc__

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/configs/tiny.py[:softmax1,orthoadam].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
_STEP = flags.DEFINE_integer("step", None, "eval/analyze: checkpoint step (default: newest good).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "eval: validation batches.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() with cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: coordinator host:port (same on every process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
# analyze / compare (softmax_one_jax.analysis.cli)
_HF = flags.DEFINE_string("hf", None, "analyze: a local Hugging Face GPT-2/Llama checkpoint dir.")
_OUT = flags.DEFINE_string("out", None, "analyze/compare: output directory.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", None, "analyze: validation batches.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "analyze: rows per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "analyze: tokens per row.")
_SCHEMES = flags.DEFINE_string("schemes", None, "analyze: quantisation schemes ('' = none).")
_HEADS = flags.DEFINE_string("heads", None, "analyze: attention maps 'layer:head,...'.")
_ATTENTION = flags.DEFINE_string("attention", None, "analyze: 'probs' or 'stats'.")
_NAME = flags.DEFINE_string("name", None, "analyze: row label.")
_NAMES = flags.DEFINE_list("names", None, "compare: row labels, one per run.")
# compile
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "compile: the slice, e.g. v5e:4x4 or v5p:2x2x2 (default: config.topology).")
_JSON = flags.DEFINE_string("json", None, "compile: also write the report as JSON to this file.")


def _repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parent.parent


def _resolve_config_arg(argv: list[str]) -> list[str]:
  """Maps ``--config=tiny[:arg]`` to the repository's file; puts its repo root on sys.path."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      value, j = a[len("--config="):], i
    elif a == "--config" and i + 1 < len(out):
      value, j = out[i + 1], i + 1
    else:
      continue
    path, sep, arg = value.partition(":")
    p = pathlib.Path(path)
    if not p.exists():
      for cand in (_repo_root() / "experiments" / "configs" / path,
                   _repo_root() / "experiments" / "configs" / f"{path}.py"):
        if cand.is_file():
          p = cand
          break
    if p.exists():
      p = p.resolve()
      if p.parent.name == "configs" and p.parent.parent.name == "experiments":
        root = str(p.parent.parent.parent)
        if root not in sys.path:
          sys.path.insert(0, root)      # config files import experiments.configs.base
      value = f"{p}{sep}{arg}"
    out[j] = value if j != i else f"--config={value}"
    break
  return out


def _init_distributed() -> None:
  """``jax.distributed.initialize`` from the multi-host flags (nothing for one process)."""
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None or not _COORDINATOR.value:
      raise app.UsageError("Multi-process runs need --coordinator_address, --num_processes and "
                           "--process_id together (or --multihost for auto-detection).")
    # CPU collectives across processes (ignored by GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def _quiet_logging() -> None:
  """Orbax logs every save at INFO; keep the console to warnings unless -v was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("softmax_one_jax").setLevel(py_logging.INFO)


def _need_workdir(cmd: str) -> str:
  if not _WORKDIR.value:
    raise app.UsageError(f"`softmax-one {cmd}` needs --workdir=DIR.")
  return _WORKDIR.value


def _train() -> int:
  from softmax_one_jax.training import loop  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("`softmax-one train` needs --config=experiments/configs/<name>.py[:args].")
  workdir = _need_workdir("train")
  try:
    validate_config(config)            # field errors before jax starts or anything compiles
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if config.optimizer.name == "orthoadam":
    apply_cpu_workarounds([config.optimizer.get("rotation")])
  _init_distributed()
  try:
    summary = loop.train(config, workdir)
  except loop.NonFiniteError as e:
    print(f"softmax-one train: {e}", file=sys.stderr)
    return 1
  return loop.PREEMPTED_EXIT_CODE if summary["status"] == "preempted" else 0


def _eval() -> int:
  from softmax_one_jax.training import loop  # pylint: disable=import-outside-toplevel
  _init_distributed()
  loop.evaluate(_need_workdir("eval"), step=_STEP.value, eval_batches=_EVAL_BATCHES.value)
  return 0


def _set(kwargs: dict, name: str, value) -> None:
  if value is not None:
    kwargs[name] = value


def _print_outputs(result: dict) -> None:
  """Prints the Markdown table an analysis wrote and where its other files are."""
  paths = {k: pathlib.Path(v) for k, v in (result or {}).get("paths", {}).items()
           if isinstance(v, (str, pathlib.Path))}
  table = paths.pop("table", None)
  if table is not None and table.is_file():
    print(table.read_text().rstrip())
    print(f"\n(written to {table.parent})")
  for name, path in sorted(paths.items()):
    print(f"{name}: {path}")


def _analyze() -> int:
  from softmax_one_jax.analysis.cli import analyze_main  # pylint: disable=import-outside-toplevel
  if bool(_WORKDIR.value) == bool(_HF.value):
    raise app.UsageError("`softmax-one analyze` needs exactly one of --workdir=RUN or --hf=DIR.")
  kwargs: dict = {}
  for name, flag in (("out", _OUT), ("step", _STEP), ("num_batches", _NUM_BATCHES),
                     ("batch_size", _BATCH_SIZE), ("seq_len", _SEQ_LEN), ("schemes", _SCHEMES),
                     ("heads", _HEADS), ("attention", _ATTENTION), ("name", _NAME)):
    _set(kwargs, name, flag.value)
  _print_outputs(analyze_main(workdir=_WORKDIR.value, hf=_HF.value, **kwargs))
  return 0


def _compare(runs: Sequence[str]) -> int:
  from softmax_one_jax.analysis.cli import compare_main  # pylint: disable=import-outside-toplevel
  if not runs:
    raise app.UsageError("`softmax-one compare RUN1 RUN2 ...` needs run directories.")
  kwargs: dict = {}
  _set(kwargs, "out", _OUT.value)
  _set(kwargs, "names", _NAMES.value)
  _print_outputs(compare_main(list(runs), **kwargs))
  return 0


def _compile() -> int:
  import json  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training import aot  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("`softmax-one compile` needs --config=experiments/configs/<name>.py[:args].")
  topology = _TOPOLOGY.value or config.get("topology")
  if not topology:
    raise app.UsageError("`softmax-one compile` needs --topology=SLICE (e.g. v5e:4x4), or a config "
                         "with config.topology set.")
  try:
    report = aot.compile_run(config, topology)
  except (ValueError, RuntimeError) as e:
    print(f"softmax-one compile: {e}", file=sys.stderr)
    return 2
  print(aot.format_report(report), flush=True)
  if _JSON.value:
    path = pathlib.Path(_JSON.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(aot.report_record(report), indent=1, default=str))
    print(f"\n(written to {path})")
  return 0


def _dispatch(cmd: str, argv: Sequence[str]) -> None:
  _quiet_logging()
  if cmd == "compile":
    # Compiling for a slice never needs this host's own accelerator (it may be busy training),
    # and the CUDA plugin compiles for absent GPUs only when it does not look for local ones.
    import jax  # pylint: disable=import-outside-toplevel
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
  elif cmd != "compare":
    configure_host_allocator()  # before jax starts its CPU threads; a no-op on accelerators
  rest = list(argv[1:])
  if rest and cmd != "compare":
    raise app.UsageError(f"Unexpected arguments for `softmax-one {cmd}`: {rest}")
  code = {"train": _train, "eval": _eval, "analyze": _analyze, "compile": _compile,
          "compare": lambda: _compare(rest)}[cmd]()
  sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
  """Entry point of the ``softmax-one`` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    print(f"softmax-one: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}.\n{USAGE}",
          file=sys.stderr)
    sys.exit(2)
  if cmd == "prepare":
    from softmax_one_jax.data import prepare_main  # pylint: disable=import-outside-toplevel
    prepare_main(argv[2:])
    sys.exit(0)
  app.run(functools.partial(_dispatch, cmd), argv=[f"{argv[0]} {cmd}"] + _resolve_config_arg(argv[2:]))


if __name__ == "__main__":
  main()
