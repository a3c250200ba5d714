"""Reading training records from files, with every bad record counted (or, in strict mode, raised).

Two formats:
- "text": each file is one document (UTF-8); it becomes one `TextRecord`.
- "chat": JSON Lines (one object per line) or Parquet files; each record (line or row) is a
  `ChatRecord`, in either of the published layouts of the paper's SFT sources:
  - `messages`: a list of {role, content} (Tulu-3 SFT mixture, SmolTalk); other fields
    (`id`, `source`) are ignored;
  - `instruction` and `output` strings (OpenCoder SFT stage 1 and 2): a user turn and the
    assistant's answer; other fields (`tag`, `code`, `entry_point`, `testcase`) are ignored.

Readers yield records and `Problem`s in file order; a `Problem` names the file and line (or row)
and says what is wrong, so the caller can count it, report it, or raise it in strict mode.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import unicodedata
from typing import Iterator, Union

from etils import epath

STDLIB_PREFIX = "pystdlib://"
ROLES = ("system", "user", "assistant")
# Parquet columns a chat record may be read from (see the module docstring).
CHAT_COLUMNS = ("messages", "instruction", "output")
PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
  """Bad input data in strict mode: the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class TextRecord:
  text: str
  source: str  # "file" for display


@dataclasses.dataclass(frozen=True)
class ChatRecord:
  messages: tuple[tuple[str, str], ...]  # (role, content), content NFC-normalised
  source: str  # "file:line" for display


@dataclasses.dataclass(frozen=True)
class Problem:
  kind: str  # short counter name: "malformed_json", "unknown_role", ...
  source: str  # "file:line"
  message: str  # one sentence saying what is wrong and how to fix it

  def error(self) -> DataError:
    return DataError(f"{self.source}: {self.message}")


Item = Union[TextRecord, ChatRecord, Problem]


def resolve_pattern(pattern: str) -> str:
  """Expands the `pystdlib://` prefix to the running Python's standard-library folder."""
  if pattern.startswith(STDLIB_PREFIX):
    return os.path.join(sysconfig.get_paths()["stdlib"], pattern[len(STDLIB_PREFIX) :])
  return pattern


def display_name(path: str) -> str:
  """A path as shown in reports: standard-library files keep their `pystdlib://` form."""
  stdlib = sysconfig.get_paths()["stdlib"].rstrip(os.sep) + os.sep
  return STDLIB_PREFIX + path[len(stdlib) :] if path.startswith(stdlib) else path


def _glob(pattern: str) -> list[str]:
  """Files matching ``pattern``: local globs, or ``scheme://bucket/dir/*.jsonl`` (gs://)."""
  if "://" not in pattern:
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  first = min((i for i, c in enumerate(pattern) if c in "*?["), default=len(pattern))
  root = pattern[: pattern.rfind("/", 0, first)]
  rest = pattern[len(root) + 1 :]
  if first == len(pattern):  # no wildcard: the file itself
    return [pattern] if epath.Path(pattern).is_file() else []
  return sorted(os.fspath(p) for p in epath.Path(root).glob(rest) if p.is_file())


def expand_files(patterns) -> list[str]:
  """All files matched by a list of glob patterns, sorted and de-duplicated.

  Raises:
    ValueError: when a pattern matches no file (a typo would otherwise train on nothing).
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    matched = _glob(resolve_pattern(pattern))
    if not matched:
      raise ValueError(
          f"file pattern {pattern!r} matches no file; fix the path in data_config.train_files/eval_files"
      )
    files.extend(matched)
  return sorted(set(files))


def record_hash(item: Union[TextRecord, ChatRecord]) -> int:
  """A stable 64-bit hash of a record's content (not its location), for held-out splits."""
  if isinstance(item, TextRecord):
    payload = item.text.encode("utf-8")
  else:
    payload = json.dumps(item.messages, ensure_ascii=False).encode("utf-8")
  return int.from_bytes(hashlib.sha1(payload).digest()[:8], "little")


def _decode_utf8(data: bytes, source: str) -> tuple[str | None, Problem | None]:
  try:
    return data.decode("utf-8"), None
  except UnicodeDecodeError as err:
    line = data[: err.start].count(b"\n") + 1
    return None, Problem(
        "invalid_utf8",
        f"{source}:{line}",
        f"bytes at offset {err.start} are not valid UTF-8; re-encode the file as UTF-8",
    )


def read_text_file(path: str) -> Iterator[Item]:
  """Yields one TextRecord for the whole file, or a Problem when it is empty or not UTF-8."""
  name = display_name(path)
  with epath.Path(path).open("rb") as f:
    data = f.read()
  if not data.strip():
    yield Problem("empty_file", f"{name}:1", "the file is empty; remove it or give it content")
    return
  text, problem = _decode_utf8(data.removeprefix(codecs.BOM_UTF8), name)
  if problem is not None:
    yield problem
    return
  yield TextRecord(unicodedata.normalize("NFC", text), name)


