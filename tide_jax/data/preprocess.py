"""Records -> stored example features, in one process or a pool of them, with a tally.

`examples(items, options)` yields (key, features) for every kept example and fills a `Tally`
with what was kept, truncated and dropped (by reason, with the first few sources), so that
nothing is lost silently. In strict mode the first bad record raises a `DataError` naming
its file and line.

The work per chat record is bounded: its rendering is cut to `byte_budget` bytes before it
is tokenized (enough for every token a row can keep), so one huge record costs no more than
a row's worth of text; such records are counted as `byte_truncated`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time

import numpy as np

from tide_jax.data import encode, features as features_lib
from tide_jax.data.options import DataOptions
from tide_jax.data.records import ChatRecord, DataError, Problem
from tide_jax.data.templates import TemplateError

# With num_workers = 0 (auto) a pool is used from this many records on. Measured (see
# docs/benchmarks/data.md): one process prepares ~550-1800 examples/s, while each spawned
# worker needs several seconds to import and build its tokenizers, so a pool of 2 loses
# below ~10^4 records.
POOL_MIN_RECORDS = 20000
EXAMPLES_SHOWN = 3
# Bytes a rendering keeps beyond the longest text its kept tokens can cover, so that the
# cut (and the different tokens a cut pre-token may give) lies past the row's last token.
BYTE_MARGIN = 1 << 16


def byte_budget(info: encode.TokenizerInfo, max_tokens: int) -> int:
  """Bytes of a rendering that certainly hold its first `max_tokens` tokens."""
  return max_tokens * info.max_token_bytes + BYTE_MARGIN


@dataclasses.dataclass
class Tally:
  """Counts of one split's (or one source's) preprocessing; `as_dict` goes into the metadata."""

  records: int = 0
  examples: int = 0
  truncated: int = 0
  byte_truncated: int = 0  # records whose rendering was cut to the byte budget
  student_tokens: int = 0
  teacher_tokens: int = 0
  aligned: int = 0  # chunks or pairs over all examples
  rows: int = 0  # stored rows: the examples, or fewer with data.packing
  padding_tokens: int = 0  # pad tokens the rows add up to max_len (what packing saves)
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_sources: dict = dataclasses.field(default_factory=dict)
  seconds: float = 0.0

  def drop(self, kind: str, source: str) -> None:
    self.dropped[kind] += 1
    self.dropped_sources.setdefault(kind, [])
    if len(self.dropped_sources[kind]) < EXAMPLES_SHOWN:
      self.dropped_sources[kind].append(source)

  def as_dict(self) -> dict:
    return {
        "records": self.records,
        "examples": self.examples,
        "truncated": self.truncated,
        "byte_truncated": self.byte_truncated,
        "dropped": dict(self.dropped),
        "dropped_examples": self.dropped_sources,
        "student_tokens": self.student_tokens,
        "teacher_tokens": self.teacher_tokens,
        "aligned_units": self.aligned,
        "rows": self.rows,
        "padding_tokens": self.padding_tokens,
        "seconds": round(self.seconds, 2),
    }

  @classmethod
  def from_dict(cls, values: dict) -> "Tally":
    return cls(
        records=values["records"],
        examples=values["examples"],
        truncated=values["truncated"],
        byte_truncated=values["byte_truncated"],
        student_tokens=values["student_tokens"],
        teacher_tokens=values["teacher_tokens"],
        aligned=values["aligned_units"],
        rows=values["rows"],
        padding_tokens=values["padding_tokens"],
        dropped=collections.Counter(values["dropped"]),
        dropped_sources={k: list(v) for k, v in values["dropped_examples"].items()},
        seconds=values["seconds"],
    )

  def add(self, other: "Tally") -> None:
    """Adds another tally's counts (e.g. one source's into the split's)."""
    for field in (
        "records",
        "examples",
        "truncated",
        "byte_truncated",
        "student_tokens",
        "teacher_tokens",
        "aligned",
        "rows",
        "padding_tokens",
        "seconds",
    ):
      setattr(self, field, getattr(self, field) + getattr(other, field))
    for kind, count in other.dropped.items():
      self.dropped[kind] += count
      shown = self.dropped_sources.setdefault(kind, [])
      shown.extend(other.dropped_sources.get(kind, [])[: EXAMPLES_SHOWN - len(shown)])

  def count_row(self, row_tokens: int, max_len: int) -> None:
    """Counts one stored row holding `row_tokens` example tokens."""
    self.rows += 1
    self.padding_tokens += max_len - row_tokens

  def report(self, split: str) -> str:
    filled = self.student_tokens / max(self.student_tokens + self.padding_tokens, 1)
    lines = [
        f"[{split}] records read {self.records}, examples kept {self.examples} "
        f"(truncated {self.truncated}, cut to the byte budget {self.byte_truncated}), "
        f"dropped {sum(self.dropped.values())}, "
        f"student tokens {self.student_tokens}, teacher tokens {self.teacher_tokens}, "
        f"aligned chunks/pairs {self.aligned}, {self.seconds:.1f}s",
        f"  stored in {self.rows} rows, {filled:.1%} of their tokens non-padding",
    ]
    for kind, count in sorted(self.dropped.items()):
      lines.append(f"  dropped {count} x {kind}, e.g. {', '.join(self.dropped_sources[kind])}")
    return "\n".join(lines)


