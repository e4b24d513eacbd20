"""The extreme-token laboratory: which remedies remove the attention sink on Bigram-Backcopy?

Trains every condition below for several seeds (``experiments/configs/bigram_backcopy.py``), then
writes ``experiments/results/bigram_backcopy/``: ``table.md`` (mean +- std over seeds of every
extreme-token metric, and the validation loss above the Bayes-optimal loss), ``metrics.json``
(every run's final metrics and its metrics over training steps) and figures (the metrics over
steps, attention maps, residual norms by position).

Each run trains in its own directory under ``--workdir`` (default ``runs/lab``); a finished run
is not trained again and an interrupted one resumes from its last checkpoint, so rerunning the
same command continues the lab. The outputs cover every finished run under ``--workdir`` (more
seeds of some conditions: ``--only=NAME --seeds=8``), and ``table.md`` lists the commands that
made them (``commands.md`` in the workdir). ``--report`` only rebuilds the outputs.

Usage::

  python experiments/run_lab.py                   # the whole lab (about 58 min on 2 CPU cores)
  python experiments/run_lab.py --only=grid,softmax1-*   # some groups or conditions
  python experiments/run_lab.py --seeds=1 --steps=300 --out=/tmp/lab   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import glob
import io
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments.configs import bigram_backcopy  # noqa: E402

OUT = ROOT / "experiments" / "results" / "bigram_backcopy"
SEEDS = (0, 1, 2)
# The mean attention a query >= 1 gives key 0 if it spreads its attention evenly over the keys it
# sees: mean over t = 1 .. T-1 of 1 / (t + 1). Beside every first-token mass in the table.
CHANCE_NOTE = "uniform attention over the visible keys"
# The matched-loss comparison: each run's first validation at most this far above Bayes-optimal.
MATCHED_LOSS_GAP = 0.1
# A run "uses the null key" when softmax-1's virtual key (or the learned sink) takes this share.
NULL_KEY_SEED = 0.3


@dataclasses.dataclass(frozen=True)
class Condition:
  """One trained variant; ``group`` says which question it answers."""

  group: str
  softmax: str
  optimizer: str
  norm: str = "layernorm"
  layers: int = 1
  bos: bool = True

  @property
  def name(self) -> str:
    return (f"{self.softmax}-{self.optimizer}-{self.norm}-L{self.layers}"
            + ("" if self.bos else "-nobos"))

  def config(self, seed: int, steps: int | None = None) -> ml_collections.ConfigDict:
    c = bigram_backcopy.get_config(f"{self.softmax},{self.optimizer},{self.norm},{self.layers}"
                                   + ("" if self.bos else ",nobos"))
    c.name = f"{self.name}-s{seed}"
    c.seed = seed
    c.optimizer.seed = seed        # OrthoAdam's rotations differ per seed, like the weights
    if steps:
      c.num_train_steps = steps
      c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps)
    c.progress_bar = False
    return c


def conditions() -> list[Condition]:
  """The lab: the 3 x 3 grid, then one factor changed per extra group."""
  grid = [Condition("grid", s, o) for s in bigram_backcopy.SOFTMAXES
          for o in bigram_backcopy.OPTIMIZERS]
  # Residual peak needs depth (Guo et al.: 3 layers); Adam vs SGD vs OrthoAdam with softmax, and
  # whether softmax-1 behaves differently with more layers.
  depth = [Condition("depth", "softmax", o, layers=3) for o in bigram_backcopy.OPTIMIZERS]
  depth.append(Condition("depth", "softmax1", "adamw", layers=3))
  # Does the sink need a token that is the same in every sequence?
  no_bos = [Condition("no_bos", s, "adamw", bos=False) for s in ("softmax", "softmax1")]
  # The paper's recipe: softmax-1 + OrthoAdam with a single-scalar-gain norm (the grid uses
  # LayerNorm, whose per-channel gain privileges the basis OrthoAdam rotates away).
  norm = [Condition("norm", "softmax1", "orthoadam", norm="scalar_rmsnorm")]
  return grid + depth + no_bos + norm


# ------------------------------------------------------------------------------------ training


def run_dir(workdir: pathlib.Path, cond: Condition, seed: int) -> pathlib.Path:
  return workdir / f"{cond.name}-s{seed}"


def read_series(run: pathlib.Path) -> list[dict[str, float]]:
  """The run's metrics.jsonl records (one per logged step), newest record per step."""
  by_step: dict[int, dict[str, float]] = {}
  path = run / "metrics.jsonl"
  if path.exists():
    for line in path.read_text().splitlines():
      with contextlib.suppress(json.JSONDecodeError):
        rec = json.loads(line)
        by_step.setdefault(int(rec["step"]), {}).update(rec)
  return [by_step[s] for s in sorted(by_step)]


