"""One side (student or teacher) of an example: tokens with byte offsets, trained tokens, content spans.

A chat record is rendered once with the side's chat template. Where each message's content
lies in that rendering is found structurally, not by searching for the text: the template is
also rendered with a placeholder in place of each content, which gives the template text
around every message; walking the real rendering piece by piece then places each content
exactly (a template may trim whitespace off a content; anything else it does to a content is
a `TemplateError`). So an answer such as "assistant" is never found inside a role header, and
a content span never includes template whitespace.

What is trained (`train_turns`): "last" (the official release's choice) trains the last
assistant answer; "all" trains every assistant answer. An answer's trained text is its
content plus the template's end-of-turn text after it (e.g. `<|im_end|>\\n`); anything the
template puts between the role header and the content (Qwen3's empty think block) is prompt.
The prompt length used for "prompt too long" is everything before the last answer.

Byte offsets come from the tokens' bytes (`token_bytes`), not from character offsets: a
byte-level BPE token may end in the middle of a UTF-8 character, which character offsets
cannot express but the cross-tokenizer chunks need.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import unicodedata

import numpy as np

from tide_jax.data.templates import TemplateError, render
from tide_jax.data.tokenizers import added_token_ids, get_tokenizer, token_bytes

TRAIN_TURNS = ("last", "all")
# Plain-text documents are tokenized in windows of about this many characters (at most
# 1 MiB), which bounds the tokenizer's memory on long documents (see `text_windows`).
TEXT_WINDOW_CHARS = 1 << 18
_LINE_START = re.compile("\n(?=[!-~])")
# Placeholder contents for locating messages (private-use characters, never template text).
_PLACEHOLDER = "\U000f8000{}\U000f8001"
_PLACEHOLDER_RE = re.compile("\U000f8000(\\d+)\U000f8001")


class OffsetError(ValueError):
  """A text whose tokens' bytes are not the text's own bytes (offsets would be wrong)."""

  kind = "offset_mismatch"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizerInfo:
  """A tokenizer with the per-id arrays the pipeline needs (built once per process)."""

  tokenizer: object
  byte_lengths: np.ndarray  # [vocab] int64, bytes per token id
  special: np.ndarray  # [vocab] bool, added/special tokens (never inside a chunk)
  eos_id: int
  pad_id: int
  table: tuple  # [vocab] bytes of each token id
  # Template layouts per (roles, template arguments), see `_layout`.
  layouts: dict = dataclasses.field(default_factory=dict)

  @property
  def max_token_bytes(self) -> int:
    """The longest token's byte length: n tokens never cover more than n times this."""
    return int(self.byte_lengths.max())


@functools.lru_cache(maxsize=8)
def tokenizer_info(spec: str, chat_template: str | None = None) -> TokenizerInfo:
  tok = get_tokenizer(spec, chat_template)
  table = tuple(token_bytes(tok))
  special = np.zeros(len(table), bool)
  special[added_token_ids(tok)] = True
  return TokenizerInfo(
      tok,
      np.array([len(b) for b in table], np.int64),
      special,
      int(tok.eos_token_id),
      int(tok.pad_token_id),
      table,
  )


@dataclasses.dataclass
class Side:
  """A tokenized sequence. Offsets are bytes into the side's own rendered text.

  ids [n] int32; starts, ends [n] int64; trained [n] bool (response tokens);
  spans: per message, (start, end, content_offset): the bytes [start, end) of the rendering
    hold the message's content from byte `content_offset` of the content on (a template may
    trim whitespace); None where the message is not rendered (or was cut off);
  answer_start: index of the first token of the last answer (the prompt length);
  byte_truncated: the rendering was cut to the byte budget before tokenizing.
  """

  ids: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  trained: np.ndarray
  spans: list
  answer_start: int
  byte_truncated: bool = False

  @property
  def prompt_length(self) -> int:
    """Number of tokens before the last answer (all of them if it was cut off)."""
    return self.answer_start