def parse_messages(obj, source: str) -> Union[ChatRecord, Problem]:
  """Validates one decoded JSON/Parquet record, in either layout, into a ChatRecord.

  Empty contents (e.g. an empty system prompt) are kept: the template renders them as such.
  """
  if isinstance(obj, dict) and "messages" not in obj and "instruction" in obj and "output" in obj:
    if not isinstance(obj["instruction"], str) or not isinstance(obj["output"], str):
      return Problem(
          "bad_message", source, '"instruction" and "output" must be strings (OpenCoder layout)'
      )
    obj = {
        "messages": [
            {"role": "user", "content": obj["instruction"]},
            {"role": "assistant", "content": obj["output"]},
        ]
    }
  if not isinstance(obj, dict) or "messages" not in obj:
    return Problem(
        "missing_messages",
        source,
        'the record has neither "messages" (a list of {"role", "content"}: the Tulu-3 / '
        'SmolTalk layout) nor "instruction" and "output" (the OpenCoder SFT layout)',
    )
  messages = obj["messages"]
  if not isinstance(messages, (list, tuple)) or not messages:
    return Problem(
        "missing_messages",
        source,
        '"messages" must be a non-empty list of {"role", "content"} objects',
    )
  parsed = []
  for i, message in enumerate(messages):
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)
    ):
      return Problem(
          "bad_message", source, f"message {i} is not an object with string 'role' and 'content'"
      )
    role, content = message["role"], message["content"]
    if role not in ROLES:
      return Problem(
          "unknown_role", source, f"message {i} has unknown role {role!r}; use one of {ROLES}"
      )
    parsed.append((role, unicodedata.normalize("NFC", content)))
  if not any(role == "assistant" for role, _ in parsed):
    return Problem(
        "no_response",
        source,
        "the conversation has no assistant message, so there is nothing to train on",
    )
  return ChatRecord(tuple(parsed), source)


def read_jsonl_file(path: str) -> Iterator[Item]:
  """Yields a ChatRecord or Problem per non-blank line of a JSON Lines file (read line by line).

  A UTF-8 byte order mark before the first line is skipped.
  """
  name = display_name(path)
  seen = False
  with epath.Path(path).open("rb") as f:
    for number, raw in enumerate(f, start=1):
      if number == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
      if not raw.strip():
        continue
      seen = True
      source = f"{name}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        yield Problem(
            "invalid_utf8",
            source,
            f"byte {err.start} of the line is not valid UTF-8; re-encode the file as UTF-8",
        )
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as err:
        yield Problem(
            "malformed_json",
            source,
            f"the line is not valid JSON ({err.msg} at column {err.colno}); fix or remove it",
        )
        continue
      yield parse_messages(obj, source)
  if not seen:
    yield Problem("empty_file", f"{name}:1", "the file is empty; remove it or add records")


def read_parquet_file(path: str) -> Iterator[Item]:
  """Yields a ChatRecord or Problem per row of a Parquet file (read in row batches).

  The rows need a `messages` column, or `instruction` and `output` columns.
  """
  import pyarrow.parquet as pq  # imported lazily: only Parquet inputs need it

  name = display_name(path)
  table = pq.ParquetFile(epath.Path(path).open("rb") if "://" in path else path)
  rows = table.metadata.num_rows
  if rows == 0:
    yield Problem(
        "empty_file", f"{name}:row 1", "the Parquet file has no rows; remove it or add records"
    )
    return
  names = table.schema_arrow.names
  columns = [c for c in CHAT_COLUMNS if c in names]
  if "messages" not in columns and not {"instruction", "output"} <= set(columns):
    for row in range(rows):
      yield Problem(
          "missing_messages",
          f"{name}:row {row + 1}",
          f'the table has neither a "messages" column nor "instruction" and "output" columns '
          f"(columns: {names})",
      )
    return
  row = 0
  for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
    for record in batch.to_pylist():
      row += 1
      yield parse_messages(record, f"{name}:row {row}")


def read_file(path: str, fmt: str) -> Iterator[Item]:
  """Dispatches on data format ("text" or "chat") and, for chat, on the file suffix."""
  if fmt == "text":
    return read_text_file(path)
  if fmt == "chat":
    if path.endswith(".parquet"):
      return read_parquet_file(path)
    return read_jsonl_file(path)
  raise ValueError(f"data_config.format must be 'text' or 'chat', not {fmt!r}")


def read_records(files: list[str], fmt: str) -> Iterator[Item]:
  """Records and problems of all files, in order."""
  for path in files:
    yield from read_file(path, fmt)