def train_one(cond: Condition, seed: int, run: pathlib.Path, steps: int | None) -> dict[str, Any]:
  """Trains (or resumes) one run; returns its final metrics, also written to ``summary.json``."""
  from softmax_one_jax.analysis import (  # pylint: disable=import-outside-toplevel
      outlier_metrics, print_metrics_table)
  from softmax_one_jax.training.loop import train  # pylint: disable=import-outside-toplevel
  done = run / "summary.json"
  if done.exists():
    return json.loads(done.read_text())
  run.mkdir(parents=True, exist_ok=True)
  config = cond.config(seed, steps)
  started = time.perf_counter()
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = train(config, run, outlier_metrics=outlier_metrics, report=print_metrics_table)
  (run / "train.log").write_text(log.getvalue())
  if result["status"] != "done":
    raise SystemExit(f"{run.name} stopped at step {result['step']} ({result['status']}); rerun the "
                     "same command to continue the lab.")
  summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
  summary["seconds"] = round(time.perf_counter() - started, 1)
  summary.update(_sink_logits(run, cond))
  done.write_text(json.dumps(summary, indent=1))
  return summary


def _sink_logits(run: pathlib.Path, cond: Condition) -> dict[str, float]:
  """The learned sink logits' mean (learned_sink runs), to show where training moved them."""
  if cond.softmax != "learned_sink":
    return {}
  model, _ = _load(run)
  logits = [float(np.mean(np.asarray(b.attn.sink_logits[...]))) for b in model.blocks]
  return {"sink_logit": float(np.mean(logits))}


def _load(run: pathlib.Path):
  from softmax_one_jax.rundir import load_model  # pylint: disable=import-outside-toplevel
  return load_model(run)


# ------------------------------------------------------------------------------------ report

# Final metrics in the table: (key, column title, format).
COLUMNS = (
    ("first_token_mass_non_trigger", "1st-token mass, non-trigger q", "{:.3f}"),
    ("first_token_mass_trigger", "1st-token mass, trigger q", "{:.3f}"),
    ("first_token_mass", "1st-token mass", "{:.3f}"),
    ("sink_rate", "sink rate", "{:.2f}"),
    ("null_mass", "null mass", "{:.3f}"),
    ("first_token_attention", "1st-token argmax", "{:.3f}"),
    ("value_drain_ratio", "value drain", "{:.2f}"),
    ("residual_peak_ratio", "residual peak", "{:.2f}"),
    ("loss_gap", "val loss - Bayes", "{:.3f}"),
    ("mass_at_matched_loss", f"1st-token mass, non-trigger q, at gap <= {MATCHED_LOSS_GAP}",
     "{:.3f}"),
    ("sink_logit", "learned sink logit", "{:.2f}"),
)


def mass_at_loss_gap(series: Sequence[dict[str, float]], bayes: float,
                     gap: float = MATCHED_LOSS_GAP) -> float:
  """Non-trigger first-token mass at the first step whose validation loss is within ``gap`` nats
  of Bayes-optimal (NaN if the run never gets there): remedies compared at equal loss, since a
  slower learner may simply not have grown its sink yet.

  Example:
    >>> mass_at_loss_gap([{"val_loss": 1.5, "first_token_mass_non_trigger": 0.1},
    ...                   {"val_loss": 1.05, "first_token_mass_non_trigger": 0.4}], 1.0)
    0.4
  """
  for rec in series:
    if rec.get("val_loss", float("inf")) - bayes <= gap and "first_token_mass_non_trigger" in rec:
      return float(rec["first_token_mass_non_trigger"])
  return float("nan")