def tokenize_with_offsets(
    info: TokenizerInfo, text: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids [n] int32 and their byte (starts, ends) in `text`'s UTF-8 encoding.

  Raises:
    OffsetError: the tokens' bytes are not the text's bytes, e.g. a text that is not
      NFC-normalised given to a tokenizer that normalises (Qwen's): offsets would point at
      the wrong bytes.
  """
  ids = np.asarray(info.tokenizer.encode(text, add_special_tokens=False), np.int32)
  ends = np.cumsum(info.byte_lengths[ids])
  starts = ends - info.byte_lengths[ids]
  data = text.encode("utf-8")
  joined = b"".join(info.table[i] for i in ids.tolist())
  if joined == data:
    return ids, starts, ends
  # SentencePiece-style tokenizers prepend one '▁' (a space) that the text does not have.
  if joined == b" " + data:
    return ids, np.maximum(starts - 1, 0), ends - 1
  if not unicodedata.is_normalized("NFC", text):
    raise OffsetError(
        "the text is not NFC-normalised and the tokenizer normalises it, so token offsets "
        "would not match the text; normalise it first with unicodedata.normalize('NFC', text)"
    )
  raise OffsetError(
      "the tokenizer's bytes for the text differ from the text's bytes; alignment needs a "
      "lossless (byte-level or byte-fallback) tokenizer"
  )


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where a template puts message contents, for one sequence of roles.

  order: the indices of the rendered messages, in rendering order;
  pieces: the template text before, between and after them (len(order) + 1 strings);
  end_of_turn: per rendered message index, the template text that closes its turn.
  """

  order: tuple[int, ...]
  pieces: tuple[str, ...]
  end_of_turn: dict


def _placeholders(roles, count: int | None = None) -> list[dict]:
  roles = roles[:count] if count is not None else roles
  return [{"role": role, "content": _PLACEHOLDER.format(k)} for k, role in enumerate(roles)]


def _layout(info: TokenizerInfo, roles: tuple[str, ...], template_args: tuple) -> _Layout:
  """The template text around each message, from renderings with placeholder contents.

  Depends only on the roles (and template arguments), so it is computed once per shape of
  conversation and reused.
  """
  key = (roles, template_args)
  if key in info.layouts:
    return info.layouts[key]
  args = dict(template_args)
  rendered = render(info.tokenizer, _placeholders(roles), template_args=args)
  parts = _PLACEHOLDER_RE.split(rendered)
  order, pieces = tuple(int(k) for k in parts[1::2]), tuple(parts[0::2])
  if list(order) != sorted(set(order)):
    raise TemplateError(
        "the chat template renders message contents out of order or more than once; "
        "alignment needs each content rendered once, in order"
    )
  end_of_turn = {}
  for position, k in enumerate(order):
    following = pieces[position + 1]
    if position == len(order) - 1:
      end_of_turn[k] = following
      continue
    # The turn's own closing text: what follows the content when it is the last message,
    # as far as the full rendering agrees (the rest belongs to the next message).
    alone = render(info.tokenizer, _placeholders(roles, k + 1), template_args=args)
    tail = alone.split(_PLACEHOLDER.format(k))[-1]
    end_of_turn[k] = os.path.commonprefix([tail, following])
  layout = _Layout(order, pieces, end_of_turn)
  info.layouts[key] = layout
  return layout


def _trim_candidates(content: str) -> list[tuple[int, int]]:
  """(start, end) cuts of `content` a template may render: whole, or trimmed of whitespace."""
  lead_nl = len(content) - len(content.lstrip("\n"))
  lead_ws = len(content) - len(content.lstrip())
  trail_nl = len(content) - len(content.rstrip("\n"))
  trail_ws = len(content) - len(content.rstrip())
  cuts = []
  for a in (0, lead_nl, lead_ws):
    for b in (len(content), len(content) - trail_nl, len(content) - trail_ws):
      if a <= b and (a, b) not in cuts:
        cuts.append((a, b))
  return cuts


def _locate(full: str, layout: _Layout, contents: list[str]) -> list:
  """Per message, (start byte, end byte, content byte offset) of its content in `full`."""
  if not full.startswith(layout.pieces[0]):
    raise TemplateError(
        "the chat template renders this conversation differently from its placeholder "
        "rendering (it depends on the message text); alignment cannot place the messages"
    )
  char, byte = len(layout.pieces[0]), len(layout.pieces[0].encode("utf-8"))
  spans = [None] * len(contents)
  for position, k in enumerate(layout.order):
    content, following = contents[k], layout.pieces[position + 1]
    for a, b in _trim_candidates(content):
      if full.startswith(content[a:b], char) and full.startswith(following, char + b - a):
        break
    else:
      raise TemplateError(
          f"message {k}'s content is not rendered as given (the chat template alters it "
          "beyond trimming whitespace, or renders this conversation differently)"
      )
    size = len(content[a:b].encode("utf-8"))
    spans[k] = (byte, byte + size, len(content[:a].encode("utf-8")))
    char += b - a + len(following)
    byte += size + len(following.encode("utf-8"))
  if char != len(full):
    raise TemplateError("the chat template renders text after the conversation that varies")
  return spans


def _cut(full: str, max_bytes: int) -> tuple[str, int | None]:
  """`full` cut to at most `max_bytes` UTF-8 bytes at a character boundary: (text, bytes
  kept), or (full, None) when it fits."""
  if not max_bytes or len(full) * 4 <= max_bytes:  # a character takes at most 4 bytes
    return full, None
  data = full.encode("utf-8")
  if len(data) <= max_bytes:
    return full, None
  cut = max_bytes
  while cut and (data[cut] & 0xC0) == 0x80:  # not inside a UTF-8 character
    cut -= 1
  return data[:cut].decode("utf-8"), cut


def encode_chat(
    info: TokenizerInfo,
    messages: tuple[tuple[str, str], ...],
    template_args: tuple = (),
    train_turns: str = "last",
    max_bytes: int = 0,
) -> Side:
  """Renders and tokenizes a conversation; marks the trained answer(s).

  Args:
    info: the side's tokenizer.
    messages: ((role, content), ...), with at least one assistant message.
    template_args: extra chat template variables as sorted (name, value) pairs.
    train_turns: "last" (the last assistant answer) or "all" (every assistant answer).
    max_bytes: when > 0, the rendering is cut to this many bytes before tokenizing (the
      caller sets it so that the cut falls beyond the tokens it keeps).

  Raises:
    TemplateError: the template cannot render the conversation, alters a content beyond
      trimming whitespace, or does not render an answer that is to be trained.
    OffsetError: the tokenizer's bytes differ from the rendered text's.
  """
  if train_turns not in TRAIN_TURNS:
    raise ValueError(f"train_turns must be one of {TRAIN_TURNS}, not {train_turns!r}")
  roles = tuple(role for role, _ in messages)
  contents = [unicodedata.normalize("NFC", content) for _, content in messages]
  answers = [k for k, role in enumerate(roles) if role == "assistant"]
  if not answers:
    raise TemplateError("the conversation has no assistant message")
  layout = _layout(info, roles, tuple(template_args))
  full = render(
      info.tokenizer,
      [{"role": r, "content": c} for r, c in zip(roles, contents)],
      template_args=dict(template_args),
  )
  spans = _locate(full, layout, contents)
  trained_ranges = []
  for k in answers if train_turns == "all" else answers[-1:]:
    if spans[k] is None:
      raise TemplateError(f"the chat template does not render assistant message {k}")
    start, end, _ = spans[k]
    trained_ranges.append((start, end + len(layout.end_of_turn[k].encode("utf-8"))))
  answer_byte = spans[answers[-1]][0]
  text, kept = _cut(full, max_bytes)
  ids, starts, ends = tokenize_with_offsets(info, text)
  trained = np.zeros(ids.shape, bool)
  for a, b in trained_ranges:
    trained |= (starts >= a) & (starts < b)
  if kept is not None:
    spans = [None if s is None or s[0] >= kept else (s[0], min(s[1], kept), s[2]) for s in spans]
  answer_start = int(np.searchsorted(starts, answer_byte, side="left"))
  return Side(ids, starts, ends, trained, spans, answer_start, kept is not None)


def encode_text(info: TokenizerInfo, text: str) -> Side:
  """A plain-text side: every token is trained, one content span covering the whole text."""
  text = unicodedata.normalize("NFC", text)
  ids, starts, ends = tokenize_with_offsets(info, text)
  return Side(ids, starts, ends, np.ones(ids.shape, bool), [(0, len(text.encode("utf-8")), 0)], 0)


def text_windows(text: str, window_chars: int = 0) -> list[str]:
  """`text` in consecutive pieces of at most about `window_chars` (default
  TEXT_WINDOW_CHARS) characters.

  Each piece but the last ends with a newline followed by a printable ASCII character: every
  pre-tokenizer split pattern of the byte-level tokenizers ends a pre-token there, so
  tokenizing the pieces one by one gives exactly the tokens of the whole text. Where a
  window holds no such line start, the piece runs on to the next one.
  """
  window_chars = window_chars or TEXT_WINDOW_CHARS
  windows, start = [], 0
  while len(text) - start > window_chars:
    cut = text.rfind("\n", start, start + window_chars)
    while cut >= start and not "!" <= text[cut + 1] <= "~":
      cut = text.rfind("\n", start, cut)
    if cut < start:
      match = _LINE_START.search(text, start + window_chars)
      if match is None:
        break
      cut = match.start()
    windows.append(text[start : cut + 1])
    start = cut + 1
  windows.append(text[start:])
  return windows


def split_text(info: TokenizerInfo, text: str, max_tokens: int) -> list[tuple[str, Side]]:
  """Splits a document into pieces of at most `max_tokens` tokens, cut between characters.

  Returns (piece text, piece side) pairs; each side keeps the document's tokenization
  (offsets relative to the piece) and is entirely trained. Long documents are tokenized in
  windows (`text_windows`); a piece never spans two windows.
  """
  pieces = []
  for window in text_windows(unicodedata.normalize("NFC", text)):
    pieces.extend(_split_window(info, window, max_tokens))
  return pieces


def _split_window(info: TokenizerInfo, text: str, max_tokens: int) -> list[tuple[str, Side]]:
  ids, starts, ends = tokenize_with_offsets(info, text)
  data = text.encode("utf-8")
  # A cut before token i is allowed where that token starts a character (not a UTF-8
  # continuation byte), so that every piece is valid text for the other tokenizer.
  allowed = np.array([(data[s] & 0xC0) != 0x80 for s in starts.tolist()] + [True])
  pieces, first = [], 0
  while first < len(ids):
    last = min(first + max_tokens, len(ids))
    while last > first + 1 and not allowed[last]:
      last -= 1
    a, b = int(starts[first]), int(ends[last - 1])
    piece = (
        data[a:b].decode("utf-8", errors="strict")
        if allowed[last]
        else data[a:b].decode("utf-8", errors="replace")
    )
    side = Side(
        ids[first:last],
        starts[first:last] - a,
        ends[first:last] - a,
        np.ones(last - first, bool),
        [(0, b - a, 0)],
        0,
    )
    pieces.append((piece, side))
    first = last
  return pieces
