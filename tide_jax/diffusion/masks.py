"""Attention masks for block diffusion (BD3LM), causal and bidirectional attention.

Every mask is a boolean array where ``mask[q, k]`` is True when query position ``q`` may
attend to key position ``k``. Masks depend only on static shapes, so they are built with
NumPy once (at trace time) and enter the jitted step as constants; the masks of packed rows
(several examples per row, ``data.packing``) depend on the row's segment ids and are traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_block_multiple(seq_len: int, block_size: int) -> None:
  """Raises a clear error unless ``seq_len`` is a positive multiple of ``block_size``."""
  if block_size <= 0:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  if seq_len <= 0 or seq_len % block_size != 0:
    raise ValueError(
        f"Sequence length {seq_len} is not a multiple of the block size {block_size}; "
        f"set max_len to a multiple of {block_size} (for example "
        f"{max(block_size, -(-seq_len // block_size) * block_size)})."
    )


def bd3lm_attention_mask(seq_len: int, block_size: int, x0_first: bool = False) -> np.ndarray:
  """The BD3LM mask over the concatenation of a noised and a clean copy of a sequence.

  Layout ``[x_t ; x_0]`` (default) or ``[x_0 ; x_t]`` (``x0_first=True``, the order fed to
  the WeDLM teacher). With ``blk(i) = (i mod L) // B``:
    * block-diagonal: same half and ``blk(q) == blk(k)``;
    * offset block-causal: q in the x_t half, k in the x_0 half, ``blk(q) > blk(k)``;
    * block-causal: both in the x_0 half, ``blk(q) >= blk(k)``.

  Args:
    seq_len: L, the length of one half; a multiple of ``block_size``.
    block_size: B.
    x0_first: put the clean half first.

  Returns:
    bool array ``[2L, 2L]``.
  """
  check_block_multiple(seq_len, block_size)
  idx = np.arange(2 * seq_len)
  blk = (idx % seq_len) // block_size
  in_second = idx >= seq_len
  is_x0 = in_second if not x0_first else ~in_second
  q_blk, k_blk = blk[:, None], blk[None, :]
  q_x0, k_x0 = is_x0[:, None], is_x0[None, :]
  same_half = q_x0 == k_x0
  block_diagonal = same_half & (q_blk == k_blk)
  offset_block_causal = ~q_x0 & k_x0 & (q_blk > k_blk)
  block_causal = q_x0 & k_x0 & (q_blk >= k_blk)
  return block_diagonal | offset_block_causal | block_causal


def same_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """``[b, S] -> [b, S, S]``: query and key in the same segment, the key not padding (0).

  A padding query (segment 0) sees no key at all; attention returns zeros for it.
  """
  return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)


def packed_bd3lm_attention_mask(segment_ids: jax.Array, block_size: int) -> jax.Array:
  """The BD3LM ``[x_t ; x_0]`` mask of packed rows: each segment attends only within itself.

  Segments start on block boundaries, so within a segment the row's block indices order
  blocks exactly as the segment's own would: the mask is the block-diagonal of the
  per-segment BD3LM masks (in both halves), and padding attends nowhere.

  Args:
    segment_ids: ``[b, L]`` int, 1, 2, ... per example, 0 on padding.
    block_size: B (L a multiple).

  Returns:
    bool ``[b, 2L, 2L]``.
  """
  length = segment_ids.shape[1]
  both = jnp.concatenate([segment_ids, segment_ids], axis=1)
  return jnp.asarray(bd3lm_attention_mask(length, block_size))[None] & same_segment_mask(both)


def causal_attention_mask(seq_len: int) -> np.ndarray:
  """Lower-triangular causal mask ``[L, L]``."""
  return np.tril(np.ones((seq_len, seq_len), dtype=bool))


def padding_attention_mask(valid: np.ndarray) -> np.ndarray:
  """Bidirectional mask from key validity: ``[b, L] -> [b, 1, L, L]`` (works on jax arrays too)."""
  return valid[:, None, None, :] & np.ones((1, 1, valid.shape[-1], 1), dtype=bool)
