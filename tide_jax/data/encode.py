"""One side (student or teacher) of an example: tokens with byte offsets, trained tokens, content spans.

A chat record is rendered with the side's chat template; the response (what the model is
trained to produce) is, for each assistant message k, the text between the rendering of
messages[:k] with the generation prompt and the rendering of messages[:k+1] (its content plus
the template's end-of-turn marker). Each message's content is located inside its own
segment of the rendering so that both sides can be aligned message by message.

Byte offsets come from the tokens' bytes (`token_bytes`), not from character offsets: a
byte-level BPE token may end in the middle of a UTF-8 character, which character offsets
cannot express but the cross-tokenizer chunks need.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from tide_jax.data.tokenizers import get_tokenizer, token_bytes


class TemplateError(ValueError):
  """A chat template that does not render messages incrementally or alters their content."""


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
  """A tokenizer with the per-id arrays the pipeline needs (built once per process)."""

  tokenizer: object
  byte_lengths: np.ndarray  # [vocab] int64, bytes per token id
  special: np.ndarray  # [vocab] bool, added/special tokens (never inside a chunk)
  eos_id: int
  pad_id: int


@functools.lru_cache(maxsize=8)
def tokenizer_info(spec: str, chat_template: str | None = None) -> TokenizerInfo:
  tok = get_tokenizer(spec, chat_template)
  table = token_bytes(tok)
  special = np.zeros(len(table), bool)
  special[list(tok.backend_tokenizer.get_added_tokens_decoder())] = True
  return TokenizerInfo(
      tok,
      np.array([len(b) for b in table], np.int64),
      special,
      int(tok.eos_token_id),
      int(tok.pad_token_id),
  )


@dataclasses.dataclass
class Side:
  """A tokenized sequence. Offsets are bytes into the side's own rendered text.

  ids [n] int32; starts, ends [n] int64; trained [n] bool (response tokens);
  spans: per message (or one for plain text), the (start, end) bytes of its content, or
    None where the template trimmed whitespace off the content;
  trimmed_spans: per message, the (start, end) bytes of its whitespace-trimmed content.
  """

  ids: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  trained: np.ndarray
  spans: list
  trimmed_spans: list

  @property
  def prompt_length(self) -> int:
    """Number of tokens before the first trained token (all of them if none is trained)."""
    hits = np.flatnonzero(self.trained)
    return int(hits[0]) if hits.size else len(self.ids)


def tokenize_with_offsets(
    info: TokenizerInfo, text: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids [n] int32 and their byte (starts, ends) in `text`'s UTF-8 encoding."""
  ids = np.asarray(info.tokenizer.encode(text, add_special_tokens=False), np.int32)
  ends = np.cumsum(info.byte_lengths[ids])
  starts = ends - info.byte_lengths[ids]
  # SentencePiece-style tokenizers prepend one '▁' (a space) that the text does not have.
  shift = int(ends[-1]) - len(text.encode("utf-8")) if ids.size else 0
  if shift not in (0, 1):
    raise TemplateError(
        f"the tokenizer's bytes for a text differ from the text by {shift} bytes; "
        "alignment needs a lossless (byte-level or byte-fallback) tokenizer"
    )
  return ids, np.maximum(starts - shift, 0), ends - shift


def _byte_offset(text: str, char_index: int) -> int:
  return len(text[:char_index].encode("utf-8"))


@functools.lru_cache(maxsize=16)
def _compiled_template(source: str):
  import jinja2
  import jinja2.sandbox

  # The environment HF chat templates are written for: trimmed blocks, loop controls, tojson.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )
  env.filters["tojson"] = lambda value, indent=None: json.dumps(
      value, ensure_ascii=False, indent=indent
  )

  def raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")

  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


def render(info: TokenizerInfo, messages: list[dict], generation_prompt: bool = False) -> str:
  """The chat template applied to `messages` (which may be empty: the conversation's start)."""
  tok = info.tokenizer
  variables = {
      key: value for key, value in tok.special_tokens_map.items() if isinstance(value, str)
  }
  try:
    return _compiled_template(tok.chat_template).render(
        messages=messages, add_generation_prompt=generation_prompt, **variables
    )
  except TemplateError:
    raise
  except Exception as err:  # a template indexing messages[0] cannot render an empty prefix
    if not messages:
      return ""
    raise TemplateError(f"the chat template failed to render the conversation: {err}") from err


def encode_chat(info: TokenizerInfo, messages: tuple[tuple[str, str], ...]) -> Side:
  """Renders and tokenizes a conversation; marks the assistant turns as trained.

  Raises:
    TemplateError: if the template is not incremental (messages[:k] renders to a prefix of
      messages[:k+1]) or a message's content cannot be found in its segment.
  """
  dicts = [{"role": role, "content": content} for role, content in messages]
  prefixes = [render(info, dicts[:k]) for k in range(len(dicts) + 1)]
  full = prefixes[-1]
  trained_chars, spans_chars, trimmed_chars = [], [], []
  for k, (role, content) in enumerate(messages):
    seg_start, seg_end = len(prefixes[k]), len(prefixes[k + 1])
    if not prefixes[k + 1].startswith(prefixes[k]) or not full.startswith(prefixes[k + 1]):
      raise TemplateError(
          "the chat template does not render the conversation incrementally; alignment needs a template where each message appends to the rendering"
      )
    if role == "assistant":
      prompt = render(info, dicts[:k], generation_prompt=True)
      if not full.startswith(prompt) or len(prompt) > seg_end:
        raise TemplateError(
            "the chat template's generation prompt is not a prefix of the rendered assistant turn"
        )
      trained_chars.append((len(prompt), seg_end))
    segment = full[seg_start:seg_end]
    trimmed = content.strip()
    found = segment.find(content)
    if found >= 0:
      lead = len(content) - len(content.lstrip())
      spans_chars.append((seg_start + found, seg_start + found + len(content)))
      trimmed_chars.append((seg_start + found + lead, seg_start + found + lead + len(trimmed)))
      continue
    found = segment.find(trimmed)
    if found < 0:
      raise TemplateError(
          f"message {k} ({role}) does not appear in the rendered conversation; the chat template alters message content"
      )
    spans_chars.append(None)
    trimmed_chars.append((seg_start + found, seg_start + found + len(trimmed)))
  ids, starts, ends = tokenize_with_offsets(info, full)
  to_bytes = functools.partial(_byte_offset, full)
  trained = np.zeros(ids.shape, bool)
  for a, b in trained_chars:
    a, b = to_bytes(a), to_bytes(b)
    trained |= (starts >= a) & (starts < b)
  spans = [None if span is None else (to_bytes(span[0]), to_bytes(span[1])) for span in spans_chars]
  trimmed_spans = [(to_bytes(a), to_bytes(b)) for a, b in trimmed_chars]
  return Side(ids, starts, ends, trained, spans, trimmed_spans)


def encode_text(info: TokenizerInfo, text: str) -> Side:
  """A plain-text side: every token is trained, one content span covering the whole text."""
  ids, starts, ends = tokenize_with_offsets(info, text)
  whole = [(0, len(text.encode("utf-8")))]
  return Side(ids, starts, ends, np.ones(ids.shape, bool), whole, whole)


def split_text(info: TokenizerInfo, text: str, max_tokens: int) -> list[tuple[str, Side]]:
  """Splits a document into pieces of at most `max_tokens` tokens, cut between characters.

  Returns (piece text, piece side) pairs; each side keeps the document's tokenization
  (offsets relative to the piece) and is entirely trained.
  """
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
        [(0, b - a)],
        [(0, b - a)],
    )
    pieces.append((piece, side))
    first = last
  return pieces
