"""Base experiment configuration: every field a run reads, with its default.

Experiment files (tiny.py, gpt2.py, llama2.py) start from ``get_base_config()`` and change fields.
Any field can be overridden on the command line, e.g.::

  softmax-one train --config=experiments/configs/tiny.py --workdir=runs/tiny \
      --config.optimizer.learning_rate=3e-4 --config.num_train_steps=500

``softmax_one_jax.training.config.validate_config`` checks every enumerated field before anything
is compiled.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from softmax_one_jax.data import default_data_config
from softmax_one_jax.models import preset
from softmax_one_jax.models.config import NORMS, SOFTMAXES
from softmax_one_jax.training.state import OPTIMIZER_NAMES


def model_config(preset_name: str, **overrides) -> ml_collections.ConfigDict:
  """The model preset's fields as a ConfigDict (``vocab_size`` left to the tokenizer).

  Args:
    preset_name: a name from ``softmax_one_jax.models.PRESET_NAMES`` (e.g. "tiny", "gpt2-60m").
    **overrides: TransformerConfig fields to change (e.g. ``softmax="softmax"``).
  """
  fields = dataclasses.asdict(preset(preset_name, **overrides))
  # Derived fields stay unset, so overriding num_heads or d_model re-derives them.
  if fields["num_kv_heads"] == fields["num_heads"] and "num_kv_heads" not in overrides:
    fields["num_kv_heads"] = None
  if fields["head_dim"] == fields["d_model"] // fields["num_heads"] and "head_dim" not in overrides:
    fields["head_dim"] = None
  cfg = ml_collections.ConfigDict()
  for k, v in fields.items():
    # Optional fields (None) get a typed placeholder so a command-line override keeps its type.
    if v is None:
      v = config_dict.placeholder(_OPTIONAL_FIELD_TYPES.get(k, str))
    if k == "remat":
      # A policy name, or True / False as configs written when remat was a switch still set it
      # (TransformerConfig maps them to "full" / "none"): untyped, so both are accepted.
      v = config_dict.FieldReference(v, field_type=object)
    cfg[k] = v
  # 0 = use the tokenizer's vocabulary size (rounded up to `vocab_multiple`).
  cfg.vocab_size = 0
  cfg.vocab_multiple = 128
  cfg.preset = preset_name
  return cfg


_OPTIONAL_FIELD_TYPES = {"num_kv_heads": int, "head_dim": int, "attention_impl": str,
                         "mlp_dim": int, "init_std": float}


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (a small CPU-sized run)."""
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0
  c.seq_len = 128
  c.global_batch_size = 16        # sequences per optimizer step, over all processes
  c.grad_accum_steps = 1          # microbatches per step (global_batch_size must divide)
  c.num_train_steps = 200

  c.model = model_config("tiny", softmax="softmax1")

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "orthoadam"  # adamw | orthoadam | sgd (with momentum)
  c.optimizer.learning_rate = 1e-3  # peak learning rate (SGD needs its own, far larger)
  c.optimizer.warmup_steps = 20
  c.optimizer.decay_steps = 0     # 0 = num_train_steps (cosine decay over the whole run)
  c.optimizer.end_lr_fraction = 0.1  # final learning rate / peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9      # sgd only (heavy-ball)
  c.optimizer.weight_decay = 0.1  # decoupled; matrices only (ndim >= 2)
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optimizer.rotation = config_dict.placeholder(str)  # OrthoAdam rotation family; None = default
  # OrthoAdam rotation seed: Q is a function of (seed, parameter path, shape, family), never of
  # the mesh.
  c.optimizer.seed = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1                # -1 = all remaining devices
  c.mesh.tensor = 1
  # Several TPU slices (e.g. --topology=2xv5e:4x4): the data axis's factor across slices, over
  # DCN; mesh.data counts all of it. 0 = the number of slices (1 on a single slice).
  c.mesh.dcn_data = 0
  # The accelerator slice the run is sized for (`softmax-one compile` builds its program there),
  # e.g. "v5e:4x4"; None: give --topology.
  c.topology = config_dict.placeholder(str)

  c.data = default_data_config()
  # Data shards of the global batch (0 = one per process). Fix it to make runs reproducible across
  # process counts: each process reads data_shards / process_count shards.
  c.data_shards = 0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.log_every_steps = 10
  c.eval_every_steps = 100        # validation loss / perplexity; 0 disables
  c.eval_batches = 8
  c.eval_batch_size = 16
  c.outlier_every_steps = 100     # first-token attention, kurtosis, max |activation|; 0 disables
  c.outlier_batch_size = 8
  c.max_nonfinite_steps = 10      # stop after this many consecutive non-finite steps
  # Most logits per device in one chunk of the fused LM-head loss (chunks also hold at most 512
  # tokens per device); 0 = 2^24, the same on every platform. Smaller keeps smaller chunks of
  # logits in memory; the results do not change (bench/train.py --loss_chunk_logits: its speed).
  c.loss_chunk_logits = 0
  c.progress_bar = True
  return c


