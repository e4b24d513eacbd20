"""The jitted train and eval steps: weighted cross-entropy, accumulation, clipping, skip-on-NaN.

A train step takes the global batch ``[B, T]`` (sharded over ("data", "fsdp")), splits it into
``grad_accum_steps`` microbatches, sums fp32 gradients of the weighted token loss, normalises by
the number of weighted tokens, and applies the optimizer. A step whose loss or gradient norm is not
finite leaves parameters and optimizer state unchanged and is counted (``nonfinite_streak``,
``nonfinite_total``); the loop stops the run after too many in a row.

Example:
  >>> step_fn = jit_train_step(setup, grad_accum_steps=1, batch_size=B)
  >>> state, metrics = step_fn(state, batch)        # state is donated
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from softmax_one_jax.data import BATCH_KEYS
from softmax_one_jax.models.loss import linear_cross_entropy, sequence_chunk
from softmax_one_jax.training import mesh as mesh_lib
from softmax_one_jax.training.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def _loss_sums(params: nnx.State, batch: Batch, setup: TrainSetup) -> tuple[jax.Array, jax.Array]:
  """Weighted token-loss sums; the LM head and softmax are fused (no [B, T, V] logits), a chunk
  of at most ``setup.loss_chunk_logits`` logits per device at a time."""
  model = nnx.merge(setup.graphdef, params, setup.rest)
  x_btd = model.features(batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"])
  unembed_vd = model.unembedding()
  chunk = sequence_chunk(*x_btd.shape[:2], unembed_vd.shape[0], setup.loss_chunk_logits)
  return linear_cross_entropy(x_btd, unembed_vd, batch["targets"], batch["weights"], chunk=chunk)


def applied_learning_rate(schedule: optax.Schedule, opt_state: Any, step: jax.Array) -> jax.Array:
  """The learning rate the optimizer applies in its next update, at the count it keeps itself.

  ``optax.scale_by_learning_rate(schedule)`` (every optimizer of ``build_optimizer``) applies
  ``schedule(count)`` with the count of its ``ScaleByScheduleState``. A step skipped as
  non-finite keeps the old optimizer state, so that count stops while the train state's ``step``
  goes on; ``schedule(step)`` would then name a rate no update used. An optimizer that keeps no
  such count (a constant rate) falls back to ``schedule(step)``.

  Args:
    schedule: the optimizer's learning-rate schedule.
    opt_state: its state before the update.
    step: the train state's step, the fallback.

  Example:
    >>> tx = optax.adamw(optax.linear_schedule(0.0, 1.0, 10))
    >>> applied_learning_rate(optax.linear_schedule(0.0, 1.0, 10), tx.init(params), 5)
    Array(0., dtype=float32)
  """
  counts = optax.tree_utils.tree_get_all_with_path(
      opt_state, "count",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState")
  return schedule(counts[0][1] if counts else step)


def _microbatches(batch: Batch, num: int, sharding: NamedSharding | None) -> Batch:
  """[B, ...] -> [num, B/num, ...], microbatch j = rows j, j+num, ... (keeps each shard local)."""
  def split(x: jax.Array) -> jax.Array:
    b = x.shape[0]
    x = x.reshape((b // num, num) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    if sharding is not None:
      spec = PartitionSpec(None, *sharding.spec)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))
    return x
  return {k: split(v) for k, v in batch.items()}


def make_train_step(setup: TrainSetup, grad_accum_steps: int = 1,
                    microbatch_sharding: NamedSharding | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The (unjitted) train step ``(state, batch) -> (state, metrics)``.

  Args:
    setup: graphdef, non-Param state, optimizer and schedule (``make_setup``).
    grad_accum_steps: microbatches per step; gradients are summed in float32.
    microbatch_sharding: sharding of one microbatch ``[B/grad_accum_steps, T]`` (constraint).

  Returns:
    The step function. ``metrics``: "loss" (mean weighted token loss), "grad_norm" (before
    clipping), "learning_rate" (the optimizer's own: ``applied_learning_rate``), "tokens" (sum
    of weights), "finite" (1.0 if applied), "nonfinite_total".
  """
  tx, schedule = setup.tx, setup.schedule
  grad_fn = jax.value_and_grad(_loss_sums, has_aux=True)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    batch = {k: batch[k] for k in BATCH_KEYS}
    if grad_accum_steps == 1:
      (loss_sum, weight_sum), grads = grad_fn(state.params, batch, setup)
    else:
      micro = _microbatches(batch, grad_accum_steps, microbatch_sharding)

      def body(carry, mb):
        g_acc, l_acc, w_acc = carry
        (l, w), g = grad_fn(state.params, mb, setup)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (grads, loss_sum, weight_sum), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    denom = jnp.maximum(weight_sum, 1.0)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        rng=state.rng,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": applied_learning_rate(schedule, state.opt_state, state.step),
               "tokens": weight_sum, "finite": finite.astype(jnp.float32),
               "nonfinite_streak": new_state.nonfinite_streak,
               "nonfinite_total": new_state.nonfinite_total}
    return new_state, metrics

  return step


def in_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """``fn`` traced under ``mesh`` (``jax.sharding.use_abstract_mesh``).

  The model then sees the mesh: it constrains activations to their logical shardings, runs
  Pallas kernels once per shard, and picks the kernels of the mesh's platform (a TPU program
  compiled ahead of time on a CPU host takes the TPU paths).
  """
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def jit_train_step(setup: TrainSetup, grad_accum_steps: int, global_batch_size: int
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """``make_train_step`` under ``jax.jit`` with explicit shardings and the state donated.

  Args:
    setup: from ``make_setup``.
    grad_accum_steps: microbatches per step.
    global_batch_size: B (rows of the global batch).
  """
  mesh = setup.mesh
  b_sh = mesh_lib.batch_sharding(mesh, global_batch_size)
  mb_sh = mesh_lib.batch_sharding(mesh, global_batch_size // grad_accum_steps)
  step = make_train_step(setup, grad_accum_steps, mb_sh)
  rep = mesh_lib.replicated(mesh)
  batch_shardings = {k: b_sh for k in BATCH_KEYS}
  return jax.jit(in_mesh(step, mesh), in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))


def jit_eval_step(setup: TrainSetup, batch_size: int
                  ) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
  """Jitted ``(params, batch) -> (loss_sum, weight_sum)`` for validation.

  Args:
    setup: from ``make_setup``.
    batch_size: rows of an evaluation batch.
  """
  b_sh = mesh_lib.batch_sharding(setup.mesh, batch_size)
  rep = mesh_lib.replicated(setup.mesh)

  def eval_step(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return _loss_sums(params, {k: batch[k] for k in BATCH_KEYS}, setup)

  return jax.jit(in_mesh(eval_step, setup.mesh), in_shardings=(setup.state_shardings.params,
                                          {k: b_sh for k in BATCH_KEYS}),
                 out_shardings=(rep, rep))
