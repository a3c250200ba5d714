"""Chunk-level objectives for the cross-tokenizer pipeline (docs/method.md §3.1 end, §3.3).

Alignment format: per-token chunk ids, ``int32 [b, L]`` on each side, ``-1`` for a token
in no chunk and ``0 .. max_chunks - 1`` for the chunks of each example (the same id names
the same chunk on the student and the teacher side). Chunk sums are segment sums with a
per-example offset (``num_segments = b * max_chunks``, static), never dense
``[L, n_chunks]`` matrices. Ids outside ``[0, max_chunks)`` are treated as "no chunk";
:func:`check_chunk_ids` reports them on the host.

Chunk objectives return ``(loss_sum, count)`` over *active* chunks (at least one masked
student token, no prompt token, present on both sides); the value is
``masked_mean(loss_sum, count)``, exactly 0 when no chunk is active.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PROB_MIN = 1e-7
PROB_MAX = 1.0 - 1e-7
CHUNK_OBJECTIVES = ("calm", "reverse_calm", "reverse_binary_kl", "chunk_tidal")


def check_chunk_ids(chunk_ids: np.ndarray, max_chunks: int) -> None:
  """Host-side check: every id is -1 or in ``[0, max_chunks)``."""
  chunk_ids = np.asarray(chunk_ids)
  bad = (chunk_ids < -1) | (chunk_ids >= max_chunks)
  if bad.any():
    raise ValueError(
        f"{int(bad.sum())} chunk ids fall outside [-1, {max_chunks}); raise "
        f"distill.max_chunks to at least {int(chunk_ids.max()) + 1}."
    )


def _in_chunk(chunk_ids: Array, max_chunks: int) -> Array:
  return (chunk_ids >= 0) & (chunk_ids < max_chunks)


def chunk_sums(values: Array, chunk_ids: Array, max_chunks: int) -> Array:
  """Sum ``values [b, L]`` over the tokens of each chunk: ``-> [b, max_chunks]`` float32."""
  b, length = chunk_ids.shape
  offset = jnp.arange(b, dtype=jnp.int32)[:, None] * max_chunks
  # Tokens in no chunk go to segment b * max_chunks, which segment_sum drops.
  segments = jnp.where(_in_chunk(chunk_ids, max_chunks), chunk_ids + offset, b * max_chunks)
  summed = jax.ops.segment_sum(
      values.astype(jnp.float32).reshape(b * length),
      segments.reshape(b * length),
      num_segments=b * max_chunks,
  )
  return summed.reshape(b, max_chunks)


def chunk_any(flags: Array, chunk_ids: Array, max_chunks: int) -> Array:
  """Whether any token of each chunk has ``flags [b, L]`` set: ``-> [b, max_chunks]`` bool."""
  return chunk_sums(flags.astype(jnp.float32), chunk_ids, max_chunks) > 0


def chunk_flags_to_tokens(
    chunk_flags: Array, chunk_ids: Array, default: Array | bool = False
) -> Array:
  """Per-token view of per-chunk flags: ``[b, C], [b, L] -> [b, L]`` (``default`` off chunks)."""
  max_chunks = chunk_flags.shape[1]
  picked = jnp.take_along_axis(chunk_flags, jnp.clip(chunk_ids, 0, max_chunks - 1), axis=1)
  return jnp.where(_in_chunk(chunk_ids, max_chunks), picked, default)


def chunk_consistent_masks(
    student_mask: Array,
    student_chunk_ids: Array,
    teacher_chunk_ids: Array,
    max_chunks: int,
    maskable: Array | None = None,
) -> tuple[Array, Array]:
  """Extend a student noise mask so each chunk is masked entirely on both sides or not at all.

  Args:
    student_mask: ``[b, Ls]`` bool, the student's noise mask.
    student_chunk_ids: ``[b, Ls]`` int32; teacher_chunk_ids: ``[b, Lt]`` int32.
    max_chunks: static number of chunk slots per example.
    maskable: optional ``[b, Ls]`` bool (False for prompt tokens); a chunk holding an
      unmaskable token is left entirely unmasked, so prompts are never masked.
  Returns:
    ``(student_mask [b, Ls], teacher_mask [b, Lt])``: student tokens in no chunk keep
    their mask; teacher tokens in no chunk are not masked.
  """
  in_chunk = _in_chunk(student_chunk_ids, max_chunks)
  masked_chunks = chunk_any(student_mask & in_chunk, student_chunk_ids, max_chunks)
  if maskable is not None:
    masked_chunks &= ~chunk_any(~maskable & in_chunk, student_chunk_ids, max_chunks)
  student_out = chunk_flags_to_tokens(masked_chunks, student_chunk_ids, student_mask)
  teacher_out = chunk_flags_to_tokens(masked_chunks, teacher_chunk_ids, False)
  return student_out, teacher_out


def active_chunks(
    student_masked: Array,
    student_prompt: Array,
    student_chunk_ids: Array,
    teacher_chunk_ids: Array,
    max_chunks: int,
    teacher_prompt: Array | None = None,
) -> Array:
  """``[b, C]`` bool: >= 1 masked student token, no prompt token, tokens on both sides."""
  has_masked = chunk_any(student_masked, student_chunk_ids, max_chunks)
  has_prompt = chunk_any(student_prompt, student_chunk_ids, max_chunks)
  if teacher_prompt is not None:
    has_prompt |= chunk_any(teacher_prompt, teacher_chunk_ids, max_chunks)
  on_teacher = chunk_any(jnp.ones(teacher_chunk_ids.shape, bool), teacher_chunk_ids, max_chunks)
  return has_masked & ~has_prompt & on_teacher


def chunk_probability(
    token_log_probs: Array, chunk_ids: Array, max_chunks: int, temperature: float
) -> Array:
  """``clamp(exp(sum_{k in c} log p_k / T), 1e-7, 1 - 1e-7)``: ``[b, L] -> [b, C]`` float32."""
  log_p = chunk_sums(token_log_probs, chunk_ids, max_chunks)
  return jnp.clip(jnp.exp(log_p / temperature), PROB_MIN, PROB_MAX)


def _bce(target: Array, prob: Array) -> Array:
  """``-[target log prob + (1 - target) log(1 - prob)]``."""
  return -(target * jnp.log(prob) + (1.0 - target) * jnp.log1p(-prob))


def calm(s: Array, q: Array) -> Array:
  """Forward CALM per chunk: ``-[q log s + (1 - q) log(1 - s)]``, q constant."""
  return _bce(jax.lax.stop_gradient(q), s)


def reverse_calm(s: Array, q: Array) -> Array:
  """Reverse CALM per chunk: ``-[s log q + (1 - s) log(1 - q)]``; d/ds = ``log((1 - q) / q)``."""
  q = jax.lax.stop_gradient(q)
  return -(s * jnp.log(q) + (1.0 - s) * jnp.log1p(-q))


def reverse_binary_kl(s: Array, q: Array) -> Array:
  """True reverse binary KL per chunk: ``KL(Bern(s) || Bern(q))``, q constant."""
  q = jax.lax.stop_gradient(q)
  return s * (jnp.log(s) - jnp.log(q)) + (1.0 - s) * (jnp.log1p(-s) - jnp.log1p(-q))


def chunk_tidal(s: Array, q: Array, lam: Array) -> Array:
  """Chunk-level TIDAL per chunk: BCE of s against ``m = clamp((1 - lam) s + lam q)`` held
  constant (``lam`` broadcasts against ``[b, C]``, e.g. ``[b, 1]``); timestep weight applied
  by the caller."""
  m = jnp.clip((1.0 - lam) * s + lam * q, PROB_MIN, PROB_MAX)
  return _bce(jax.lax.stop_gradient(m), s)


def chunk_objective(
    name: str,
    s: Array,
    q: Array,
    active: Array,
    *,
    lam: Array | None = None,
    weight: Array | None = None,
) -> tuple[Array, Array]:
  """Sum of the named per-chunk objective over active chunks, and their count.

  Args:
    name: one of ``calm``, ``reverse_calm``, ``reverse_binary_kl``, ``chunk_tidal``.
    s, q: ``[b, C]`` clamped student and teacher chunk probabilities.
    active: ``[b, C]`` bool.
    lam: ``[b, 1]`` TIDAL lambda (``chunk_tidal`` only).
    weight: optional ``[b, 1]`` or ``[b, C]`` multiplier (the timestep weight).
  """
  if name == "calm":
    per_chunk = calm(s, q)
  elif name == "reverse_calm":
    per_chunk = reverse_calm(s, q)
  elif name == "reverse_binary_kl":
    per_chunk = reverse_binary_kl(s, q)
  elif name == "chunk_tidal":
    if lam is None:
      raise ValueError("chunk_tidal needs the TIDAL lambda; pass lam.")
    per_chunk = chunk_tidal(s, q, lam)
  else:
    raise ValueError(
        f"Unknown chunk objective {name!r}; use one of " f"{', '.join(CHUNK_OBJECTIVES)}."
    )
  if weight is not None:
    per_chunk = per_chunk * weight
  loss_sum = jnp.sum(jnp.where(active, per_chunk, 0.0))
  return loss_sum, jnp.sum(active).astype(jnp.float32)
