"""Forward noising of token sequences and EOS padding to a block multiple."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tide_jax.diffusion import schedules


def noise_tokens(
    key: jax.Array,
    input_ids: jax.Array,
    maskable: jax.Array,
    t: jax.Array,
    mask_token_id: int,
    schedule: str = "linear",
) -> tuple[jax.Array, jax.Array]:
  """Replaces each maskable token by the mask token with probability ``1 - alpha(t)``.

  Args:
    key: PRNG key.
    input_ids: int ``[b, L]`` clean tokens x_0.
    maskable: bool ``[b, L]``; False for prompt and padding, which are never touched.
    t: float ``[b]`` diffusion time per sequence, or ``[b, L]`` per token (packed rows:
      each example's own time on its tokens).
    mask_token_id: id written at masked positions.
    schedule: alpha schedule name.

  Returns:
    ``(x_t, masked)``: noised ids ``[b, L]`` and the bool mask of replaced positions.
  """
  keep_prob = schedules.alpha(t, schedule)
  keep_prob = keep_prob[:, None] if keep_prob.ndim == 1 else keep_prob
  u = jax.random.uniform(key, input_ids.shape, jnp.float32)
  masked = (u >= keep_prob) & maskable
  return apply_mask(input_ids, masked, mask_token_id), masked


def apply_mask(ids: jax.Array, masked: jax.Array, mask_token_id: int) -> jax.Array:
  """``ids`` with every ``masked`` position replaced by ``mask_token_id`` (same shape, dtype).

  The one place that writes the mask token: student noising, teacher inputs, the sampler
  and the bits-per-byte bound all call it.
  """
  return jnp.where(masked, jnp.asarray(mask_token_id, ids.dtype), ids)


def pad_to_block_multiple(ids: np.ndarray | list[int], block_size: int, eos_id: int) -> np.ndarray:
  """Right-pads a 1-D token sequence with EOS to the next multiple of ``block_size``.

  A sequence already on a block boundary gets no padding. The EOS padding is trained like
  content (docs/method.md §2).
  """
  ids = np.asarray(ids, dtype=np.int32)
  n_pad = (-len(ids)) % block_size
  return np.concatenate([ids, np.full((n_pad,), eos_id, np.int32)])