def _infos(options: DataOptions):
  student = encode.tokenizer_info(options.tokenizer, options.chat_template)
  teacher = (
      encode.tokenizer_info(options.teacher_tokenizer, options.teacher_chat_template)
      if options.teacher_tokenizer
      else None
  )
  return student, teacher


def process_record(item, options: DataOptions) -> list[tuple[dict | None, str, str, bool]]:
  """One record -> [(features or None, status, source, byte_truncated)]; plain text may give
  several pieces."""
  s_info, t_info = _infos(options)
  shapes = options.shapes
  try:
    if isinstance(item, ChatRecord):
      student = encode.encode_chat(
          s_info,
          item.messages,
          options.template_args,
          options.train_turns,
          byte_budget(s_info, options.max_len),
      )
      teacher = (
          encode.encode_chat(
              t_info,
              item.messages,
              options.teacher_template_args,
              options.train_turns,
              byte_budget(t_info, options.teacher_max_len),
          )
          if t_info
          else None
      )
      cut = student.byte_truncated or (teacher is not None and teacher.byte_truncated)
      feats, status = features_lib.build_example(student, s_info, shapes, teacher, t_info)
      return [(feats, status, item.source, cut)]
    out = []
    for number, (text, student) in enumerate(
        encode.split_text(s_info, item.text, options.max_len), start=1
    ):
      teacher = encode.encode_text(t_info, text) if t_info else None
      out.append(
          (
              *features_lib.build_example(student, s_info, shapes, teacher, t_info),
              f"{item.source}#{number}",
              False,
          )
      )
    return out
  except (TemplateError, encode.OffsetError) as err:
    return [(None, f"{err.kind}: {err}", item.source, False)]


def _worker(args):
  index, item, options = args
  return index, process_record(item, options)


def _count(
    tally: Tally, feats: dict | None, status: str, source: str, cut: bool, options: DataOptions
) -> None:
  tally.byte_truncated += cut
  if feats is None:
    kind = status.split(":")[0]
    if options.strict:
      raise DataError(
          f"{source}: dropped as {status}; fix the record or turn off data_config.strict"
      )
    tally.drop(kind, source)
    return
  tally.examples += 1
  tally.truncated += status == "truncated"
  tally.student_tokens += len(feats["input_ids"])
  tally.teacher_tokens += len(feats.get("teacher_input_ids", ()))
  tally.aligned += (
      int(feats["num_chunks"]) if "num_chunks" in feats else len(feats.get("pair_student", ()))
  )


def examples(items, options: DataOptions, tally: Tally):
  """Yields (key, features) for the (source id, record or problem) pairs in `items`.

  Updates `tally`; each example's features carry its `source` id.
  """
  start = time.time()
  records, origins = [], []
  for origin, item in items:
    if isinstance(item, Problem):
      if options.strict:
        raise item.error()
      tally.drop(item.kind, item.source)
      continue
    records.append(item)
    origins.append(origin)
    if options.max_records and len(records) >= options.max_records:
      break
  tally.records += len(records)
  # num_workers: 0 = auto (a pool of one process per core for large inputs), 1 = in this
  # process, n > 1 = a pool of n processes.
  auto = options.num_workers == 0 and len(records) >= POOL_MIN_RECORDS
  workers = (os.cpu_count() or 1) if auto else options.num_workers
  if workers > 1:
    results = _pooled(records, options, workers)
  else:
    results = ((i, process_record(r, options)) for i, r in enumerate(records))
  for index, outputs in results:
    for piece, (feats, status, source, cut) in enumerate(outputs):
      _count(tally, feats, status, source, cut, options)
      if feats is not None:
        feats["source"] = np.int32(origins[index])
        yield f"{index:010d}-{piece:05d}", feats
  tally.seconds += time.time() - start


def _pooled(records, options, workers):
  # Fork shares the tokenizers already built here, but is unsafe once JAX (multithreaded)
  # runs in this process, as during training; then workers are spawned and build their own.
  use_fork = "jax" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
  if use_fork:
    _infos(options)
  context = multiprocessing.get_context("fork" if use_fork else "spawn")
  with context.Pool(workers) as pool:
    jobs = zip(range(len(records)), records, itertools.repeat(options))
    yield from pool.imap(_worker, jobs, chunksize=32)
