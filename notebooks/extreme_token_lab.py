# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Extreme-token lab: watch an attention sink grow
#
# Guo et al.'s synthetic **Bigram-Backcopy** task makes a 1-layer, 1-head transformer grow an
# attention sink on the BOS token within a few hundred steps, so the paper's remedies can be
# tested on a laptop. This notebook trains softmax and softmax-1 attention with AdamW, OrthoAdam
# and SGD (`experiments/configs/bigram_backcopy.py`), plots the first-token attention mass while
# training runs, and then looks inside the trained models: attention maps, residual-stream norms by
# position, and a table of the extreme-token metrics with the chance level beside each rate.
#
# **Size.** The README's lab table was measured with `python experiments/run_lab.py`: 1,000
# steps per run (batch 32, 128 tokens, width 128), 3 to 8 seeds per condition, about 58 minutes
# on 2 CPU cores. Here each condition trains once (seed 0) for `STEPS` steps: 80 in the small
# setting (4 conditions), 400 on a CPU and 1,000 on an accelerator (6 conditions). Short runs
# need not show what the README reports; the text under each figure says what the saved outputs
# show.
#
# Set `SOFTMAX_ONE_NOTEBOOK_SMALL=1` for the small setting (what CI runs).

# %%
# Colab only: install the package from the project's repository (REPO_URL). Does nothing elsewhere.
import sys

REPO_URL = "https://github.com/softmax-one-jax/softmax_one_jax"  # the project's repository
if "google.colab" in sys.modules:
  import subprocess
  subprocess.run(["git", "clone", "--depth=1", REPO_URL, "softmax_one_jax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "softmax_one_jax"],
                 check=True)
  sys.path.insert(0, "softmax_one_jax")

# %%
import os
import pathlib
import shutil
import threading
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

# The experiment configs and the lab's helpers live in the repository (experiments/); run from
# its root or below it.
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents,
                        pathlib.Path("softmax_one_jax").resolve()]
            if (p / "experiments" / "configs").is_dir())
sys.path.insert(0, str(ROOT))

from experiments.configs import bigram_backcopy
from experiments.run_lab import attention_and_norms, chance_first_token_mass, read_series
from softmax_one_jax.analysis import outlier_metrics
from softmax_one_jax.data import bayes_optimal_loss
from softmax_one_jax.data.pipeline import validation_batches
from softmax_one_jax.data.synthetic import task_for_config, tokenizer_for_config
from softmax_one_jax.training import train

PLATFORM = jax.devices()[0].platform
SMALL = os.environ.get("SOFTMAX_ONE_NOTEBOOK_SMALL") == "1"
STEPS = 80 if SMALL else (400 if PLATFORM == "cpu" else 1000)
# softmax x optimizer; the small setting keeps the AdamW pair and the other optimizers on softmax.
VARIANTS = (["softmax,adamw", "softmax1,adamw", "softmax,orthoadam", "softmax,sgd"] if SMALL else
            [f"{s},{o}" for o in ("adamw", "orthoadam", "sgd") for s in ("softmax", "softmax1")])
LIVE = not SMALL  # redraw the first-token plot while training runs (CI draws it once, at the end)
print(f"platform {PLATFORM}, small={SMALL}: {len(VARIANTS)} runs of {STEPS} steps")

# %% [markdown]
# ## 1. The task
#
# Characters of the embedded corpus after a fixed BOS token. After one of the three most frequent
# characters (the **triggers**) the next token copies the token before the trigger; otherwise it
# follows the corpus's bigram statistics. A head that solves the copy attends to the previous
# token after a trigger, and has nothing to do elsewhere: the dormant queries are where a sink
# on BOS forms.

