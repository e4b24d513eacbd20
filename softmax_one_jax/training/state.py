"""The training state pytree, the optimizer, and their shardings.

The model is split once: ``nnx.split(model, nnx.Param, ...)`` gives a static ``graphdef``, the
parameters (an ``nnx.State`` of plain fp32 arrays) and any other model state (kept constant).
The optimizer is a plain optax transformation on the parameters, so ``jax.jit`` shardings and Orbax
see plain arrays; optimizer-state shardings (OrthoAdam rotations included) come from
``softmax_one_jax.optim.optimizer_state_shardings``.

Example:
  >>> mesh = make_mesh(1, -1, 1)
  >>> tx, schedule = build_optimizer(config.optimizer, config.num_train_steps)
  >>> setup = make_setup(model_cfg, tx, schedule, mesh, seed=0)
  >>> init_train_state(setup, model_cfg, seed=0).step
  Array(0, dtype=int32)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from softmax_one_jax.models import Transformer
from softmax_one_jax.optim import DEFAULT_ROTATION, optimizer_state_shardings, orthoadam
from softmax_one_jax.data import get_tokenizer
from softmax_one_jax.rundir import (abstract_model, model_config_from, padded_vocab_size,
                                    param_shardings)
from softmax_one_jax.training import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays (what a checkpoint holds).

  Attributes:
    step: int32 [] optimizer steps taken (skipped non-finite steps included).
    params: ``nnx.State`` of fp32 parameters.
    opt_state: the optax state (OrthoAdam rotations included).
    rng: uint32 [2] raw key data of the run's training RNG (folded with ``step`` per step).
    nonfinite_streak: int32 [] consecutive steps skipped for a non-finite loss or gradient.
    nonfinite_total: int32 [] all skipped steps.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The static half of training: model graph, optimizer, mesh and shardings."""
  graphdef: Any
  rest: Any                      # non-Param model state (constant during training)
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  mesh: Mesh
  state_shardings: TrainState    # NamedSharding per leaf
  abstract_state: TrainState     # ShapeDtypeStruct (with sharding) per leaf
  # Most logits per device in one chunk of the fused LM-head loss; None: the platform-neutral
  # default of ``models.loss.sequence_chunk``. Smaller keeps smaller chunks of logits in memory.
  loss_chunk_logits: int | None = None


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to ``opt.learning_rate`` then cosine decay to ``end_lr_fraction`` of it.

  Example:
    >>> s = learning_rate_schedule(cfg.optimizer, 100); float(s(0)), float(s(cfg.optimizer.warmup_steps))
    (0.0, 0.001)
  """
  decay_steps = int(opt.decay_steps or num_train_steps)
  warmup = int(opt.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(opt.learning_rate), warmup_steps=warmup,
      decay_steps=max(decay_steps, warmup + 1),
      end_value=float(opt.learning_rate) * float(opt.end_lr_fraction))


def weight_decay_mask(params: Any) -> Any:
  """True for matrices (ndim >= 2): norms' gains and biases are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


OPTIMIZER_NAMES = ("adamw", "orthoadam", "sgd")


def sgd_momentum(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SGD with heavy-ball momentum and decoupled weight decay on matrices (as AdamW's).

  ``u = -lr * (m + wd * p)`` with ``m <- momentum * m + g``: no per-coordinate normalisation, the
  control for what Adam's normalisation does to the residual stream (Guo et al. 2024).

  Example:
    >>> tx = sgd_momentum(0.1, momentum=0.9)
    >>> u, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
    >>> u["w"]
    Array([-0.1, -0.1], dtype=float32)
  """
  return optax.chain(optax.trace(decay=momentum),
                     optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def build_optimizer(opt: ml_collections.ConfigDict, num_train_steps: int,
                    param_shardings: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer: global-norm clipping, then AdamW, OrthoAdam or SGD with the schedule.

  OrthoAdam's ``Q`` is a function of (seed, parameter path, shape, family) alone: the same on
  every mesh. Given ``param_shardings``, each axis is rotated in a layout where it is whole
  (``softmax_one_jax.optim.layout``), so the update moves about a shard per sharded matrix.

  Args:
    opt: ``config.optimizer`` (name, learning_rate, warmup_steps, decay_steps, end_lr_fraction,
      b1, b2, eps, weight_decay, grad_clip_norm, rotation, seed; ``momentum`` for "sgd").
    num_train_steps: the run's length (cosine decay horizon when ``decay_steps`` is 0).
    param_shardings: the parameters' shardings (``param_shardings``): where OrthoAdam rotates.

  Returns:
    ``(tx, schedule)``: an optax transformation on the parameters and its learning-rate schedule.
  """
  schedule = learning_rate_schedule(opt, num_train_steps)
  if opt.name == "adamw":
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=weight_decay_mask)
  elif opt.name == "orthoadam":
    core = orthoadam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=weight_decay_mask,
                     rotation=opt.rotation or DEFAULT_ROTATION, seed=int(opt.seed),
                     shardings=param_shardings)
  elif opt.name == "sgd":
    core = sgd_momentum(schedule, momentum=float(opt.momentum),
                        weight_decay=opt.weight_decay)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r} is not allowed; choose one of "
                     f"{OPTIMIZER_NAMES}.")
  if opt.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core), schedule
  return core, schedule


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        p_shardings: Any) -> Any:
  """Optimizer-state shardings: ``softmax_one_jax.optim.optimizer_state_shardings``."""
  return optimizer_state_shardings(tx, abstract_params, p_shardings)


