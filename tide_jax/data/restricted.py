"""A tokenizer restricted to the token ids a corpus uses, with its ids renumbered 0..V'-1.

A tiny model trained from scratch on a small corpus sees a few percent of a 151,936-id
vocabulary, yet its output projection (most of its FLOPs) covers all of them. A restricted
tokenizer keeps the base tokenizer's segmentation and only relabels ids: kept base id
``kept[i]`` becomes id ``i``. Text round-trips exactly, and byte offsets (what the chunk
alignments are computed on) are those of the base tokens.

Text whose base tokenization holds an id that was not kept (text outside the corpus the
restriction was built from) is still encoded losslessly: such a token is spelled with kept
tokens, longest kept prefix of its bytes first (every single-byte token is kept, so this
always succeeds). The ``kept`` list may also hold model-only ids past the base tokenizer's
last id (a mask slot such as Qwen3's 151669), which have no text.

A restricted tokenizer is stored as a folder: the base tokenizer's files
(``save_pretrained``) plus ``TABLE_FILE``; ``tokenizers.get_tokenizer(folder)`` loads it.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Sequence

import numpy as np

TABLE_FILE = "vocab_restriction.json"
TABLE_VERSION = 1


class RestrictedTokenizer:
  """The subset of a ``transformers`` tokenizer's interface the package uses, on kept ids.

  Attributes:
    base: the full tokenizer (a ``PreTrainedTokenizerFast``).
    kept: int64 ``[V']``, the base id of each restricted id, ascending.
    chat_template: the template used by ``apply_chat_template`` (the base's by default).
    info: what the table was built from (base spec, files), as stored in ``TABLE_FILE``.
  """

  def __init__(
      self, base, kept: Sequence[int], base_bytes: Sequence[bytes], info: dict | None = None
  ):
    kept = np.asarray(kept, np.int64)
    if kept.size == 0 or np.any(np.diff(kept) <= 0) or kept[0] < 0:
      raise ValueError(
          "a vocabulary restriction needs kept ids that are non-negative and strictly "
          "ascending; rebuild it with tide_jax.data.vocab"
      )
    self.base = base
    self.kept = kept
    self.info = dict(info or {})
    self.chat_template = base.chat_template
    self._base_size = len(base_bytes)
    self._base_bytes = base_bytes
    self._to_restricted = np.full(max(self._base_size, int(kept[-1]) + 1), -1, np.int64)
    self._to_restricted[kept] = np.arange(kept.size)
    self._added = set(base.backend_tokenizer.get_added_tokens_decoder())
    # Text tokens by their bytes: what a dropped token is spelled with.
    self._by_bytes = {
        base_bytes[b]: i
        for i, b in enumerate(kept.tolist())
        if b < self._base_size and b not in self._added
    }
    missing_bytes = [b for b in range(256) if bytes([b]) not in self._by_bytes]
    if missing_bytes:
      raise ValueError(
          f"the restriction drops single-byte tokens (e.g. byte {missing_bytes[0]}), so text "
          "outside the corpus could not be spelled; rebuild it with tide_jax.data.vocab"
      )
    self._spelled: dict[int, tuple[int, ...]] = {}

  # ------------------------------------------------------------------ ids

  def __len__(self) -> int:
    return int(self.kept.size)

  @property
  def vocab_size(self) -> int:
    return len(self)

  @property
  def name_or_path(self) -> str:
    return str(self.info.get("name", "restricted"))

  def to_restricted(self, base_id: int | None) -> int | None:
    """The restricted id of a kept base id (None for None); ValueError for a dropped id."""
    if base_id is None:
      return None
    base_id = int(base_id)
    if 0 <= base_id < self._to_restricted.size and self._to_restricted[base_id] >= 0:
      return int(self._to_restricted[base_id])
    raise ValueError(
        f"base token id {base_id} is not part of the restricted vocabulary; add it to the "
        "restriction's extra ids (data.restrict_vocab) and rebuild it"
    )

  def to_base(self, ids: Sequence[int]) -> list[int]:
    return [int(self.kept[i]) for i in ids]

  @property
  def eos_token_id(self) -> int | None:
    return self.to_restricted(self.base.eos_token_id)

  @property
  def pad_token_id(self) -> int | None:
    return self.to_restricted(self.base.pad_token_id)

  @property
  def bos_token_id(self) -> int | None:
    return self.to_restricted(self.base.bos_token_id)

  @property
  def special_tokens_map(self) -> dict:
    return self.base.special_tokens_map

  def __getattr__(self, name):
    # Token strings (eos_token, pad_token, ...) and other read-only facts of the base.
    if name in ("eos_token", "pad_token", "bos_token", "all_special_tokens"):
      return getattr(self.base, name)
    raise AttributeError(name)

  def added_token_ids(self) -> list[int]:
    """Restricted ids of the base's added (special and control) tokens, and of model-only
    slots past the base's ids: tokens that never belong to a byte-aligned chunk."""
    return [i for i, b in enumerate(self.kept.tolist()) if b in self._added or b >= self._base_size]

  def token_bytes(self) -> list[bytes]:
    """The bytes of every restricted id (model-only slots have none)."""
    return [self._base_bytes[b] if b < self._base_size else b"" for b in self.kept.tolist()]

  # ------------------------------------------------------------------ text

  def _spell(self, base_id: int) -> tuple[int, ...]:
    """A dropped base token as kept tokens: the longest kept prefix of its bytes, repeatedly."""
    if base_id not in self._spelled:
      by_bytes, data, out = self._by_bytes, self._base_bytes[base_id], []
      while data:
        cut = next(n for n in range(len(data), 0, -1) if data[:n] in by_bytes)
        out.append(by_bytes[data[:cut]])
        data = data[cut:]
      self._spelled[base_id] = tuple(out)
    return self._spelled[base_id]

  def restrict_ids(self, base_ids: Sequence[int]) -> list[int]:
    """Base ids -> restricted ids, dropped tokens spelled with kept ones (same bytes)."""
    base = np.asarray(base_ids, np.int64)
    mapped = self._to_restricted[base] if base.size else base
    if base.size == 0 or np.all(mapped >= 0):
      return mapped.tolist()
    out = []
    for b, r in zip(base.tolist(), mapped.tolist()):
      out.extend((r,) if r >= 0 else self._spell(b))
    return out

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self.restrict_ids(self.base.encode(text, add_special_tokens=add_special_tokens))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    base = [b for b in self.to_base(ids) if b < self._base_size]
    return self.base.decode(base, skip_special_tokens=skip_special_tokens)

  def convert_ids_to_tokens(self, ids):
    if isinstance(ids, int):
      return self.base.convert_ids_to_tokens(int(self.kept[ids]))
    return self.base.convert_ids_to_tokens(self.to_base(ids))

  def apply_chat_template(self, messages, tokenize: bool = True, **kwargs):
    kwargs.setdefault("chat_template", self.chat_template)
    text = self.base.apply_chat_template(messages, tokenize=False, **kwargs)
    return self.encode(text) if tokenize else text

  # ------------------------------------------------------------------ storage

  def save_pretrained(self, path: str) -> None:
    """The base's files plus ``TABLE_FILE``: ``get_tokenizer(path)`` loads this tokenizer."""
    os.makedirs(path, exist_ok=True)
    base = self.base
    if self.chat_template != base.chat_template:
      base = _with_chat_template(base, self.chat_template)
    base.save_pretrained(path)
    write_table(path, self.kept, self.info)


def _with_chat_template(tokenizer, chat_template):
  variant = copy.copy(tokenizer)
  variant.chat_template = chat_template
  return variant


def write_table(path: str, kept: np.ndarray, info: dict) -> None:
  table = {"version": TABLE_VERSION, **info, "kept": [int(i) for i in kept]}
  with open(os.path.join(path, TABLE_FILE), "w", encoding="utf-8") as f:
    json.dump(table, f)


def read_table(path: str) -> tuple[np.ndarray, dict]:
  """(kept ids, info) of a restricted tokenizer folder."""
  with open(os.path.join(path, TABLE_FILE), encoding="utf-8") as f:
    table = json.load(f)
  if table.get("version") != TABLE_VERSION:
    raise ValueError(
        f"{path}/{TABLE_FILE} has version {table.get('version')!r}, not {TABLE_VERSION}; "
        "rebuild the restricted tokenizer (delete the folder and rerun)"
    )
  kept = np.asarray(table.pop("kept"), np.int64)
  table.pop("version")
  return kept, table


def is_restricted_folder(spec: str) -> bool:
  return os.path.isfile(os.path.join(spec, TABLE_FILE))