# %%
base = bigram_backcopy.get_config("softmax,adamw")
task, tokenizer = task_for_config(base.data), tokenizer_for_config(base.data)
BAYES = bayes_optimal_loss(task, base.seq_len, bos=True)
CHANCE = chance_first_token_mass(base.seq_len)
print(f"{tokenizer.vocab_size} tokens; triggers {[task.chars[i] for i in task.trigger_ids]}; "
      f"Bayes-optimal loss {BAYES:.3f} nats; chance first-token mass {CHANCE:.3f}")

# The batch the runs evaluate their outlier metrics on: the first validation batch.
inputs = validation_batches(base.data, tokenizer, base.seq_len, base.outlier_batch_size,
                            1)[0]["inputs"]
shown = inputs[0, 1:81]
print("sequence:", tokenizer.decode(shown).replace("\n", "⏎"))
print("triggers:", "".join("^" if t in task.trigger_ids else " " for t in shown))

# Chance first-token mass of trigger and non-trigger queries on that batch: 1 / (t + 1) averaged
# over the queries t >= 1 of each kind (the trigger positions shift it slightly from CHANCE).
is_trigger = np.isin(inputs, task.trigger_ids)
uniform = np.broadcast_to(1.0 / (np.arange(inputs.shape[1]) + 1.0), inputs.shape)
query = np.arange(inputs.shape[1]) >= 1
CHANCE_TRIGGER = uniform[is_trigger & query].mean()
CHANCE_NON_TRIGGER = uniform[~is_trigger & query].mean()
print(f"chance first-token mass on this batch: trigger queries {CHANCE_TRIGGER:.3f}, "
      f"non-trigger queries {CHANCE_NON_TRIGGER:.3f}")

# %% [markdown]
# ## 2. Train, watching the first-token mass
#
# Each run writes `metrics.jsonl` as it trains; the outlier metrics (first-token mass split into
# trigger and non-trigger queries, sink rate, null mass, ...) are logged every `OUTLIER_EVERY`
# steps. Training runs in a background thread and the plot is redrawn from the file (only outside
# the small setting; CI draws it once, below).

# %%
RUNS = ROOT / "runs" / "extreme_token_lab"
# Fresh runs each time: a workdir resumes the run it holds, so a changed STEPS would continue it.
shutil.rmtree(RUNS, ignore_errors=True)
OUTLIER_EVERY = 10 if SMALL else 25


def lab_config(variant):
  c = bigram_backcopy.get_config(variant)
  c.num_train_steps = STEPS
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, STEPS // 2)
  c.log_every_steps = c.outlier_every_steps = OUTLIER_EVERY
  c.eval_every_steps = c.checkpoint.every_steps = STEPS
  c.progress_bar = False
  return c


def label(variant):
  return variant.replace(",", " + ")


def plot_dynamics(series_by_run):
  """First-token mass of non-trigger queries, and training loss, over steps."""
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
  for i, (variant, series) in enumerate(series_by_run.items()):
    color, style = plt.get_cmap("tab10")(i), "-" if variant.startswith("softmax,") else "--"
    mass = [(r["step"], r["first_token_mass_non_trigger"]) for r in series
            if "first_token_mass_non_trigger" in r]
    loss = [(r["step"], r["loss"]) for r in series if "loss" in r]
    if mass:
      ax0.plot(*zip(*mass), style, color=color, marker=".", label=label(variant))
    if loss:
      ax1.plot(*zip(*loss), style, color=color, label=label(variant))
  ax0.axhline(CHANCE, color="gray", ls="-.", lw=0.8, label="chance (uniform attention)")
  ax0.set(xlabel="step", ylabel="attention on BOS", title="first-token mass, non-trigger queries",
          xlim=(0, STEPS), ylim=(0, 1))
  ax1.axhline(BAYES, color="k", ls="-.", lw=0.8, label="Bayes-optimal")
  ax1.set(xlabel="step", ylabel="nats", title="training loss", xlim=(0, STEPS))
  ax0.legend(fontsize=7)
  ax1.legend(fontsize=7)
  fig.tight_layout()
  return fig


