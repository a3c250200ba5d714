"""Teacher input builders (SPEC 3.4).

* (a) pipeline A: the noised teacher sequence alone, bidirectional attention over valid
  keys (padding masked out), position ids ``0..Lt-1``;
* (b) pipeline B: ``[x0 ; x_t]`` (clean half first) with the swapped BD3LM mask and
  position ids ``0..Lt-1`` twice; the predictions are the x_t half (the second half).

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

Array = jax.Array


class TeacherInputs(NamedTuple):
  """Arrays for one teacher call, plus where its predictions sit (static ints).

  ``input_ids [B, S]`` int32, ``attention_mask [B, 1, S, S]`` bool (True = may attend),
  ``position_ids [B, S]`` int32; the predictions for teacher position j are output
  position ``prediction_offset + j`` (``S = rows_per_sequence``).
  """

  input_ids: Array
  attention_mask: Array
  position_ids: Array
  prediction_offset: int
  rows_per_sequence: int

  def model_kwargs(self) -> dict:
    return {
        "input_ids": self.input_ids,
        "attention_mask": self.attention_mask,
        "position_ids": self.position_ids,
    }


def noised_ids(clean_ids: Array, masked: Array, mask_token_id: int) -> Array:
  """``clean_ids`` with every masked position replaced by the teacher's mask token."""
  return jnp.where(masked, jnp.asarray(mask_token_id, clean_ids.dtype), clean_ids)


def bidirectional_inputs(
    clean_ids: Array, masked: Array, valid: Array, *, mask_token_id: int
) -> TeacherInputs:
  """(a) ``[B, Lt]`` ids and masks -> bidirectional single-sequence teacher inputs."""
  batch, length = clean_ids.shape
  ids = noised_ids(clean_ids, masked, mask_token_id).astype(jnp.int32)
  attention = valid[:, None, None, :] | jnp.eye(length, dtype=bool)[None, None]
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return TeacherInputs(ids, attention, positions, 0, length)


def x0_xt_inputs(
    clean_ids: Array,
    masked: Array,
    *,
    block_size: int,
    mask_token_id: int,
    valid: Array | None = None,
) -> TeacherInputs:
  """(b) ``[x0 ; x_t]`` of length 2 Lt with the swapped BD3LM mask.

  ``valid`` (optional ``[B, Lt]`` bool) removes padding keys from both halves; by default
  padding is attended like content, as in BD3LM training.
  """
  batch, length = clean_ids.shape
  ids = jnp.concatenate([clean_ids, noised_ids(clean_ids, masked, mask_token_id)], axis=1).astype(
      jnp.int32
  )
  base = np.asarray(masks_lib.bd3lm_attention_mask(length, block_size, x0_first=True))
  attention = jnp.broadcast_to(jnp.asarray(base)[None, None], (batch, 1, 2 * length, 2 * length))
  if valid is not None:
    keys = jnp.concatenate([valid, valid], axis=1)
    attention = (attention & keys[:, None, None, :]) | jnp.eye(2 * length, dtype=bool)
  positions = jnp.broadcast_to(
      jnp.tile(jnp.arange(length, dtype=jnp.int32), 2), (batch, 2 * length)
  )
  return TeacherInputs(ids, attention, positions, length, 2 * length)


BUILDERS = ("bidirectional", "bd3lm_x0_first")


def build(
    name: str, clean_ids: Array, masked: Array, valid: Array, *, block_size: int, mask_token_id: int
) -> TeacherInputs:
  """The registered builder ``name``: "bidirectional" is (a), "bd3lm_x0_first" is (b)."""
  if name == "bidirectional":
    return bidirectional_inputs(clean_ids, masked, valid, mask_token_id=mask_token_id)
  if name == "bd3lm_x0_first":
    return x0_xt_inputs(clean_ids, masked, block_size=block_size, mask_token_id=mask_token_id)
  raise ValueError(f"Unknown teacher input builder {name!r}; use one of {', '.join(BUILDERS)}.")


def prediction_logits(inputs: TeacherInputs, logits: Array) -> Array:
  """The teacher's predictions ``[B, Lt, V]`` from its output ``[B, S, V]`` (x_t half for (b))."""
  length = inputs.rows_per_sequence - inputs.prediction_offset
  return logits[:, inputs.prediction_offset : inputs.prediction_offset + length]


def position_rows(
    batch: int, length: int, *, rows_per_sequence: int | None = None, offset: int = 0
) -> Array:
  """Row of each teacher position ``[batch, length]`` in the flattened output
  ``[batch * S, V]`` of a single (not doubled) teacher call."""
  stride = length if rows_per_sequence is None else rows_per_sequence
  return (
      jnp.arange(batch, dtype=jnp.int32)[:, None] * stride
      + offset
      + jnp.arange(length, dtype=jnp.int32)[None, :]
  )


def student_rows(teacher_rows: Array, pair_teacher_pos: Array) -> Array:
  """Compose alignments: the teacher-output row paired with each student position.

  Args:
    teacher_rows: ``[b, Lt]`` int32 row of each teacher position (``position_rows`` or
      CompDemo's ``pass_rows``).
    pair_teacher_pos: ``[b, Ls]`` int32 teacher position of each student position, -1 if
      unpaired (those rows read position 0; give them weight 0).
  Returns:
    ``[b, Ls]`` int32.
  """
  return jnp.take_along_axis(teacher_rows, jnp.maximum(pair_teacher_pos, 0), axis=1)
