"""From encoded sides to stored example features, and from stored features to fixed-shape rows.

Stored (variable length, what the TFDS dataset holds per example):
  input_ids [m] int32, maskable [m] bool       m = content tokens EOS-padded to a block multiple
  source [] int32                               index of the input source (data_config.sources; -1: eval_files)
  teacher_input_ids [mt], teacher_maskable [mt] (when a teacher is configured)
  pair_student [p], pair_teacher [p] int32      (alignment "positions")
  student_chunk [m], teacher_chunk [mt] int32, num_chunks [] int32   (alignment "chunks")
  segment_ids [m] int32                         (data.packing: 1, 2, ... per packed example)

Fixed-shape rows (what batches hold), with L = max_len, Lt = teacher_max_len, P = max_pairs:
  input_ids [L] (pad id after m), maskable [L], valid [L] (True on the first m positions),
  source [] (-1 for a fill row),
  teacher_* [Lt] likewise, pair_* [P] (-1 padding) and pair_count [], chunks [L]/[Lt] (-1 padding),
  with packing segment_ids [L] (0 = padding) and positions [L] (restarting at 0 per segment).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tide_jax.data import alignment, packing
from tide_jax.data.encode import Side, TokenizerInfo


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The fixed lengths and options that shape an example."""

  max_len: int
  block_size: int
  teacher_max_len: int = 0  # 0: no teacher side
  teacher_block_size: int = 0
  alignment: str = ""  # "", "positions" or "chunks"
  max_pairs: int = 0
  packing: bool = False  # rows carry segment_ids and positions (several examples per row)