results, series = {}, {}
handle = display(Markdown("training ..."), display_id=True) if LIVE else None
started = time.perf_counter()
for variant in VARIANTS:
  workdir = RUNS / variant.replace(",", "-")
  outcome = {}

  def run(variant=variant, workdir=workdir, outcome=outcome):
    try:
      outcome["result"] = train(lab_config(variant), workdir, outlier_metrics=outlier_metrics)
    except BaseException as e:  # re-raised in the notebook's thread
      outcome["error"] = e

  thread = threading.Thread(target=run)
  thread.start()
  while thread.is_alive():
    thread.join(timeout=5)
    if LIVE:
      series[variant] = read_series(workdir)
      fig = plot_dynamics(series)
      handle.update(fig)
      plt.close(fig)
  if "error" in outcome:
    raise outcome["error"]
  results[variant], series[variant] = outcome["result"], read_series(workdir)
  print(f"{label(variant)}: {STEPS} steps, val loss {results[variant]['val_loss']:.3f} "
        f"({time.perf_counter() - started:.0f} s so far)")
if LIVE:
  handle.update(Markdown("done: the final plot is below."))

# %%
plot_dynamics(series)
plt.show()

# %% [markdown]
# In the saved outputs (small setting: 80 steps, seed 0): the first-token mass of **both** AdamW
# runs is above the chance line from step 20 and climbs fastest after step 50, to 0.37 (softmax) and
# 0.41 (softmax-1) at step 80, still rising; softmax-1 does not hold it back. softmax + OrthoAdam
# and softmax + SGD stay at chance, and their losses are further from the Bayes-optimal line: they
# have learned less in 80 steps. After 1,000 steps the README reports 0.85 ± 0.11 for softmax +
# AdamW, 0.93 ± 0.08 for softmax-1 + AdamW, 0.35 ± 0.18 for softmax + OrthoAdam and 0.09 ± 0.01 for
# softmax + SGD (3 seeds each; 8 for softmax-1 + AdamW).

# %% [markdown]
# ## 3. Inside the trained models: attention maps
#
# The head's attention on the first validation sequence (first 48 tokens): the softmax + AdamW
# head and its softmax-1 counterpart. A sink shows as a bright column 0; the title gives the mean
# mass on key 0 and on softmax-1's null key (`1 - row sum`) over queries >= 1. Orange marks
# trigger queries (the back-copy looks one token behind the trigger, on the sub-diagonal).

# %%
trigger_ids = tokenizer.trigger_ids
inside = {v: attention_and_norms(RUNS / v.replace(",", "-"), trigger_ids) for v in VARIANTS}
pair = ["softmax,adamw", "softmax1,adamw"]
first = 48
fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.8), constrained_layout=True)
for ax, variant in zip(axes, pair):
  probs = np.asarray(inside[variant]["probs"])[0]              # layer 0, head 0: [T, T]
  p = probs[:first, :first]
  im = ax.imshow(p, cmap="viridis", vmin=0, vmax=1)
  trig = np.nonzero(np.asarray(inside[variant]["triggers"])[:first])[0]
  ax.scatter(np.full(trig.shape, first - 0.5), trig, marker="<", color="tab:orange", s=12,
             clip_on=False)
  null = np.clip(1.0 - probs.sum(-1), 0.0, 1.0)
  ax.set_title(f"{label(variant)}\nkey-0 mass {probs[1:, 0].mean():.2f}, "
               f"null mass {null[1:].mean():.2f}", fontsize=9)
  ax.set(xlabel="key position", ylabel="query position")
fig.colorbar(im, ax=axes, shrink=0.8, label="attention probability")
plt.show()

# %% [markdown]
# In the saved outputs both heads look alike: a run of non-trigger queries (about 25 to 41) puts
# most of its attention on key 0, a bright column in the softmax-1 head as much as in the softmax
# one, and the softmax-1 head gives its null key 0.01 of the attention. The trigger queries
# (orange) attend to recent keys, not to key 0.