def chance_first_token_mass(seq_len: int) -> float:
  """Mean of ``1 / (t + 1)`` over queries ``t = 1 .. T-1``: key 0's share under uniform attention.

  Example:
    >>> round(chance_first_token_mass(4), 4)   # (1/2 + 1/3 + 1/4) / 3
    0.3611
  """
  return float(np.mean(1.0 / (np.arange(1, seq_len) + 1.0)))


def bayes_loss(cond: Condition) -> float:
  from softmax_one_jax.data import bayes_optimal_loss  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.data.synthetic import task_for_config  # pylint: disable=import-outside-toplevel
  c = cond.config(0)
  return bayes_optimal_loss(task_for_config(c.data), c.seq_len, bos=cond.bos)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value), NaNs dropped."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if not v.size:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
  """Per condition: ``{metric: (mean, std)}`` over its seeds' final metrics."""
  out = {}
  for name, entry in results.items():
    finals = [r["final"] for r in entry["runs"].values()]
    keys = sorted({k for f in finals for k in f})
    out[name] = {k: mean_std([f.get(k, float("nan")) for f in finals]) for k in keys}
  return out


def _cell(stat: tuple[float, float] | None, fmt: str) -> str:
  if stat is None or not np.isfinite(stat[0]):
    return "–"
  return f"{fmt.format(stat[0])} ± {fmt.format(stat[1])}"


