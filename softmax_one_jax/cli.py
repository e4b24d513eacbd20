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

import difflib
import functools
import importlib.util
import json
import logging as py_logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from softmax_one_jax.errors import ConfigError, MissingFileError, UserError, disk_full_cause
from softmax_one_jax.runtime import apply_cpu_workarounds, configure_host_allocator

# training and analysis (orbax, grain, matplotlib, ...) are imported inside the subcommands
# that use them, on purpose: `softmax-one --help`, `prepare` and config errors answer without
# loading them.

COMMANDS = ("train", "eval", "prepare", "analyze", "compare", "compile")
USAGE = __doc__
USER_ERROR_EXIT_CODE = 2   # a flag, config value, file or the disk to fix; no traceback

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
    "topology", None, "compile: the slice, e.g. v5e:4x4 or v5p:2x2x2, or several slices over DCN, "
    "e.g. 2xv5e:4x4 (with --config.mesh.data a multiple of 2); default: config.topology.")
_JSON = flags.DEFINE_string("json", None, "compile: also write the report as JSON to this file.")


def _repo_root() -> pathlib.Path:
  return pathlib.Path(__file__).resolve().parent.parent


def _fail(cmd: str, message: str) -> NoReturn:
  """Ends a command on a user error: one message on stderr, exit status 2, no traceback."""
  print(f"softmax-one {cmd}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_EXIT_CODE)


def _disk_full_message(error: OSError) -> str:
  where = f" while writing {error.filename}" if error.filename else ""
  return (f"no space left on the device{where} ({error.strerror or error}). Free space there, lower "
          "config.checkpoint.max_to_keep, or move --workdir (or data.cache_dir) to a larger disk; "
          "then rerun the same command: a run resumes from its last complete checkpoint.")


def _report_user_errors(cmd: str, command: Callable[[], int]) -> int:
  """Runs ``command``; user errors and a full disk end in ``_fail``, bugs keep their traceback."""
  try:
    return command()
  except UserError as e:
    _fail(cmd, str(e))
  except Exception as e:  # pylint: disable=broad-except
    full = disk_full_cause(e)
    if full is None:
      raise
    _fail(cmd, _disk_full_message(full))


def _config_names() -> list[str]:
  folder = _repo_root() / "experiments" / "configs"
  return sorted(p.stem for p in folder.glob("*.py") if p.stem not in ("__init__", "base"))


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
    if not p.is_file():
      raise MissingFileError(
          f"--config={value}: no config file {path!r}; give a path to a config .py file or one of "
          f"the repository's: {', '.join(_config_names())} (e.g. --config=tiny:softmax1,orthoadam).")
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
      raise ConfigError("Multi-process runs need --coordinator_address, --num_processes and "
                           "--process_id together (or --multihost for auto-detection).")
    # CPU collectives across processes (ignored by GPU/TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def _drop_disk_full_tracebacks(record: py_logging.LogRecord) -> bool:
  """A log filter: Orbax logs a failed background save with its traceback; when the cause is a
  full disk, the command's one message (``_disk_full_message``) says it instead."""
  error = record.exc_info[1] if record.exc_info else None
  return error is None or disk_full_cause(error) is None


def _quiet_logging() -> None:
  """Orbax logs every save at INFO; keep the console to warnings unless -v was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("softmax_one_jax").setLevel(py_logging.INFO)
  logging.get_absl_handler().addFilter(_drop_disk_full_tracebacks)


def _need_workdir(cmd: str) -> str:
  if not _WORKDIR.value:
    raise ConfigError(f"`softmax-one {cmd}` needs --workdir=DIR.")
  return _WORKDIR.value


def _train() -> int:
  from softmax_one_jax import analysis  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training import loop  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training.config import validate_config  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None:
    raise ConfigError("`softmax-one train` needs --config=experiments/configs/<name>.py[:args].")
  workdir = _need_workdir("train")
  validate_config(config)            # field errors before jax starts or anything compiles
  if config.optimizer.name == "orthoadam":
    apply_cpu_workarounds([config.optimizer.get("rotation")])
  _init_distributed()
  try:
    summary = loop.train(config, workdir, outlier_metrics=analysis.outlier_metrics,
                         report=analysis.print_metrics_table)
  except loop.NonFiniteError as e:
    print(f"softmax-one train: {e}", file=sys.stderr)
    return 1
  return loop.PREEMPTED_EXIT_CODE if summary["status"] == "preempted" else 0


def _eval() -> int:
  from softmax_one_jax import analysis  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.training import evaluation  # pylint: disable=import-outside-toplevel
  _init_distributed()
  evaluation.evaluate(_need_workdir("eval"), step=_STEP.value, eval_batches=_EVAL_BATCHES.value,
                      outlier_metrics=analysis.outlier_metrics,
                      report=analysis.print_metrics_table)
  return 0


def _set(kwargs: dict, name: str, value) -> None:
  if value is not None:
    kwargs[name] = value


def _print_outputs(result: dict) -> None:
  """Prints the Markdown table an analysis wrote and where its other files are."""
  from softmax_one_jax import rundir  # pylint: disable=import-outside-toplevel
  paths = {k: rundir.workdir_path(v) for k, v in (result or {}).get("paths", {}).items()
           if isinstance(v, (str, os.PathLike))}
  table = paths.pop("table", None)
  if table is not None and table.is_file():
    print(table.read_text().rstrip())
    print(f"\n(written to {table.parent})")
  for name, path in sorted(paths.items()):
    print(f"{name}: {path}")


def _analyze() -> int:
  from softmax_one_jax.analysis.cli import analyze_main  # pylint: disable=import-outside-toplevel
  if bool(_WORKDIR.value) == bool(_HF.value):
    raise ConfigError("`softmax-one analyze` needs exactly one of --workdir=RUN or --hf=DIR.")
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
    raise ConfigError("`softmax-one compare RUN1 RUN2 ...` needs run directories.")
  kwargs: dict = {}
  _set(kwargs, "out", _OUT.value)
  _set(kwargs, "names", _NAMES.value)
  _print_outputs(compare_main(list(runs), **kwargs))
  return 0


def _compile() -> int:
  from softmax_one_jax.training import aot  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  if config is None:
    raise ConfigError("`softmax-one compile` needs --config=experiments/configs/<name>.py[:args].")
  topology = _TOPOLOGY.value or config.get("topology")
  if not topology:
    raise ConfigError("`softmax-one compile` needs --topology=SLICE (e.g. v5e:4x4), or a config "
                         "with config.topology set.")
  try:
    report = aot.compile_run(config, topology)
  except (ValueError, RuntimeError) as e:  # an unknown slice, a missing plugin: the user's to fix
    _fail("compile", str(e))
  print(aot.format_report(report), flush=True)
  if _JSON.value:
    from softmax_one_jax import rundir  # pylint: disable=import-outside-toplevel
    path = rundir.workdir_path(_JSON.value)
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
    _fail(cmd, f"unexpected arguments {rest}; flags are written --name=value.")
  command = {"train": _train, "eval": _eval, "analyze": _analyze, "compile": _compile,
             "compare": lambda: _compare(rest)}[cmd]
  sys.exit(_report_user_errors(cmd, command))


def _load_config_file(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
  """The config that ``--config=PATH[:ARG]`` in ``argv`` names, loaded without its overrides."""
  value = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
  if value is None:
    return None
  path, _, arg = value.partition(":")
  spec = importlib.util.spec_from_file_location("_softmax_one_config", path)
  if spec is None or spec.loader is None:
    return None
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None     # absl reports a config file that does not load


def _unknown_config_field(argv: Sequence[str]) -> str | None:
  """Names the first ``--config.a.b=value`` override whose field the config lacks."""
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if not isinstance(config, ml_collections.ConfigDict):
    # ml_collections checks the overrides while it loads the file, so the flag may hold nothing.
    config = _load_config_file(argv)
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node: Any = config
    for depth, part in enumerate(dotted.split(".")):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      parent = "config" + "".join(f".{p}" for p in dotted.split(".")[:depth])
      fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, fields, n=1)
      hint = (f"did you mean {parent}.{close[0]}? " if close else "") + (
          f"{parent} has: {', '.join(fields)}." if fields else f"{parent} is not a section.")
      return f"{arg}: unknown config field {parent}.{part}; {hint}"
  return None


def _flag_error_message(cmd: str, error: Exception) -> str:
  """absl's message; a config file that raised ``ValueError`` on its argument gives one line."""
  text = str(error).strip()
  last = text.splitlines()[-1] if text else ""
  if "Traceback (most recent call last)" in text and last.startswith("ValueError: "):
    return f"{text.splitlines()[0]} {last[len('ValueError: '):]}"
  return f"{text}. `softmax-one {cmd} --helpshort` lists the flags."


def _flags_parser(cmd: str) -> Callable[[list[str]], list[str]]:
  """absl's flag parsing, with one clean message (no flag list, no traceback) on a bad flag."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _fail(cmd, _unknown_config_field(argv) or _flag_error_message(cmd, e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      # ml_collections applies --config.* overrides while parsing and raises these for a field
      # that does not exist or a value of the wrong type.
      _fail(cmd, _unknown_config_field(argv) or f"{type(e).__name__}: {e}")
  return parse


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
    def prepare() -> int:
      prepare_main(argv[2:])
      return 0
    sys.exit(_report_user_errors(cmd, prepare))
  try:
    resolved = _resolve_config_arg(argv[2:])
  except UserError as e:
    _fail(cmd, str(e))
  app.run(functools.partial(_dispatch, cmd), argv=[f"{argv[0]} {cmd}"] + resolved,
          flags_parser=_flags_parser(cmd))


if __name__ == "__main__":
  main()