# %% [markdown]
# ## 4. Residual-stream norms by position
#
# The norm of the block's output at each position, averaged over the validation batch. A
# "residual peak" would be a first token whose norm stands far above the rest.

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for i, variant in enumerate(VARIANTS):
  norms = np.asarray(inside[variant]["residual_norm"])[-1]     # the last block's output: [T]
  ax.plot(np.arange(len(norms)), norms, "-" if variant.startswith("softmax,") else "--",
          color=plt.get_cmap("tab10")(i), label=label(variant))
ax.set(xlabel="token position", ylabel="|block output|", yscale="log",
       title="block output norm by position (mean over the batch)")
ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# In the saved outputs no run's position 0 (BOS) stands above the other positions: no residual
# peak (the table's residual-peak ratios are 0.8 to 1.1). The norms' level differs by optimizer
# (SGD's is several times lower). The README's runs grew no residual peak in 1,000 steps either.

# %% [markdown]
# ## 5. The final metrics, chance beside every rate
#
# From each run's last evaluation (the first validation batch, 32 sequences). Chance is what a
# head spreading its attention uniformly over the keys it sees would score: first-token mass and
# the share of queries whose largest logit is on BOS are then `mean over t of 1/(t+1)`; no head
# passes the sink threshold (0.3), so the sink rate's chance level is 0. The null mass has no
# chance level (softmax has no null key); value drain and residual peak are ratios whose
# no-effect value is 1.

# %%
def cell(value, fmt="{:.3f}"):
  return "–" if value is None or not np.isfinite(value) else fmt.format(value)


rows = ["| run | val loss − Bayes | 1st-token mass, non-trigger q (chance) | 1st-token mass, "
        "trigger q (chance) | sink rate (chance) | largest logit on BOS (chance) | null mass | "
        "value drain (1 = none) | residual peak (1 = none) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for variant, r in results.items():
  chance = r["first_token_chance"]
  rows.append(
      f"| {label(variant)} | {cell(r['val_loss'] - BAYES)} "
      f"| {cell(r['first_token_mass_non_trigger'])} ({CHANCE_NON_TRIGGER:.3f}) "
      f"| {cell(r['first_token_mass_trigger'])} ({CHANCE_TRIGGER:.3f}) "
      f"| {cell(r['sink_rate'], '{:.2f}')} (0) "
      f"| {cell(r['first_token_attention'])} ({chance:.3f}) "
      f"| {cell(r.get('null_mass'))} | {cell(r['value_drain_ratio'], '{:.2f}')} "
      f"| {cell(r['residual_peak_ratio'], '{:.2f}')} |")
display(Markdown("\n".join(rows) + f"\n\n{STEPS} steps, seed 0, one run per row. Bayes-optimal "
                 f"loss {BAYES:.3f} nats."))

# %% [markdown]
# In the saved outputs (80 steps): both AdamW runs give BOS about ten times the chance mass on
# non-trigger queries (about 0.4 against 0.038) and nothing on trigger queries, and BOS holds the
# largest logit for over a third of the queries (chance 0.035). The sink rate is still 0 in
# every run: averaged over all queries, trigger ones included, the head gives BOS less than 0.3.
# softmax-1 + AdamW sends 0.01 to its null key: softmax-1 does not remove the sink here, as in
# the README's 1,000-step runs. In both AdamW runs BOS's value vector is shorter than the other
# tokens' (value drain below 1). softmax + OrthoAdam and softmax + SGD stay at the chance
# first-token mass (SGD's head does put its largest logit on BOS for 0.14 of the queries).
# For the README's 1,000-step numbers (3 to 8 seeds per condition, and 3-layer, no-BOS and
# scalar-norm variants), run `python experiments/run_lab.py`; its table and figures are in
# `experiments/results/bigram_backcopy/`.
