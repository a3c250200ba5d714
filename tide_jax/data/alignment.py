"""Alignments between a student and a teacher tokenization of the same content.

Both work message by message on content spans: byte ranges, one per message, that hold the
same text on both sides (see `encode.Side` and `matched_spans`). Only tokens lying entirely inside a span take
part, so template tokens (and tokens merged across a template boundary) are never aligned.

- `chunk_alignment` (different tokenizers): the finest common coarsening of the two byte
  segmentations, i.e. chunks cut exactly at the byte offsets where both sides have a token
  boundary. Output: a chunk id per token on each side (int32, -1 outside chunks), chunks
  numbered 0..n-1 in text order on both sides.
- `position_pairs` (shared vocabulary, different templates): student and teacher tokens with
  the same bytes at the same offset within the same message's content, paired one to one.
"""

from __future__ import annotations

import numpy as np


def _inside(starts: np.ndarray, ends: np.ndarray, span: tuple[int, int]) -> np.ndarray:
  """Indices of the tokens whose byte range lies within `span` (a contiguous run)."""
  a, b = span
  first = np.searchsorted(starts, a, side="left")
  last = np.searchsorted(ends, b, side="right")
  return np.arange(first, max(first, last))


def matched_spans(student, teacher) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """Per message rendered on both sides, the (student span, teacher span) of identical text.

  Each side holds the message's content from some byte on (a template may trim whitespace
  off either end); the pair covers the part of the content both sides hold.
  """
  pairs = []
  for s_span, t_span in zip(student.spans, teacher.spans):
    if s_span is None or t_span is None:
      continue
    (s_start, s_end, s_from), (t_start, t_end, t_from) = s_span, t_span
    first = max(s_from, t_from)
    last = min(s_from + s_end - s_start, t_from + t_end - t_start)
    if last > first:
      pairs.append(
          (
              (s_start + first - s_from, s_start + last - s_from),
              (t_start + first - t_from, t_start + last - t_from),
          )
      )
  return pairs


def chunk_alignment(student, teacher, student_special: np.ndarray, teacher_special: np.ndarray):
  """Chunk ids per token on both sides.

  Args:
    student, teacher: `encode.Side`s of the same content (spans in the same order).
    student_special, teacher_special: [vocab] bool, tokens never allowed inside a chunk.

  Returns:
    (student_chunk [n_s] int32, teacher_chunk [n_t] int32, num_chunks): -1 outside chunks.
  """
  s_chunk = np.full(len(student.ids), -1, np.int32)
  t_chunk = np.full(len(teacher.ids), -1, np.int32)
  offset = 0
  for s_span, t_span in matched_spans(student, teacher):
    s_idx = _inside(student.starts, student.ends, s_span)
    t_idx = _inside(teacher.starts, teacher.ends, t_span)
    if not s_idx.size or not t_idx.size:
      continue
    s_rel_start = student.starts[s_idx] - s_span[0]
    s_rel_end = student.ends[s_idx] - s_span[0]
    t_rel_start = teacher.starts[t_idx] - t_span[0]
    t_rel_end = teacher.ends[t_idx] - t_span[0]
    # Common boundaries; tokens inside a span tile it contiguously, so any two common
    # boundaries enclose whole tokens on both sides.
    cuts = np.intersect1d(np.union1d(s_rel_start, s_rel_end), np.union1d(t_rel_start, t_rel_end))
    if cuts.size < 2:
      continue
    for rel_start, rel_end, idx, out in (
        (s_rel_start, s_rel_end, s_idx, s_chunk),
        (t_rel_start, t_rel_end, t_idx, t_chunk),
    ):
      covered = (rel_start >= cuts[0]) & (rel_end <= cuts[-1])
      local = np.searchsorted(cuts, rel_start, side="right") - 1
      out[idx[covered]] = offset + local[covered]
    offset += cuts.size - 1
  return _drop_special_chunks(
      s_chunk, t_chunk, student.ids, teacher.ids, student_special, teacher_special
  )


def _drop_special_chunks(s_chunk, t_chunk, s_ids, t_ids, s_special, t_special):
  """Removes chunks holding a special token on either side and renumbers the rest 0..n-1."""
  bad = np.union1d(
      s_chunk[(s_chunk >= 0) & s_special[s_ids]], t_chunk[(t_chunk >= 0) & t_special[t_ids]]
  )
  used = np.union1d(s_chunk[s_chunk >= 0], t_chunk[t_chunk >= 0])
  keep = np.setdiff1d(used, bad)
  renumber = np.full(int(used.max()) + 1 if used.size else 0, -1, np.int32)
  renumber[keep] = np.arange(keep.size, dtype=np.int32)
  s_out = np.where(
      s_chunk >= 0, renumber[np.maximum(s_chunk, 0)] if renumber.size else -1, -1
  ).astype(np.int32)
  t_out = np.where(
      t_chunk >= 0, renumber[np.maximum(t_chunk, 0)] if renumber.size else -1, -1
  ).astype(np.int32)
  return s_out, t_out, int(keep.size)


def position_pairs(student, teacher) -> tuple[np.ndarray, np.ndarray]:
  """Student and teacher positions of identical tokens at identical content offsets.

  Returns:
    (pair_student [p] int32, pair_teacher [p] int32), increasing in both.
  """
  s_out, t_out = [], []
  for s_span, t_span in matched_spans(student, teacher):
    s_idx = _inside(student.starts, student.ends, s_span)
    t_idx = _inside(teacher.starts, teacher.ends, t_span)
    s_rel = student.starts[s_idx] - s_span[0]
    t_rel = teacher.starts[t_idx] - t_span[0]
    # Token starts within a span are strictly increasing, so equal starts pair uniquely.
    _, si, ti = np.intersect1d(s_rel, t_rel, assume_unique=True, return_indices=True)
    s_pos, t_pos = s_idx[si], t_idx[ti]
    same = (student.ids[s_pos] == teacher.ids[t_pos]) & (
        student.ends[s_pos] - s_span[0] == teacher.ends[t_pos] - t_span[0]
    )
    s_out.append(s_pos[same])
    t_out.append(t_pos[same])
  if not s_out:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(s_out).astype(np.int32), np.concatenate(t_out).astype(np.int32)