def _eos_pad(
    ids: np.ndarray, trained: np.ndarray, block: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads with EOS to a multiple of `block`; the EOS padding is trained like content."""
  extra = (-len(ids)) % block
  return (
      np.concatenate([ids, np.full(extra, eos_id, np.int32)]).astype(np.int32),
      np.concatenate([trained, np.ones(extra, bool)]),
  )


def build_example(
    student: Side,
    s_info: TokenizerInfo,
    shapes: Shapes,
    teacher: Side | None = None,
    t_info: TokenizerInfo | None = None,
) -> tuple[dict | None, str]:
  """Truncates, aligns and EOS-pads one example.

  Returns:
    (features, status): status is "kept", "truncated", "prompt_too_long" (features None when
    everything before the last answer fills the row on either side) or "no_response".
  """
  if student.prompt_length >= shapes.max_len:
    return None, "prompt_too_long"
  if not student.trained.any():
    return None, "no_response"
  n_s = min(len(student.ids), shapes.max_len)
  truncated = n_s < len(student.ids)
  features = {}
  if teacher is not None:
    if teacher.prompt_length >= shapes.teacher_max_len:
      return None, "prompt_too_long"
    n_t = min(len(teacher.ids), shapes.teacher_max_len)
    truncated |= n_t < len(teacher.ids)
    features.update(_aligned(student, teacher, s_info, t_info, shapes, n_s, n_t))
    ids, trained = _eos_pad(
        teacher.ids[:n_t], teacher.trained[:n_t], shapes.teacher_block_size, t_info.eos_id
    )
    features["teacher_input_ids"], features["teacher_maskable"] = ids, trained
  ids, trained = _eos_pad(
      student.ids[:n_s], student.trained[:n_s], shapes.block_size, s_info.eos_id
  )
  features["input_ids"], features["maskable"] = ids, trained
  if "student_chunk" in features:
    features["student_chunk"] = _pad_to(features["student_chunk"], len(ids), -1)
    features["teacher_chunk"] = _pad_to(
        features["teacher_chunk"], len(features["teacher_input_ids"]), -1
    )
  return features, ("truncated" if truncated else "kept")


def _aligned(student, teacher, s_info, t_info, shapes, n_s, n_t) -> dict:
  """Alignment features restricted to what survives truncation on both sides."""
  if shapes.alignment == "chunks":
    s_chunk, t_chunk, _ = alignment.chunk_alignment(
        student, teacher, s_info.special, t_info.special
    )
    # Chunks are ordered along both sequences, so the survivors are the chunks before the
    # first one that loses a token to truncation on either side.
    lost = np.concatenate([s_chunk[n_s:], t_chunk[n_t:]])
    lost = lost[lost >= 0]
    kept = (
        int(lost.min())
        if lost.size
        else int(max(s_chunk.max(initial=-1), t_chunk.max(initial=-1)) + 1)
    )
    s_chunk, t_chunk = s_chunk[:n_s], t_chunk[:n_t]
    s_chunk = np.where(s_chunk < kept, s_chunk, -1).astype(np.int32)
    t_chunk = np.where(t_chunk < kept, t_chunk, -1).astype(np.int32)
    return {"student_chunk": s_chunk, "teacher_chunk": t_chunk, "num_chunks": np.int32(kept)}
  if shapes.alignment == "positions":
    s_pos, t_pos = alignment.position_pairs(student, teacher)
    keep = (s_pos < n_s) & (t_pos < n_t)
    s_pos, t_pos = s_pos[keep][: shapes.max_pairs], t_pos[keep][: shapes.max_pairs]
    return {"pair_student": s_pos.astype(np.int32), "pair_teacher": t_pos.astype(np.int32)}
  raise ValueError(
      f"data_config.alignment must be 'positions' or 'chunks' when a teacher tokenizer is set, not {shapes.alignment!r}"
  )


def _pad_to(values: np.ndarray, length: int, fill) -> np.ndarray:
  out = np.full(length, fill, values.dtype)
  out[: len(values)] = values[:length]
  return out


def empty_row(shapes: Shapes, s_pad: int, t_pad: int = 0) -> dict:
  """A row with no content (valid all False), used to fill the last batch of a single pass."""
  row = {
      "input_ids": np.full(shapes.max_len, s_pad, np.int32),
      "maskable": np.zeros(shapes.max_len, bool),
      "valid": np.zeros(shapes.max_len, bool),
      "source": np.int32(-1),
  }
  if shapes.packing:
    row["segment_ids"] = np.zeros(shapes.max_len, np.int32)
    row["positions"] = np.zeros(shapes.max_len, np.int32)
  if shapes.teacher_max_len:
    lt = shapes.teacher_max_len
    row.update(
        teacher_input_ids=np.full(lt, t_pad, np.int32),
        teacher_maskable=np.zeros(lt, bool),
        teacher_valid=np.zeros(lt, bool),
    )
    if shapes.alignment == "positions":
      row.update(
          pair_student=np.full(shapes.max_pairs, -1, np.int32),
          pair_teacher=np.full(shapes.max_pairs, -1, np.int32),
          pair_count=np.int32(0),
      )
    else:
      row.update(
          student_chunk=np.full(shapes.max_len, -1, np.int32),
          teacher_chunk=np.full(lt, -1, np.int32),
          num_chunks=np.int32(0),
      )
  return row


def to_row(stored: dict, shapes: Shapes, s_pad: int, t_pad: int = 0) -> dict:
  """Pads one stored example to the fixed shapes of a batch row."""
  row = empty_row(shapes, s_pad, t_pad)
  m = len(stored["input_ids"])
  row["input_ids"][:m] = stored["input_ids"]
  row["maskable"][:m] = stored["maskable"]
  row["valid"][:m] = True
  row["source"] = np.int32(stored["source"])
  if shapes.packing:
    row["segment_ids"][:m] = stored["segment_ids"]
    row["positions"] = packing.segment_positions(row["segment_ids"])
  if shapes.teacher_max_len:
    mt = len(stored["teacher_input_ids"])
    row["teacher_input_ids"][:mt] = stored["teacher_input_ids"]
    row["teacher_maskable"][:mt] = stored["teacher_maskable"]
    row["teacher_valid"][:mt] = True
    if shapes.alignment == "positions":
      p = len(stored["pair_student"])
      row["pair_student"][:p] = stored["pair_student"]
      row["pair_teacher"][:p] = stored["pair_teacher"]
      row["pair_count"] = np.int32(p)
    else:
      row["student_chunk"][:m] = stored["student_chunk"]
      row["teacher_chunk"][:mt] = stored["teacher_chunk"]
      row["num_chunks"] = np.int32(stored["num_chunks"])
  return row
