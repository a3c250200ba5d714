"""The distillation term of the one train step: teacher call, CompDemo, recipe term.

``make_distillation(config, student_cfg, teacher)`` returns what the step needs:
``extra_loss(student, batch, noised, key, progress, teacher_params) -> (loss, metrics)``
and, for chunk alignments, a ``mask_fn`` that makes the student's noise mask
chunk-consistent before the student's forward pass. The recipe (``config.distill``) is
validated here, once, before any compilation.

Batch keys used (``tide_jax.data.features``): ``teacher_input_ids``, ``teacher_valid``,
``teacher_maskable`` ``[b, Lt]``; positions: ``pair_student``/``pair_teacher`` ``[b, P]``
(-1 padded); chunks: ``student_chunk`` ``[b, Ls]`` and ``teacher_chunk`` ``[b, Lt]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tide_jax.distill import chunks as chunks_lib
from tide_jax.distill import compdemo
from tide_jax.distill import recipes
from tide_jax.distill import teacher_inputs


@dataclasses.dataclass(frozen=True)
class Distillation:
  recipe: recipes.Recipe
  extra_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] | None
  mask_fn: Callable[[jax.Array, dict[str, jax.Array]], jax.Array] | None


def pair_teacher_positions(batch: dict[str, jax.Array], student_len: int) -> jax.Array:
  """``[b, Ls]`` int32: the teacher position paired with each student position, -1 if none."""
  pair_s, pair_t = batch["pair_student"], batch["pair_teacher"]
  b = pair_s.shape[0]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], pair_s.shape)
  target = jnp.where(pair_s >= 0, pair_s, student_len)  # padding entries are dropped
  out = jnp.full((b, student_len), -1, jnp.int32)
  return out.at[rows, target].set(pair_t.astype(jnp.int32), mode="drop")


def teacher_prediction_logits(
    teacher_graphdef, teacher_params, inputs: teacher_inputs.TeacherInputs
) -> jax.Array:
  """Teacher logits ``[B, Lt, V]`` at the prediction positions only, without gradient.

  The output projection is applied only to the prediction half (for ``[x0 ; x_t]`` the
  clean half's logits are never needed).
  """
  teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
  hidden = teacher.hidden_states(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
  length = inputs.rows_per_sequence - inputs.prediction_offset
  hidden = hidden[:, inputs.prediction_offset : inputs.prediction_offset + length]
  return jax.lax.stop_gradient(teacher.logits(hidden))


def make_distillation(
    config,
    student_cfg,
    *,
    teacher_graphdef=None,
    teacher_vocab: int | None,
    teacher_mask_token_id: int | None = None,
    teacher_input_builder: str = "bidirectional",
) -> Distillation:
  """Validates ``config.distill`` and builds the step's distillation pieces."""
  recipe = recipes.validate_distill_config(
      config.distill, student_vocab=student_cfg.vocab_size, teacher_vocab=teacher_vocab
  )
  if not recipe.uses_teacher:
    return Distillation(recipe, None, None)
  if teacher_input_builder not in teacher_inputs.BUILDERS:
    raise ValueError(
        f"Unknown teacher input builder {teacher_input_builder!r}; use one of "
        f"{', '.join(teacher_inputs.BUILDERS)}."
    )
  block_size = int(config.block_size)
  max_chunks = recipe.max_chunks
  chunked = recipe.alignment == "chunks"

  def mask_fn(masked, batch):
    student_mask, _ = chunks_lib.chunk_consistent_masks(
        masked, batch["student_chunk"], batch["teacher_chunk"], max_chunks, batch["maskable"]
    )
    return student_mask & batch["maskable"]

  def extra_loss(student, batch, noised, key, progress, teacher_params):
    student_ids = batch["input_ids"]
    b, ls = student_ids.shape
    clean_t = batch["teacher_input_ids"]
    valid_t = batch["teacher_valid"]
    if chunked:
      _, teacher_masked = chunks_lib.chunk_consistent_masks(
          noised.masked,
          batch["student_chunk"],
          batch["teacher_chunk"],
          max_chunks,
          batch["maskable"],
      )
      pair_pos = None
    else:
      pair_pos = pair_teacher_positions(batch, ls)
      teacher_masked = compdemo.flags_to_teacher(noised.masked, pair_pos, clean_t.shape[1])
    teacher_masked &= batch["teacher_maskable"]
    build = lambda clean, masked, valid: teacher_inputs.build(
        teacher_input_builder,
        clean,
        masked,
        valid,
        block_size=block_size,
        mask_token_id=int(teacher_mask_token_id),
    )

    lt = clean_t.shape[1]
    if recipe.uses_compdemo:
      in_a = compdemo.teacher_split(
          key,
          recipe.compdemo_ratio,
          noised.masked,
          teacher_masked,
          granularity=recipe.compdemo_granularity,
          pair_teacher_pos=pair_pos,
          student_chunk_ids=batch.get("student_chunk"),
          teacher_chunk_ids=batch.get("teacher_chunk"),
          max_chunks=max_chunks,
      )
      clean2, masked2, valid2 = compdemo.make_doubled_inputs(clean_t, teacher_masked, in_a, valid_t)
      logits = teacher_prediction_logits(
          teacher_graphdef, teacher_params, build(clean2, masked2, valid2)
      )  # [2b, Lt, V]
      rows = compdemo.pass_rows(in_a, rows_per_sequence=lt)
    else:
      logits = teacher_prediction_logits(
          teacher_graphdef, teacher_params, build(clean_t, teacher_masked, valid_t)
      )  # [b, Lt, V]
      rows = teacher_inputs.position_rows(b, lt)
    flat_teacher = logits.reshape(-1, logits.shape[-1])
    student_logits = noised.logits  # projected once, in the cross-entropy (keep_logits)
    if chunked:
      aux = {
          "student_targets": student_ids,
          "student_chunk_ids": batch["student_chunk"],
          "student_masked": noised.masked,
          "student_prompt": batch["valid"] & ~batch["maskable"],
          "teacher_targets": clean_t,
          "teacher_chunk_ids": batch["teacher_chunk"],
          "teacher_rows": rows,
          "teacher_prompt": valid_t & ~batch["teacher_maskable"],
      }
    else:
      aux = {
          "distill_mask": noised.masked & (pair_pos >= 0),
          "teacher_rows": teacher_inputs.student_rows(rows, pair_pos),
      }
    return recipes.distillation_loss(
        recipe,
        student_logits=student_logits,
        teacher_logits=flat_teacher,
        aux=aux,
        t=noised.t,
        progress=progress,
    )

  return Distillation(recipe, extra_loss, mask_fn if chunked else None)
