"""The one denoiser forward pass: hidden states of a noised sequence under its objective.

``bd3lm`` (the student) feeds ``[x_t ; x_0]`` (length 2L, positions ``0..L-1`` twice)
with the BD3LM mask and returns the x_t half; ``mdlm`` (a bidirectional model, e.g. the
smoke teacher) feeds ``x_t`` alone with bidirectional attention over valid keys. The
train step, the held-out evaluation and bits per byte all call :func:`denoiser_hidden`;
the output projection is left to the fused objectives (``tide_jax.distill.fused``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tide_jax.diffusion import masks

OBJECTIVES = ("bd3lm", "mdlm")


def check_objective(kind: str) -> None:
  if kind not in OBJECTIVES:
    raise ValueError(f"objective.kind={kind!r} is unknown; choose one of {', '.join(OBJECTIVES)}.")


def denoiser_hidden(
    model,
    clean_ids: jax.Array,
    x_t: jax.Array,
    *,
    kind: str,
    block_size: int,
    valid: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
  """Final hidden states ``[b, L, E]`` at the x_t positions.

  Args:
    model: a decoder with ``hidden_states(ids, positions, mask)``.
    clean_ids: ``[b, L]`` int, x_0.
    x_t: ``[b, L]`` int, the noised sequence.
    kind: ``bd3lm`` or ``mdlm``.
    block_size: B (``bd3lm``; L must be a multiple).
    valid: optional ``[b, L]`` bool key validity. ``mdlm`` needs it; ``bd3lm`` attends to
      EOS padding like content unless it is given (held-out windows padded with a pad id).
    segment_ids: optional ``[b, L]`` int of packed rows (1, 2, ... per example, 0 =
      padding): attention stays within each example (``masks.packed_bd3lm_attention_mask``).
    positions: optional ``[b, L]`` int RoPE positions (packed rows: restarting at 0 per
      example); default ``0..L-1``.
  """
  check_objective(kind)
  b, length = clean_ids.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  if kind == "mdlm":
    if valid is None:
      raise ValueError("The mdlm objective needs the valid-token mask of the batch.")
    mask = masks.padding_attention_mask(valid)
    if segment_ids is not None:
      mask = mask & masks.same_segment_mask(segment_ids)[:, None]
    return model.hidden_states(x_t, positions, mask)
  if segment_ids is not None:
    mask = masks.packed_bd3lm_attention_mask(segment_ids, block_size)
  else:
    # NumPy, not jnp: a mask known at trace time lets attention_impl='blocked' / 'splash'
    # skip the fully masked tiles (a jnp op inside jit would make it a tracer).
    mask = masks.bd3lm_attention_mask(length, block_size)
  if valid is not None:
    keys = jnp.concatenate([valid, valid], axis=1)
    mask = mask & keys[:, None, :]
  both = jnp.concatenate([x_t, clean_ids], axis=1)
  positions2 = jnp.concatenate([positions, positions], axis=1)
  return model.hidden_states(both, positions2, mask)[:, :length]
