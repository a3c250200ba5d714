"""Masking schedules alpha(t) and the matching ELBO loss weight.

alpha(t) is the probability that a token is still clean at diffusion time t in [0, 1].
The masked-diffusion ELBO weights the cross-entropy of a masked token by
``w(t) = -alpha'(t) / (1 - alpha(t))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEDULES = ("linear", "cosine")


def check_schedule(name: str) -> None:
  if name not in SCHEDULES:
    raise ValueError(f"Unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}.")


def alpha(t: jax.Array, schedule: str = "linear") -> jax.Array:
  """alpha(t): linear ``1 - t`` or cosine ``1 - cos(pi/2 (1 - t))``."""
  check_schedule(schedule)
  if schedule == "linear":
    return 1.0 - t
  return 1.0 - jnp.cos(0.5 * jnp.pi * (1.0 - t))


def alpha_derivative(t: jax.Array, schedule: str = "linear") -> jax.Array:
  """d alpha / dt."""
  check_schedule(schedule)
  if schedule == "linear":
    return -jnp.ones_like(t)
  return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * (1.0 - t))


def loss_weight(t: jax.Array, schedule: str = "linear") -> jax.Array:
  """``w(t) = -alpha'(t) / (1 - alpha(t))``; equals ``1 / t`` for the linear schedule."""
  return -alpha_derivative(t, schedule) / (1.0 - alpha(t, schedule))


def sample_t(key: jax.Array, batch: int, eps: float = 1e-3) -> jax.Array:
  """One diffusion time per sequence, ``t ~ U[eps, 1)``; float32 ``[batch]``."""
  return jax.random.uniform(key, (batch,), jnp.float32, minval=eps, maxval=1.0)


def sample_segment_t(key: jax.Array, segment_ids: jax.Array, eps: float = 1e-3) -> jax.Array:
  """One diffusion time per segment of packed rows, on each of its tokens: ``[b, L]`` float32.

  Every possible segment id ``0..L`` of a row gets its own ``U[eps, 1)`` draw, so the
  examples packed into a row are noised independently, as they would be one per row.
  """
  b, length = segment_ids.shape
  per_segment = sample_t(key, b * (length + 1), eps).reshape(b, length + 1)
  return jnp.take_along_axis(per_segment, segment_ids.astype(jnp.int32), axis=1)
