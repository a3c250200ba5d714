"""AdamW with warmup + decay and global-norm clipping, from ``config.optim``."""

from __future__ import annotations

import jax
import optax

from tide_jax.configs_lib import LR_DECAYS as DECAYS


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate`` then cosine/linear decay to ``lr_end_fraction``."""
  peak = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  end = peak * float(optim_cfg.lr_end_fraction)
  decay = optim_cfg.decay
  if decay not in DECAYS:
    raise ValueError(f"Unknown learning-rate decay {decay!r}; choose one of {', '.join(DECAYS)}.")
  if warmup >= total_steps and total_steps > 0:
    warmup = max(total_steps - 1, 0)
  decay_steps = max(total_steps - warmup, 1)
  warm = (
      optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak)
  )
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [warmup]) if warmup else after


def _decay_mask(params):
  """Weight decay on matrices only; norms and biases (rank <= 1) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    optim_cfg, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.grad_clip)),
      optax.adamw(
          schedule,
          b1=float(optim_cfg.b1),
          b2=float(optim_cfg.b2),
          eps=float(optim_cfg.eps),
          weight_decay=float(optim_cfg.weight_decay),
          mask=_decay_mask,
      ),
  )
  return tx, schedule
