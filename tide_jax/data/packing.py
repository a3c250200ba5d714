"""Sequence packing: several stored examples per row of `max_len` tokens (`data.packing`).

Stored examples are already cut to `max_len` and EOS-padded to a multiple of `block_size`
(features.build_example), so every example starts on a BD3LM block boundary wherever it is
placed in a row. A packed row stores the examples' tokens one after another with
`segment_ids` (1, 2, ... per example, in row order); the fixed-shape row (features.to_row)
pads it with segment 0 and derives each token's position within its example
(`segment_positions`), so RoPE sees every example start at position 0.

Rows are filled first-fit over a window of at most `OPEN_ROWS` rows still open: an example
goes into the first open row with room for it; a full row is written at once; when the
window overflows, its fullest row is written. Examples are never cut, reordered within a
row, dropped or repeated; a deterministic input order gives deterministic rows.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

OPEN_ROWS = 64  # rows kept open for first-fit; bounds the packer's memory


def _row(pieces: list[tuple[str, dict]]) -> tuple[str, dict]:
  """One stored packed row from its (key, features) examples, in order."""
  sources = {int(feats["source"]) for _, feats in pieces}
  if len(sources) != 1:
    raise ValueError(f"a packed row mixes sources {sorted(sources)}; pack each source on its own")
  ids = [feats["input_ids"] for _, feats in pieces]
  return pieces[0][0], {
      "input_ids": np.concatenate(ids).astype(np.int32),
      "maskable": np.concatenate([feats["maskable"] for _, feats in pieces]),
      "segment_ids": np.concatenate(
          [np.full(len(part), number, np.int32) for number, part in enumerate(ids, start=1)]
      ),
      "source": np.int32(sources.pop()),
  }


def pack_examples(
    examples: Iterable[tuple[str, dict]],
    max_len: int,
    block_size: int,
    open_rows: int = OPEN_ROWS,
) -> Iterator[tuple[str, dict]]:
  """Packs stored examples into rows of at most `max_len` tokens.

  Args:
    examples: (key, features) pairs as `preprocess.examples` yields them: `input_ids` and
      `maskable` of length a multiple of `block_size`, at most `max_len`; `source`.
    max_len: L, the row length.
    block_size: B; every example length must be a multiple (checked).
    open_rows: rows kept open for first-fit.

  Yields:
    (key, features) per row: the key of its first example; `input_ids [m]`,
    `maskable [m]`, `segment_ids [m]` int32 (1..k), `source []`, with m <= max_len.
  """
  rows: list[list] = []  # open rows: [tokens used, [(key, features), ...]]
  for key, feats in examples:
    length = len(feats["input_ids"])
    if length % block_size or not 0 < length <= max_len:
      raise ValueError(
          f"example {key} has {length} tokens; a packed example needs a positive multiple of "
          f"block_size={block_size} of at most max_len={max_len}"
      )
    row = next((row for row in rows if row[0] + length <= max_len), None)
    if row is None:
      row = [0, []]
      rows.append(row)
    row[0] += length
    row[1].append((key, feats))
    if row[0] == max_len:
      rows.remove(row)
      yield _row(row[1])
    elif len(rows) > open_rows:
      fullest = max(rows, key=lambda r: r[0])  # the first of the fullest: the oldest
      rows.remove(fullest)
      yield _row(fullest[1])
  for row in rows:
    yield _row(row[1])


def one_per_row(examples: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
  """Examples stored unpacked next to packed splits (the held-out split): one segment each."""
  for key, feats in examples:
    yield key, {**feats, "segment_ids": np.ones(len(feats["input_ids"]), np.int32)}


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Each token's position within its segment: ``[L] -> [L]`` int32 (0 on padding, segment 0)."""
  index = np.arange(len(segment_ids))
  starts = np.r_[True, segment_ids[1:] != segment_ids[:-1]]
  first = np.maximum.accumulate(np.where(starts, index, 0))
  return np.where(segment_ids > 0, index - first, 0).astype(np.int32)
