"""How a teacher is fed (docs/method.md §3.4): the two input builders.

* ``bidirectional`` (pipeline A, LLaDA2): the noised teacher sequence alone, bidirectional
  attention over valid keys (padding masked out), position ids ``0..Lt-1``;
* ``bd3lm_x0_first`` (pipeline B, WeDLM): ``[x0 ; x_t]`` (clean half first) with the
  swapped BD3LM mask and position ids ``0..Lt-1`` twice; the predictions are the x_t half.

Both take the clean ids and a boolean mask of the positions to noise, so they compose
with CompDemo's doubled batch. Every query may also attend to itself, so a row that is
entirely padding still has one key (no NaN in the softmax; its outputs are never read).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tide_jax.diffusion import masks as masks_lib
from tide_jax.diffusion import noising

Array = jax.Array

BUILDERS = ("bidirectional", "bd3lm_x0_first")


class TeacherInputs(NamedTuple):
  """Arrays for one teacher call, plus where its predictions sit (static ints).

  ``input_ids [B, S]`` int32, ``attention_mask [B, 1, S, S]`` bool (True = may attend),
  ``position_ids [B, S]`` int32; the prediction for teacher position j is output
  position ``prediction_offset + j``.
  """

  input_ids: Array
  attention_mask: Array
  position_ids: Array
  prediction_offset: int


def bidirectional_inputs(
    clean_ids: Array, masked: Array, valid: Array, *, mask_token_id: int
) -> TeacherInputs:
  """``[B, Lt]`` ids and masks -> bidirectional single-sequence teacher inputs."""
  batch, length = clean_ids.shape
  ids = noising.apply_mask(clean_ids, masked, mask_token_id).astype(jnp.int32)
  attention = valid[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return TeacherInputs(ids, attention, positions, 0)


def x0_xt_inputs(
    clean_ids: Array,
    masked: Array,
    *,
    block_size: int,
    mask_token_id: int,
    valid: Array | None = None,
) -> TeacherInputs:
  """``[x0 ; x_t]`` of length 2 Lt with the swapped BD3LM mask.

  ``valid`` (optional ``[B, Lt]`` bool) removes padding keys from both halves; by default
  padding is attended like content, as in BD3LM training.
  """
  batch, length = clean_ids.shape
  noised = noising.apply_mask(clean_ids, masked, mask_token_id)
  ids = jnp.concatenate([clean_ids, noised], axis=1).astype(jnp.int32)
  base = np.asarray(masks_lib.bd3lm_attention_mask(length, block_size, x0_first=True))
  attention = jnp.broadcast_to(jnp.asarray(base)[None, None], (batch, 1, 2 * length, 2 * length))
  if valid is not None:
    keys = jnp.concatenate([valid, valid], axis=1)
    attention = (attention & keys[:, None, None, :]) | jnp.eye(2 * length, dtype=bool)
  positions = jnp.broadcast_to(
      jnp.tile(jnp.arange(length, dtype=jnp.int32), 2), (batch, 2 * length)
  )
  return TeacherInputs(ids, attention, positions, length)


def build(
    name: str,
    clean_ids: Array,
    masked: Array,
    valid: Array,
    *,
    block_size: int,
    mask_token_id: int,
) -> TeacherInputs:
  """The registered builder ``name`` (see the module docstring)."""
  if name == "bidirectional":
    return bidirectional_inputs(clean_ids, masked, valid, mask_token_id=mask_token_id)
  if name == "bd3lm_x0_first":
    return x0_xt_inputs(clean_ids, masked, block_size=block_size, mask_token_id=mask_token_id)
  raise ValueError(f"Unknown teacher input builder {name!r}; use one of {', '.join(BUILDERS)}.")