def _abstract(x: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _init_fn(model_cfg: Any, tx: optax.GradientTransformation, seed: int
             ) -> Callable[[], tuple[TrainState, nnx.State]]:
  def init() -> tuple[TrainState, nnx.State]:
    model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.key_data(jax.random.key(seed + 1)),
                       nonfinite_streak=jnp.zeros((), jnp.int32),
                       nonfinite_total=jnp.zeros((), jnp.int32))
    return state, rest
  return init


def make_setup(model_cfg: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
               mesh: Mesh, seed: int, loss_chunk_logits: int | None = None) -> TrainSetup:
  """Graph, shardings and abstract state of a run; allocates no parameters.

  Args:
    model_cfg: ``softmax_one_jax.models.TransformerConfig``.
    tx: the optimizer (``build_optimizer``).
    schedule: its learning-rate schedule (for metrics).
    mesh: the device mesh.
    seed: parameter-initialisation seed (also seeds the training RNG).
    loss_chunk_logits: logits per device per chunk of the loss (None: the default budget).

  Returns:
    A ``TrainSetup``; ``setup.abstract_state`` is the restore target for checkpoints.
  """
  graphdef, abs_params, abs_rest = abstract_model(model_cfg)
  p_sh = param_shardings(abs_params, mesh)
  o_sh = opt_state_shardings(tx, abs_params, p_sh)
  rep = mesh_lib.replicated(mesh)
  shardings = TrainState(step=rep, params=p_sh, opt_state=o_sh, rng=rep, nonfinite_streak=rep,
                         nonfinite_total=rep)
  init = _init_fn(model_cfg, tx, seed)
  abstract, _ = jax.eval_shape(init)
  abstract = jax.tree.map(_abstract, abstract, shardings)
  # Non-Param model state (if any) is created replicated and kept constant during training;
  # XLA drops the unused parameter initialisation from this program.
  rest = abs_rest
  if jax.tree.leaves(abs_rest):
    rest = jax.jit(lambda: init()[1], out_shardings=jax.tree.map(lambda _: rep, abs_rest))()
  return TrainSetup(graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, mesh=mesh,
                    state_shardings=shardings, abstract_state=abstract,
                    loss_chunk_logits=loss_chunk_logits)


def setup_for_run(model_cfg: Any, opt: ml_collections.ConfigDict, num_train_steps: int,
                  mesh: Mesh, seed: int, loss_chunk_logits: int | None = None) -> TrainSetup:
  """``make_setup`` with the run's optimizer built for its mesh (``build_optimizer`` given the
  parameter shardings: where OrthoAdam rotates, never which ``Q``).

  Args:
    model_cfg, mesh, seed, loss_chunk_logits: as ``make_setup``.
    opt, num_train_steps: as ``build_optimizer``.

  Example:
    >>> setup = setup_for_run(model_cfg, config.optimizer, config.num_train_steps, mesh, seed=0)
  """
  _, abstract_params, _ = abstract_model(model_cfg)
  tx, schedule = build_optimizer(opt, num_train_steps, param_shardings(abstract_params, mesh))
  return make_setup(model_cfg, tx, schedule, mesh, seed, loss_chunk_logits)


def init_train_state(setup: TrainSetup, model_cfg: Any, seed: int) -> TrainState:
  """Fresh parameters and optimizer state, created directly in their shardings.

  Args:
    setup: from ``make_setup`` (same ``model_cfg`` and ``seed``).
    model_cfg: ``softmax_one_jax.models.TransformerConfig``.
    seed: parameter-initialisation seed.

  Returns:
    The step-0 ``TrainState``.
  """
  init = _init_fn(model_cfg, setup.tx, seed)
  return jax.jit(lambda: init()[0], out_shardings=setup.state_shardings)()


def merge_model(setup: TrainSetup, params: nnx.State) -> nnx.Module:
  """The ``Transformer`` with ``params`` (for evaluation and analysis)."""
  return nnx.merge(setup.graphdef, params, setup.rest)


def _resolve(config: ml_collections.ConfigDict, tokenizer_vocab_size: int
             ) -> ml_collections.ConfigDict:
  """A copy of the config with the model's vocabulary resolved (what config.json records)."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model.vocab_size = padded_vocab_size(config, tokenizer_vocab_size)
  return resolved


def build_run(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
              ) -> tuple[Any, ml_collections.ConfigDict, Any, TrainSetup]:
  """Tokenizer, resolved config, model config and setup (its mesh included) of a run.

  Args:
    config: the run config.
    devices: the mesh's devices (default: all of this process's global devices); a compile-only
      topology's devices build the same setup for a slice this host does not have.
  """
  tokenizer = get_tokenizer(config.data)
  config = _resolve(config, tokenizer.vocab_size)
  model_cfg = model_config_from(config, tokenizer.vocab_size)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=devices, dcn_data=int(config.mesh.get("dcn_data", 0)))
  for axis in mesh_lib.MESH_AXES:   # config.json records the mesh the run really used
    config.mesh[axis] = int(mesh.shape[axis])
  setup = setup_for_run(model_cfg, config.optimizer, config.num_train_steps, mesh, config.seed,
                        loss_chunk_logits=config.loss_chunk_logits or None)
  return tokenizer, config, model_cfg, setup
