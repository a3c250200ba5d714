"""CompDemo (SPEC 3.2): complementary demonstrations, both teacher passes in one call.

The masked set ``M`` of each teacher sequence is split at random into ``M_A`` (each token,
or each chunk, with probability ``rho``) and ``M_B = M \\ M_A``. Pass 1 reveals ``M_A`` and
masks ``M_B``; pass 2 reveals ``M_B`` and masks ``M_A``. Both passes are stacked on the
batch axis and the teacher is called once on ``[2b, ...]``:

    clean2, masked2, valid2 = make_doubled_inputs(clean, masked, in_a, valid)
    logits2 = teacher(build_inputs(clean2, masked2, valid2))     # the one call, [2b, Lt, V]
    logits = select_from_passes(logits2, in_a)                   # [b, Lt, V]

(or, without copying the logits, :func:`pass_rows` gives each position's row in
``logits2.reshape(-1, V)`` for the row-indexed distillation terms). Each position of
``M_B`` reads pass 1, each of ``M_A`` pass 2, every other position pass 1, which is the
single pass; with ``rho = 0``, ``M_A`` is empty and the result equals the single pass.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from tide_jax.distill import chunks as chunks_lib

Array = jax.Array
GRANULARITIES = ("token", "chunk")


def split_tokens(key: Array, masked: Array, ratio: Array | float) -> Array:
  """``M_A`` per token: each masked position with probability ``ratio``. ``[b, L]`` bool."""
  return jax.random.bernoulli(key, ratio, masked.shape) & masked


def split_chunks(
    key: Array, masked: Array, chunk_ids: Array, max_chunks: int, ratio: Array | float
) -> tuple[Array, Array]:
  """``M_A`` per chunk: every token of a chunk goes to the same side.

  Tokens in no chunk are drawn one by one. Returns ``(chunk_in_a [b, C], in_a [b, L])``;
  ``chunk_in_a`` maps the same split onto the other tokenizer's side with
  :func:`tide_jax.distill.chunks.chunk_flags_to_tokens`.
  """
  key_chunk, key_token = jax.random.split(key)
  chunk_in_a = jax.random.bernoulli(key_chunk, ratio, (masked.shape[0], max_chunks))
  token_draw = jax.random.bernoulli(key_token, ratio, masked.shape)
  in_a = chunks_lib.chunk_flags_to_tokens(chunk_in_a, chunk_ids, token_draw) & masked
  return chunk_in_a, in_a


def flags_to_teacher(student_flags: Array, pair_teacher_pos: Array, teacher_len: int) -> Array:
  """Carry per-student-position flags to the teacher through one-to-one position pairs.

  Args:
    student_flags: ``[b, Ls]`` bool.
    pair_teacher_pos: ``[b, Ls]`` int32, the teacher position paired with each student
      position, -1 where unpaired.
    teacher_len: Lt.
  Returns:
    ``[b, Lt]`` bool, False at teacher positions paired with no flagged student position.
  """
  b = student_flags.shape[0]
  target = jnp.where(pair_teacher_pos >= 0, pair_teacher_pos, teacher_len)  # -1 -> dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], target.shape)
  return jnp.zeros((b, teacher_len), bool).at[rows, target].set(student_flags, mode="drop")


def teacher_split(
    key: Array,
    ratio: Array | float,
    student_masked: Array,
    teacher_masked: Array,
    *,
    granularity: str,
    pair_teacher_pos: Array | None = None,
    student_chunk_ids: Array | None = None,
    teacher_chunk_ids: Array | None = None,
    max_chunks: int | None = None,
) -> Array:
  """``M_A`` on the teacher side, ``[b, Lt]`` bool (a subset of ``teacher_masked``).

  ``token``: drawn per student token and carried through ``pair_teacher_pos``;
  ``chunk``: drawn per chunk and spread over the teacher tokens of each chunk.
  """
  if granularity == "token":
    if pair_teacher_pos is None:
      raise ValueError("Per-token CompDemo needs pair_teacher_pos (the position alignment).")
    in_a = flags_to_teacher(
        split_tokens(key, student_masked, ratio), pair_teacher_pos, teacher_masked.shape[1]
    )
  elif granularity == "chunk":
    if student_chunk_ids is None or teacher_chunk_ids is None or max_chunks is None:
      raise ValueError(
          "Per-chunk CompDemo needs student_chunk_ids, teacher_chunk_ids and "
          "max_chunks (the chunk alignment)."
      )
    chunk_in_a, _ = split_chunks(key, student_masked, student_chunk_ids, max_chunks, ratio)
    in_a = chunks_lib.chunk_flags_to_tokens(chunk_in_a, teacher_chunk_ids, False)
  else:
    raise ValueError(f"Unknown CompDemo granularity {granularity!r}; use token or chunk.")
  return in_a & teacher_masked


def make_doubled_inputs(
    clean_ids: Array, masked: Array, in_a: Array, *per_example: Array
) -> tuple[Array, ...]:
  """Stack both passes on the batch axis.

  Args:
    clean_ids: ``[b, Lt]`` clean teacher token ids.
    masked: ``[b, Lt]`` bool, the teacher's masked set M.
    in_a: ``[b, Lt]`` bool, ``M_A`` (subset of M).
    *per_example: further ``[b, ...]`` arrays (e.g. the padding mask) to repeat.
  Returns:
    ``(clean_ids [2b, Lt], masked [2b, Lt], *per_example [2b, ...])``; rows ``0..b-1``
    are pass 1 (``M_B`` masked), rows ``b..2b-1`` pass 2 (``M_A`` masked).
  """
  in_a = in_a & masked
  doubled_mask = jnp.concatenate([masked & ~in_a, in_a], axis=0)
  twice = lambda x: jnp.concatenate([x, x], axis=0)
  return (twice(clean_ids), doubled_mask, *(twice(x) for x in per_example))


def select_from_passes(logits2: Array, in_a: Array) -> Array:
  """``[2b, Lt, ...] -> [b, Lt, ...]``: ``M_A`` positions from pass 2, all others pass 1."""
  b = in_a.shape[0]
  if logits2.shape[0] != 2 * b:
    raise ValueError(
        f"Expected teacher logits for a doubled batch of {2 * b}, got " f"{logits2.shape[0]}."
    )
  pick_second = in_a.reshape(in_a.shape + (1,) * (logits2.ndim - 2))
  return jnp.where(pick_second, logits2[b:], logits2[:b])


def pass_rows(in_a: Array, *, rows_per_sequence: int | None = None, offset: int = 0) -> Array:
  """Row of each teacher position in the flattened doubled logits ``[2b * S, V]``.

  Args:
    in_a: ``[b, Lt]`` bool, ``M_A``.
    rows_per_sequence: S, the teacher's output length per sequence (Lt, or 2 Lt for the
      ``[x0 ; x_t]`` layout); defaults to Lt.
    offset: where the predictions start inside a sequence (Lt for ``[x0 ; x_t]``).
  Returns:
    ``[b, Lt]`` int32 rows; pass 2 for ``M_A``, pass 1 otherwise.
  """
  b, length = in_a.shape
  stride = length if rows_per_sequence is None else rows_per_sequence
  sequence = jnp.arange(b, dtype=jnp.int32)[:, None] + b * in_a.astype(jnp.int32)
  return sequence * stride + offset + jnp.arange(length, dtype=jnp.int32)[None, :]


def compdemo_teacher_logits(
    teacher_fn: Callable[..., Array],
    build_inputs: Callable[..., dict],
    clean_ids: Array,
    masked: Array,
    in_a: Array,
    *per_example: Array,
) -> Array:
  """Doubled batch -> ONE teacher call -> per-position selection, ``[b, Lt, V]``.

  ``build_inputs(clean2, masked2, *per_example2)`` returns the teacher's keyword inputs
  (see ``teacher_inputs.py``) and ``teacher_fn(**inputs)`` its prediction logits
  ``[2b, Lt, V]`` (already cut to the x_t half for the ``[x0 ; x_t]`` layout).
  """
  doubled = make_doubled_inputs(clean_ids, masked, in_a, *per_example)
  logits2 = jax.lax.stop_gradient(teacher_fn(**build_inputs(*doubled)))
  return select_from_passes(logits2, in_a)
