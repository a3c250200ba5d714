"""A loaded, frozen teacher: the one object that knows how a teacher is fed.

The distillation plan asks it for the hidden states of its prediction positions and for
its output kernel; the vocabulary projection happens inside the fused objectives, a
block of rows at a time (``tide_jax.distill.fused``), so teacher logits never exist
whole. Parameters are passed in (they are an argument of the jitted step, never state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from tide_jax.teachers import inputs as inputs_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Teacher:
  """What a step needs to call a teacher (static; hashable through its graphdef).

  Attributes:
    name: the registered family name (``tide_jax.teachers.TEACHERS``).
    config: the model config (``DecoderConfig`` or ``LLaDA2Config``).
    graphdef: the module's graph definition (``nnx.split``).
    mask_token_id: the teacher's own mask token.
    input_builder: one of ``inputs.BUILDERS``.
    block_size: the BD3LM block size of ``[x0 ; x_t]`` inputs.
  """

  name: str
  config: Any
  graphdef: Any
  mask_token_id: int
  input_builder: str
  block_size: int

  @property
  def vocab_size(self) -> int:
    return int(self.config.vocab_size)

  def model(self, params: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.lax.stop_gradient(params))

  def inputs(self, clean_ids: Array, masked: Array, valid: Array) -> inputs_lib.TeacherInputs:
    """This teacher's input for ``clean_ids [B, Lt]`` with ``masked`` positions noised."""
    return inputs_lib.build(
        self.input_builder,
        clean_ids,
        masked,
        valid,
        block_size=self.block_size,
        mask_token_id=self.mask_token_id,
    )

  def prediction_hidden(
      self, params: nnx.State, clean_ids: Array, masked: Array, valid: Array
  ) -> Array:
    """Final hidden states at the prediction positions, ``[B, Lt, E]``, without gradient.

    Args:
      params: the teacher's (sharded) parameters.
      clean_ids: ``[B, Lt]`` int clean teacher tokens.
      masked: ``[B, Lt]`` bool, positions to replace by the teacher's mask token.
      valid: ``[B, Lt]`` bool, non-padding positions.
    """
    inputs = self.inputs(clean_ids, masked, valid)
    hidden = self.model(params).hidden_states(
        inputs.input_ids, inputs.position_ids, inputs.attention_mask
    )
    length = clean_ids.shape[1]
    offset = inputs.prediction_offset
    return jax.lax.stop_gradient(hidden[:, offset : offset + length])

  def output_kernel(self, params: nnx.State) -> Array:
    """The ``[E, V]`` output projection."""
    return jax.lax.stop_gradient(self.model(params).output_kernel())

  def prediction_logits(
      self, params: nnx.State, clean_ids: Array, masked: Array, valid: Array
  ) -> Array:
    """float32 logits ``[B, Lt, V]`` at the prediction positions.

    Materialises the vocabulary: for evaluation and analysis on small batches only; the
    training step never calls it.
    """
    hidden = self.prediction_hidden(params, clean_ids, masked, valid)
    return self.model(params).logits(hidden)