def table_markdown(results: dict[str, dict[str, Any]], seq_len: int) -> str:
  """The lab's table: one row per condition, mean ± std over seeds."""
  agg = aggregate(results)
  head = ["group", "softmax", "optimizer", "norm", "layers", "BOS", "seeds",
          *[title for _, title, _ in COLUMNS], f"seeds with null mass > {NULL_KEY_SEED}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 6 + "---:|" * (len(head) - 6)]
  for name, entry in results.items():
    c = entry["condition"]
    row = [c["group"], c["softmax"], c["optimizer"], c["norm"], str(c["layers"]),
           "yes" if c["bos"] else "no", str(len(entry["runs"]))]
    row += [_cell(agg[name].get(key), fmt) for key, _, fmt in COLUMNS]
    nulls = [r["final"].get("null_mass") for r in entry["runs"].values()]
    row.append("–" if None in nulls else
               f"{sum(x > NULL_KEY_SEED for x in nulls)} of {len(nulls)}")
    lines.append("| " + " | ".join(row) + " |")
  chance = chance_first_token_mass(seq_len)
  lines.append("")
  lines.append(f"Chance level of the first-token mass ({CHANCE_NOTE}, {seq_len} tokens): "
               f"{chance:.3f}. Sink rate: share of (layer, head) whose first-token mass over all "
               "queries >= 1 exceeds 0.3 (Gu et al.'s epsilon). Value drain: norm of the first "
               "token's value state / mean of the others. Residual peak: norm of the first "
               "token's block output / median of the others (mean over layers). The matched-"
               "loss column reads the first validation (every 200 steps) whose loss is within "
               f"{MATCHED_LOSS_GAP} nats of Bayes-optimal; its mean is over the seeds that got "
               "there. Outcomes can be bimodal over seeds (the head's sink on BOS or on the null "
               "key): the last column counts the seeds whose head sends a large share to the null "
               "key; metrics.json has every seed.")
  return "\n".join(lines)


SERIES_KEYS = ("first_token_mass_non_trigger", "sink_rate", "null_mass", "value_drain_ratio",
               "residual_peak_ratio", "val_loss")
_COLORS = {"softmax": "tab:red", "softmax1": "tab:blue", "learned_sink": "tab:green"}
_STYLES = {"adamw": "-", "orthoadam": "--", "sgd": ":"}


def _series_mean(entry: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Steps, mean and std over seeds of one metric (steps where every seed logged it)."""
  per_seed = [{int(r["step"]): r[key] for r in run["series"] if key in r}
              for run in entry["runs"].values()]
  steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
  vals = np.asarray([[s[t] for t in steps] for s in per_seed], np.float64)
  if not steps:
    return np.zeros(0), np.zeros(0), np.zeros(0)
  return np.asarray(steps), vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else 0 * vals[0]


def _label(c: dict[str, Any]) -> str:
  extra = {"depth": f", {c['layers']} layers", "no_bos": ", no BOS", "norm": f", {c['norm']}"}
  return f"{c['softmax']} + {c['optimizer']}{extra.get(c['group'], '')}"


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend (imported when a figure is drawn)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_dynamics(results: dict[str, dict[str, Any]], groups: Sequence[str], path: pathlib.Path,
                  title: str, bayes: float | None = None) -> None:
  """Each metric over training steps, one line per condition (mean over seeds, band = ±1 std).

  The grid is coloured by softmax kind with a line style per optimizer; other groups get a
  colour per condition.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
  chosen = [e for e in results.values() if e["condition"]["group"] in groups]
  by_softmax = all(e["condition"]["group"] == "grid" for e in chosen)
  palette = plt.get_cmap("tab10")
  for ax, key in zip(axes.flat, SERIES_KEYS):
    for i, entry in enumerate(chosen):
      c = entry["condition"]
      steps, mean, std = _series_mean(entry, key)
      if not steps.size:
        continue
      color = _COLORS[c["softmax"]] if by_softmax else palette(i % 10)
      style = _STYLES[c["optimizer"]] if by_softmax else "-"
      ax.plot(steps, mean, style, color=color, label=_label(c), marker=".", markersize=3)
      low, high = mean - std, mean + std
      if key in ("sink_rate", "null_mass", "first_token_mass_non_trigger"):  # shares: in [0, 1]
        low, high = np.clip(low, 0, 1), np.clip(high, 0, 1)
      ax.fill_between(steps, low, high, color=color, alpha=0.12)
    if key == "val_loss" and bayes is not None:
      ax.axhline(bayes, color="k", lw=0.8, ls="-.", label="Bayes-optimal")
    if key == "first_token_mass_non_trigger":
      chance = chance_first_token_mass(bigram_backcopy.get_config().seq_len)
      ax.axhline(chance, color="gray", lw=0.8, ls="-.", label="chance")
    ax.set_title(key)
    ax.set_xlabel("step")
  axes.flat[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def attention_and_norms(run: pathlib.Path, trigger_ids: Sequence[int]) -> dict[str, Any]:
  """Attention probabilities of the first validation sequence, and block-output norms by position.

  Returns ``{"probs": [L, T, T] (head 0), "tokens": [T], "triggers": [T] bool,
  "residual_norm": [L, T] (mean over the validation batch)}`` as lists.
  """
  from softmax_one_jax.data import get_tokenizer  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.data.pipeline import validation_batches  # pylint: disable=import-outside-toplevel
  from softmax_one_jax.models import with_intermediates  # pylint: disable=import-outside-toplevel
  model, config = _load(run)
  tokenizer = get_tokenizer(config.data)
  batch = validation_batches(config.data, tokenizer, config.seq_len, config.eval_batch_size, 1)[0]
  tokens = jax.numpy.asarray(batch["inputs"])
  _, inter = with_intermediates(model, tokens, ["hidden", "attention_probs"])
  probs = np.asarray(inter["attention_probs"][:, 0, 0])                  # [L, T, T]
  norms = np.linalg.norm(np.asarray(inter["hidden"]), axis=-1).mean(1)   # [L, T]
  return {"probs": probs.tolist(), "tokens": batch["inputs"][0].tolist(),
          "triggers": np.isin(batch["inputs"][0], trigger_ids).tolist(),
          "residual_norm": norms.tolist()}


def plot_attention_maps(maps: dict[str, dict[str, Any]], path: pathlib.Path, first: int = 48
                        ) -> None:
  """The first ``first`` tokens' attention (layer 0, head 0) of each named run, side by side."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 5), constrained_layout=True)
  for ax, (label, m) in zip(np.atleast_1d(axes), maps.items()):
    p = np.asarray(m["probs"])[0, :first, :first]
    im = ax.imshow(p, cmap="viridis", vmin=0, vmax=1)
    trig = np.nonzero(np.asarray(m["triggers"])[:first])[0]
    ax.scatter(np.full(trig.shape, first - 0.5), trig, marker="<", color="tab:orange", s=12,
               clip_on=False, label="trigger query")
    null = np.clip(1.0 - np.asarray(m["probs"])[0].sum(-1), 0.0, 1.0)
    ax.set_title(f"{label}\nkey-0 mass {p[1:, 0].mean():.2f}, null mass {null[1:].mean():.2f}",
                 fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
  fig.colorbar(im, ax=axes, shrink=0.8, label="attention probability")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_residual_norms(norms: dict[str, list[list[float]]], path: pathlib.Path) -> None:
  """Block-output norm by token position, one panel per layer, one line per run."""
  plt = _pyplot()
  layers = max(len(v) for v in norms.values())
  fig, axes = plt.subplots(1, layers, figsize=(5 * layers, 4), constrained_layout=True,
                           squeeze=False)
  for label, per_layer in norms.items():
    for l, row in enumerate(per_layer):
      axes[0, l].plot(np.arange(len(row)), row, label=label)
  for l in range(layers):
    axes[0, l].set_yscale("log")
    axes[0, l].set_title(f"block {l} output norm")
    axes[0, l].set_xlabel("token position")
  axes[0, 0].legend(fontsize=8)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  return (f"{os.cpu_count()} x {cpu}, Python {platform.python_version()}, jax {jax.__version__}, "
          f"backend {jax.default_backend()}")


def report(results: dict[str, dict[str, Any]], workdir: pathlib.Path, out: pathlib.Path) -> None:
  """Writes table.md, metrics.json and the figures from the finished runs."""
  out.mkdir(parents=True, exist_ok=True)
  seq_len = bigram_backcopy.get_config().seq_len
  table = table_markdown(results, seq_len)
  bayes = {name: entry["bayes_loss"] for name, entry in results.items()}
  log = workdir / "commands.md"
  commands = log.read_text() if log.exists() else "- (not recorded)\n"
  seconds = sum(r["final"].get("seconds", 0) for e in results.values() for r in e["runs"].values())
  header = (f"# Bigram-Backcopy lab: final metrics, mean ± std over seeds\n\n"
            f"Made by these commands, in order:\n\n{commands}\n"
            f"Training time of all {sum(len(e['runs']) for e in results.values())} runs: "
            f"{seconds / 60:.0f} min. Bayes-optimal loss: "
            f"{sorted(set(round(b, 4) for b in bayes.values()))} nats (with BOS / without).\n\n")
  (out / "table.md").write_text(header + table + "\n")
  (out / "metrics.json").write_text(json.dumps(
      {"commands": commands.splitlines(), "chance_first_token_mass":
       chance_first_token_mass(seq_len), "conditions": results}, indent=1))
  some_bayes = next(iter(bayes.values()), None)
  plot_dynamics(results, ("grid",), out / "dynamics_grid.png",
                "1 layer, 1 head: softmax kinds (colour) x optimizers (line style)", some_bayes)
  plot_dynamics(results, ("depth", "no_bos", "norm"), out / "dynamics_conditions.png",
                "3 layers (depth), no BOS, OrthoAdam with a scalar-gain norm", None)
  _figures_from_checkpoints(results, workdir, out)
  print(header + table)


def _figures_from_checkpoints(results, workdir: pathlib.Path, out: pathlib.Path) -> None:
  from softmax_one_jax.data import get_tokenizer  # pylint: disable=import-outside-toplevel
  trigger_ids = get_tokenizer(bigram_backcopy.get_config().data).trigger_ids
  maps, norms = {}, {}
  for name, entry in results.items():
    c = entry["condition"]
    run = workdir / f"{name}-s0"
    if not (run / "summary.json").exists():
      continue
    if c["group"] == "grid" and c["optimizer"] == "adamw":
      maps[f"{c['softmax']} + adamw (seed 0)"] = attention_and_norms(run, trigger_ids)
    if c["group"] == "grid" and (c["softmax"], c["optimizer"]) == ("softmax1", "orthoadam"):
      # The seed whose head gives most to the null key: softmax-1 doing what it is meant to do.
      seed = max(entry["runs"], key=lambda s: entry["runs"][s]["final"].get("null_mass", 0.0))
      maps[f"softmax1 + orthoadam (seed {seed}, most null mass)"] = attention_and_norms(
          workdir / f"{name}-s{seed}", trigger_ids)
    if c["group"] == "depth":
      norms[f"{c['softmax']} + {c['optimizer']}, 3 layers"] = attention_and_norms(
          run, trigger_ids)["residual_norm"]
  if maps:
    plot_attention_maps(maps, out / "attention_maps.png")
  if norms:
    plot_residual_norms(norms, out / "residual_norms.png")


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=str(ROOT / "runs" / "lab"),
                      help="where each run trains (checkpoints, metrics.jsonl)")
  parser.add_argument("--out", default=str(OUT), help="where table.md, metrics.json, figures go")
  parser.add_argument("--only", default="",
                      help="comma-separated groups (grid, depth, no_bos, norm) or condition names, "
                      "which may hold shell wildcards (softmax1-*)")
  parser.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds per condition")
  parser.add_argument("--steps", type=int, default=0, help="override every run's length (0: the "
                      "config's)")
  parser.add_argument("--report", action="store_true", help="only rebuild the outputs")
  args = parser.parse_args(argv)
  command = "python experiments/run_lab.py" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  wanted = [s for s in args.only.split(",") if s]
  conds = [c for c in conditions()
           if not wanted or any(fnmatch.fnmatchcase(c.name, w) or w == c.group for w in wanted)]
  if not conds:
    raise SystemExit(f"--only={args.only!r} matches no condition; names look like "
                     f"{conditions()[0].name!r}, groups are grid, depth, no_bos, norm.")
  jobs = [(c, s) for c in conds for s in range(args.seeds)]
  if not args.report:
    train_all(jobs, workdir, args.steps or None, command)
  results = collect(workdir)
  if not results:
    raise SystemExit(f"No finished run under {workdir}; run without --report first.")
  report(results, workdir, out)


def train_all(jobs: Sequence[tuple[Condition, int]], workdir: pathlib.Path, steps: int | None,
              command: str) -> None:
  """Trains the runs not finished yet, with a progress bar; logs the command in commands.md."""
  workdir.mkdir(parents=True, exist_ok=True)
  # Seeds of a condition compile identical programs: a persistent cache compiles each once.
  jax.config.update("jax_compilation_cache_dir", str(workdir / ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  started, trained = time.perf_counter(), 0
  bar = tqdm(jobs, unit="run", dynamic_ncols=True)
  for cond, seed in bar:
    run = run_dir(workdir, cond, seed)
    bar.set_postfix_str(run.name)
    trained += not (run / "summary.json").exists()
    train_one(cond, seed, run, steps)
  bar.close()
  with open(workdir / "commands.md", "a", encoding="utf-8") as f:
    f.write(f"- `{command}`: {trained} runs trained in "
            f"{(time.perf_counter() - started) / 60:.1f} min ({datetime.date.today()}, "
            f"{machine()})\n")


def collect(workdir: pathlib.Path) -> dict[str, dict[str, Any]]:
  """Every finished run under ``workdir``, by condition (in ``conditions()`` order) and seed."""
  results: dict[str, dict[str, Any]] = {}
  for cond in conditions():
    runs = sorted(workdir.glob(f"{glob.escape(cond.name)}-s*/summary.json"),
                  key=lambda p: int(p.parent.name.rsplit("-s", 1)[1]))
    for done in runs:
      seed = done.parent.name.rsplit("-s", 1)[1]
      entry = results.setdefault(cond.name, {"condition": dataclasses.asdict(cond),
                                             "bayes_loss": bayes_loss(cond), "runs": {}})
      final, series = json.loads(done.read_text()), read_series(done.parent)
      final["loss_gap"] = final.get("val_loss", float("nan")) - entry["bayes_loss"]
      final["mass_at_matched_loss"] = mass_at_loss_gap(series, entry["bayes_loss"])
      entry["runs"][seed] = {"final": final, "series": series}
  return results


if __name__ == "__main__":
  main()
