"""The train state and the one train step.

``train_step(state, batch, teacher_params) -> (state, metrics)`` is a pure function: the
RNG of a step is ``fold_in(seed_key, step)``, so a resumed run draws exactly the noise of
an uninterrupted one. What the step scores is the distillation plan's business
(``tide_jax.distill.plan``): it draws the step's noise, asks the teacher, and sums the
student's cross-entropy and the recipe's term; the step differentiates that and applies
the optimizer. With ``train.microbatches = k`` the batch is scored in k slices inside the
compiled step (a ``scan``), each normalised by the whole batch's totals, so the update is
the full batch's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from tide_jax.distill import plan as plan_lib


@struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training bit-for-bit.

  Attributes:
    step: int32 scalar, number of completed steps.
    params: nnx.State of the student's parameters.
    opt_state: optax state.
    rng: uint32 key data of the run's base key (``jax.random.key_data``).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(
    params: nnx.State, tx: optax.GradientTransformation, seed: int
) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
  )


def step_key(state: TrainState, rng_offset: int = 0) -> jax.Array:
  """``fold_in(seed_key, step)``, then ``fold_in(., rng_offset)`` when the offset is not 0.

  ``train.rng_offset`` gives a resumed run different noise from the same seed (the way past
  a non-finite step); offset 0 keeps the noise of runs that never set it.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  return jax.random.fold_in(key, rng_offset) if rng_offset else key


def split_microbatches(tree: Any, count: int) -> Any:
  """``[b, ...] -> [count, b / count, ...]``; micro-batch m holds rows ``m, m + k, ...``.

  Taking every k-th row keeps each micro-batch spread over the devices exactly as the
  batch is (a device's contiguous rows fall into every micro-batch equally), so no rows
  move between devices.
  """

  def one(x):
    if x.shape[0] % count:
      raise ValueError(
          f"A batch of {x.shape[0]} rows does not split into train.microbatches={count}; "
          "use a batch size that is a multiple of it."
      )
    return jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)

  return jax.tree.map(one, tree)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    plan: plan_lib.Plan,
    total_steps: int,
    microbatches: int = 1,
    rng_offset: int = 0,
):
  """Builds the pure step function (not yet jitted; see ``loop`` for jit + shardings).

  ``microbatches`` is ``train.microbatches``; ``rng_offset`` is ``train.rng_offset`` (see
  :func:`step_key`).
  """
  if microbatches < 1:
    raise ValueError(f"train.microbatches must be at least 1, got {microbatches}.")

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params=None):
    train_step.traces += 1  # Python side effect: runs once per trace, i.e. per compilation
    progress = state.step.astype(jnp.float32) / max(total_steps, 1)
    noise = plan.draw(step_key(state, rng_offset), batch)
    totals = plan.totals(batch, noise)

    def loss_fn(params, rows, rows_noise):
      model = nnx.merge(graphdef, params)
      parts = plan.loss_parts(model, teacher_params, rows, rows_noise, progress)
      return plan.loss(parts, totals), parts

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (_, parts), grads = grad_fn(state.params, batch, noise)
    else:

      def accumulate(carry, xs):
        grads_sum, parts_sum = carry
        (_, parts), grads = grad_fn(state.params, *xs)
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
        return (grads_sum, plan_lib.add_parts(parts_sum, parts)), None

      zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      zero_parts = {name: jnp.float32(0.0) for name in plan_lib.PART_NAMES}
      (grads, parts), _ = jax.lax.scan(
          accumulate,
          (zero_grads, zero_parts),
          split_microbatches((batch, noise), microbatches),
      )
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    metrics = plan.metrics(parts, totals)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = lr_schedule(state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  train_step.traces = 0
  return train_step


def make_eval_step(graphdef: nnx.GraphDef, plan: plan_lib.Plan):
  """``eval_step(params, batch, key) -> metrics`` with a caller-fixed key (reproducible)."""

  def eval_step(params, batch, key):
    noise = plan.draw(key, batch)
    parts = plan.loss_parts(nnx.merge(graphdef, params), None, batch, noise, 0.0)
    return plan.metrics(parts, plan.totals(batch, noise))

  return eval_step


class NonFiniteError(FloatingPointError):
  """Raised when a step produced a NaN or infinite loss or gradient norm."""


def check_finite(step: int, metrics: dict[str, Any]) -> None:
  """Stops training with a message naming the step when loss or grad norm is not finite."""
  for name in ("loss", "grad_norm"):
    value = float(metrics[name])
    if not jnp.isfinite(value):
      raise NonFiniteError(
          f"Training stopped at step {step}: {name} is {value}; re-run the same command with "
          "--config.train.rng_offset=N (any N not used before) to resume from the last "
          "checkpoint with different noise, or lower optim.learning_rate, or check the data."
      )