# The paper's grid compares the Adam family; SGD is the extreme-token lab's control only.
OPTIMIZERS = tuple(name for name in OPTIMIZER_NAMES if name != "sgd")


def parse_variant(arg: str, default_norm: str = "layernorm") -> tuple[str, str, str]:
  """Parses ``softmax,optimizer[,norm]`` (the config-file argument of tiny/gpt2/llama2).

  The norm is its own axis: without one, every optimizer gets ``default_norm`` (the family's
  own), so changing the optimizer changes nothing else. The paper's pairing of OrthoAdam with a
  scalar-gain norm is the explicit third part, e.g. ``softmax1,orthoadam,scalar_layernorm``
  (GPT-2 family: only the gain changes) or ``softmax1,orthoadam,scalar_rmsnorm`` (Llama family).

  Args:
    arg: the argument, e.g. ``"softmax1,orthoadam"`` or ``"softmax,adamw,scalar_rmsnorm"``.
    default_norm: the norm when ``arg`` names none, one of ``NORMS``.

  Returns:
    ``(softmax, optimizer, norm)``.

  Raises:
    ValueError: a part is missing or not allowed; the message lists the allowed values (the
      softmax and norm sets are ``TransformerConfig``'s, the optimizers a subset of the package's).

  Example:
    >>> parse_variant("softmax1,orthoadam")
    ('softmax1', 'orthoadam', 'layernorm')
    >>> parse_variant("softmax1,orthoadam,scalar_layernorm")
    ('softmax1', 'orthoadam', 'scalar_layernorm')
  """
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  if len(parts) not in (2, 3):
    raise ValueError(f"config argument {arg!r} must be 'softmax,optimizer[,norm]' with softmax in "
                     f"{SOFTMAXES}, optimizer in {OPTIMIZERS}, norm in {NORMS}.")
  softmax, optimizer = parts[0], parts[1]
  norm = parts[2] if len(parts) == 3 else default_norm
  for field, value, allowed in (("softmax", softmax, SOFTMAXES),
                                ("optimizer", optimizer, OPTIMIZERS), ("norm", norm, NORMS)):
    if value not in allowed:
      raise ValueError(f"config argument {field}={value!r} is not allowed; choose one of "
                       f"{', '.join(allowed)}.")
  return softmax, optimizer, norm


def variant_name(prefix: str, softmax: str, optimizer: str, norm: str, default_norm: str) -> str:
  """A run name that names every factor that differs from the family's defaults.

  The norm is appended only when it is not ``default_norm``, so the name is a function of the
  configuration: equal configs share a name, different norms never do.

  Example:
    >>> variant_name("tiny", "softmax1", "orthoadam", "scalar_layernorm", "layernorm")
    'tiny-softmax1-orthoadam-scalar_layernorm'
  """
  return f"{prefix}-{softmax}-{optimizer}" + ("" if norm == default_norm else f"-{norm}")
