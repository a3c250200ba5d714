"""The train state and the one train step.

``train_step(state, batch, teacher_params) -> (state, metrics)`` is a pure function: the
RNG of a step is ``fold_in(seed_key, step)``, so a resumed run draws exactly the noise of an
uninterrupted one. Distillation recipes add one term through ``extra_loss``; the student's
own diffusion loss is always present.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from tide_jax.train import objective

# (student_model, batch, noised, key, progress, teacher_params) -> (loss, metrics)
ExtraLoss = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


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


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    config,
    total_steps: int,
    extra_loss: ExtraLoss | None = None,
    mask_fn: objective.MaskFn | None = None,
):
  """Builds the pure step function (not yet jitted; see ``loop`` for jit + shardings)."""
  obj_cfg = config.objective
  rng_offset = int(config.train.rng_offset)

  def loss_fn(params, batch, key, progress, teacher_params):
    model = nnx.merge(graphdef, params)
    key_student, key_extra = jax.random.split(key)
    loss, metrics, noised = objective.diffusion_loss(
        model, batch, key_student, obj_cfg, mask_fn, keep_logits=extra_loss is not None
    )
    if extra_loss is not None:
      extra, extra_metrics = extra_loss(model, batch, noised, key_extra, progress, teacher_params)
      loss = loss + extra
      metrics.update(extra_metrics)
    metrics["loss"] = loss
    return loss, metrics

  def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params=None):
    train_step.traces += 1  # Python side effect: runs once per trace, i.e. per compilation
    key = step_key(state, rng_offset)
    progress = state.step.astype(jnp.float32) / max(total_steps, 1)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, key, progress, teacher_params
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = lr_schedule(state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  train_step.traces = 0
  return train_step


def make_eval_step(graphdef: nnx.GraphDef, config):
  """``eval_step(params, batch, key) -> metrics`` with a caller-fixed key (reproducible)."""
  obj_cfg = config.objective

  def eval_step(params, batch, key):
    model = nnx.merge(graphdef, params)
    _, metrics, _ = objective.diffusion_loss(model, batch, key, obj_cfg)
    return metrics

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
