"""CompDemo (docs/method.md §3.2): complementary demonstrations, both teacher passes in one call.

The masked set ``M`` of each teacher sequence is split at random into ``M_A`` (each token,
or each chunk, with probability ``rho``) and ``M_B = M \\ M_A``. Pass 1 reveals ``M_A`` and
masks ``M_B``; pass 2 reveals ``M_B`` and masks ``M_A``. Both passes are interleaved on the
batch axis (sequence ``i``'s passes are rows ``2i`` and ``2i + 1``) and the teacher is
called once on ``[2b, ...]``:

    masked2 = doubled_masks(masked, in_a)                        # [2b, Lt]
    hidden2 = teacher.prediction_hidden(params, repeat_passes(clean), masked2,
                                        repeat_passes(valid))    # the one call
    hidden = select_from_passes(hidden2, in_a)                   # [b, Lt, E]

(or, without copying, :func:`pass_of` says which pass each position reads, and the
distillation plan indexes the rows of ``hidden2`` directly). Each position of ``M_B``
reads pass 1, each of ``M_A`` pass 2, every other position pass 1, which is the single
pass; with ``rho = 0``, ``M_A`` is empty and the result equals the single pass.
"""

from __future__ import annotations

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


PASSES = 2  # CompDemo's two complementary teacher passes


def doubled_masks(masked: Array, in_a: Array) -> Array:
  """Both passes' masks, interleaved per sequence: ``[b, Lt] -> [2b, Lt]`` bool.

  Row ``2i`` is pass 1 of sequence ``i`` (``M_B`` masked, ``M_A`` revealed) and row
  ``2i + 1`` its pass 2 (``M_A`` masked). Interleaving keeps both passes of a sequence
  next to it: when the batch is split over devices in contiguous pieces, a sequence's
  teacher rows live on the device that holds the sequence, so reading them is local.
  """
  in_a = in_a & masked
  return jnp.stack([masked & ~in_a, in_a], axis=1).reshape(-1, masked.shape[1])


def repeat_passes(x: Array) -> Array:
  """``[b, ...] -> [2b, ...]``: each sequence's row twice, matching :func:`doubled_masks`."""
  return jnp.repeat(x, PASSES, axis=0)


def select_from_passes(out2: Array, in_a: Array) -> Array:
  """``[2b, Lt, ...] -> [b, Lt, ...]``: ``M_A`` positions from pass 2, all others pass 1."""
  b = in_a.shape[0]
  if out2.shape[0] != PASSES * b:
    raise ValueError(
        f"Expected teacher outputs for a doubled batch of {2 * b}, got {out2.shape[0]}."
    )
  both = out2.reshape((b, PASSES) + out2.shape[1:])
  pick_second = in_a.reshape(in_a.shape + (1,) * (out2.ndim - 2))
  return jnp.where(pick_second, both[:, 1], both[:, 0])


def pass_of(in_a: Array | None, shape: tuple[int, int]) -> Array:
  """Which teacher pass (0 or 1) predicts each teacher position: ``[b, Lt]`` int32.

  Without CompDemo (``in_a`` None) every position reads the single pass 0.
  """
  if in_a is None:
    return jnp.zeros(shape, jnp.int32)
  return in_a.astype(jnp.int32)
