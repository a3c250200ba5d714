"""Data pipeline benchmark: preprocessing throughput per alignment kind, and alignment memory.

    python benchmarks/bench_data.py [--records 2000] [--out docs/benchmarks/data.md]
    python benchmarks/bench_data.py --packing_only   # the packing section alone, in place

Corpus: chat records built from real text that ships offline (HumanEval problems with their
canonical solutions, standard-library functions with their docstrings). Measures, in one
process (so "per core"):
  - examples/s for student only, shared-vocabulary positions (Qwen3 student, Qwen3 teacher
    with another chat template) and cross-tokenizer chunks (Qwen3 student, Llama-3 teacher),
    and the share of the time spent in the alignment itself;
  - the full `prepare` (TFDS array_record writing included), in-process and with a 2-process pool;
  - host memory per batch of the alignment arrays vs dense [L, n_chunks] boolean matrices;
  - one huge record (a chat answer or prompt of --huge_mb MB, a plain-text document of that
    size): seconds and peak memory with the per-record byte budget (chat) and the tokenizer
    windows (text) against tokenizing the whole text, each case in a fresh process;
  - packed vs padded rows (`data.packing`): the share of non-padding tokens per step on the
    standard-library files chunked as configs/smoke.py does and on the chat corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tide_jax.data import (  # noqa: E402
    alignment,
    builder,
    corpora,
    encode,
    features,
    packing,
    preprocess,
    records as records_lib,
)
from tide_jax.data.options import parse_options  # noqa: E402
from tide_jax.data.records import parse_messages  # noqa: E402

TEACHER_TEMPLATE = (  # a different template on the teacher side: injected system prompt, other markers
    "<|im_start|>system\nYou are a helpful teacher.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_corpus(n: int) -> list[dict]:
  chats = corpora.humaneval_chats()
  return chats + corpora.stdlib_chats(max(0, n - len(chats)))


def time_kind(records, kind: str, max_len: int) -> dict:
  """Per-stage seconds for encoding both sides, aligning and building the stored features."""
  s_info = encode.tokenizer_info("qwen3")
  t_info = {
      "none": None,
      "positions": encode.tokenizer_info("qwen3", TEACHER_TEMPLATE),
      "chunks": encode.tokenizer_info("llama3"),
  }[kind]
  shapes = (
      features.Shapes(max_len, 32)
      if t_info is None
      else features.Shapes(max_len, 32, max_len, 32, kind, max_len)
  )
  seconds = {"encode": 0.0, "align": 0.0, "total": 0.0}
  kept, units = 0, []
  start_all = time.perf_counter()
  for record in records:
    t0 = time.perf_counter()
    student = encode.encode_chat(s_info, record.messages)
    teacher = encode.encode_chat(t_info, record.messages) if t_info else None
    t1 = time.perf_counter()
    if kind == "chunks":
      alignment.chunk_alignment(student, teacher, s_info.special, t_info.special)
    elif kind == "positions":
      alignment.position_pairs(student, teacher)
    t2 = time.perf_counter()
    feats, _ = features.build_example(student, s_info, shapes, teacher, t_info)
    seconds["encode"] += t1 - t0
    seconds["align"] += t2 - t1
    if feats is not None:
      kept += 1
      if kind == "chunks":
        units.append(int(feats["num_chunks"]))
      elif kind == "positions":
        units.append(len(feats["pair_student"]))
  seconds["total"] = time.perf_counter() - start_all
  # build_example aligns again (on the truncated example); count the standalone alignment once.
  seconds["total"] -= seconds["align"]
  return {"kind": kind, "records": len(records), "kept": kept, "seconds": seconds, "units": units}


def time_prepare(path: str, cache: str, kind: str, workers: int, max_len: int) -> float:
  cfg = {
      "format": "chat",
      "train_files": [path],
      "tokenizer": "qwen3",
      "max_len": max_len,
      "block_size": 32,
      "cache_dir": cache,
      "num_workers": workers,
  }
  if kind == "chunks":
    cfg.update(teacher_tokenizer="llama3", alignment="chunks")
  options = parse_options(cfg)
  start = time.perf_counter()
  b = builder.make_builder(options)
  b.download_and_prepare()
  return time.perf_counter() - start


def memory_rows(records, batch_size: int) -> list[tuple]:
  """Alignment bytes per batch: chunk ids vs dense matrices, at L = Lt = 512 and 1024."""
  s_info, t_info = encode.tokenizer_info("qwen3"), encode.tokenizer_info("llama3")
  rows = []
  for length in (512, 1024):
    shapes = features.Shapes(length, 32, length, 32, "chunks", length)
    counts = []
    for record in records[: batch_size * 8]:
      s = encode.encode_chat(s_info, record.messages)
      t = encode.encode_chat(t_info, record.messages)
      feats, _ = features.build_example(s, s_info, shapes, t, t_info)
      if feats is not None:
        counts.append(int(feats["num_chunks"]))
    counts = np.array(counts)
    batches = counts[: len(counts) // batch_size * batch_size].reshape(-1, batch_size)
    ids_bytes = batch_size * (
        4 * length + 4 * length + 4
    )  # student_chunk, teacher_chunk, num_chunks
    dense_batch_max = np.mean(
        [batch_size * 2 * length * b.max() for b in batches]
    )  # bool [L, n_max] x 2 sides
    dense_static = batch_size * 2 * length * length  # n_chunks padded to L for one static shape
    rows.append(
        (length, float(counts.mean()), int(counts.max()), ids_bytes, dense_batch_max, dense_static)
    )
  return rows


HUGE_CASES = {
    # case: (what is huge, bounded?)
    "answer_whole": ("chat answer", False),
    "answer_budget": ("chat answer", True),
    "prompt_whole": ("chat prompt", False),
    "prompt_budget": ("chat prompt", True),
    "text_whole": ("plain-text document", False),
    "text_windows": ("plain-text document", True),
}


def huge_case(case: str, megabytes: float, max_len: int) -> dict:
  """One huge record through the student side (Qwen3); run in a fresh process."""
  info = encode.tokenizer_info("qwen3")
  source = "".join(c["messages"][-1]["content"] for c in corpora.stdlib_chats(300))
  size = int(megabytes * 1e6)
  text = (source * (size // len(source) + 1))[:size]
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  what, bounded = HUGE_CASES[case]
  if what == "plain-text document":
    window = encode.TEXT_WINDOW_CHARS if bounded else len(text) + 1
    encode.TEXT_WINDOW_CHARS = window
    tokens = sum(len(side.ids) for _, side in encode.split_text(info, text, max_len))
  else:
    messages = (
        (("user", "Show the code."), ("assistant", text))
        if what == "chat answer"
        else (("user", text), ("assistant", "ok"))
    )
    budget = preprocess.byte_budget(info, max_len) if bounded else 0
    tokens = len(encode.encode_chat(info, messages, max_bytes=budget).ids)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {
      "seconds": seconds,
      "tokens": tokens,
      "peak_mib": peak / 1024,
      "added_mib": (peak - baseline) / 1024,
  }


def huge_rows(megabytes: float, max_len: int) -> list[str]:
  rows = []
  for case, (what, bounded) in HUGE_CASES.items():
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            f"--huge_case={case}",
            f"--huge_mb={megabytes}",
            f"--max_len={max_len}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(done.stdout.strip().splitlines()[-1])
    how = {
        ("plain-text document", True): "windows of 2^18 characters",
        ("plain-text document", False): "whole text",
    }.get((what, bounded), "byte budget" if bounded else "whole text")
    rows.append(
        f"| {what} | {how} | {r['tokens']} | {r['seconds']:.2f} | {r['added_mib']:.0f} | {r['peak_mib']:.0f} |"
    )
    print(rows[-1], flush=True)
  return rows


PACKING_HEADING = "## Packed vs padded rows (`data.packing`)"


def packing_case(items, fmt: str, max_len: int, batch_size: int) -> dict:
  """Rows and the share of non-padding tokens per step, one example per row vs packed.

  Non-padding tokens are the stored examples' tokens (content and its EOS block padding,
  which is trained); a step holds batch_size x max_len tokens, the last step's fill rows
  included.
  """
  options = parse_options(
      dict(format=fmt, train_files=["unused"], max_len=max_len, block_size=32, cache_dir="unused")
  )
  stored = list(preprocess.examples(((0, item) for item in items), options, preprocess.Tally()))
  start = time.perf_counter()
  rows = sum(1 for _ in packing.pack_examples(iter(stored), max_len, 32))
  seconds = time.perf_counter() - start
  tokens = sum(len(feats["input_ids"]) for _, feats in stored)
  out = {"examples": len(stored), "tokens": tokens, "rows": rows, "pack_s": seconds}
  for name, count in (("padded", len(stored)), ("packed", rows)):
    steps = -(-count // batch_size)
    out[f"{name}_steps"] = steps
    out[f"{name}_fraction"] = tokens / (steps * batch_size * max_len)
  return out


def packing_lines(records_count: int, batch_size: int) -> list[str]:
  """The packing section: the smoke run's text chunks and the chat corpus, per max_len."""
  smoke_files = records_lib.expand_files(
      [
          f"pystdlib://{name}/*.py"
          for name in (
              "json",
              "email",
              "asyncio",
              "collections",
              "importlib",
              "logging",
              "concurrent/futures",
          )
      ]
  )
  text = list(records_lib.read_records(smoke_files, "text"))
  chats = [parse_messages(c, f"bench:{i + 1}") for i, c in enumerate(build_corpus(records_count))]
  lines = [
      PACKING_HEADING + "\n",
      f"Command: `python benchmarks/bench_data.py --packing_only --records {records_count} "
      f"--batch_size {batch_size}`. Block 32, batch {batch_size} rows per step. Text: the "
      f"{len(smoke_files)} standard-library files of configs/smoke.py, cut into pieces of at "
      f"most max_len tokens as the smoke run does; chat: the {len(chats)} chat records of the "
      "corpus above (last answer trained). Non-padding = content and its EOS block padding "
      "(trained); a step is batch x max_len tokens, the last step's fill rows included.\n",
      "| corpus | max_len | examples | tokens | steps, padded | steps, packed | non-padding per step, padded | non-padding per step, packed | packing s |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, items, fmt, max_len in (
      ("stdlib text (smoke)", text, "text", 128),
      ("stdlib text", text, "text", 512),
      ("chat", chats, "chat", 512),
      ("chat", chats, "chat", 1024),
  ):
    r = packing_case(items, fmt, max_len, batch_size)
    lines.append(
        f"| {name} | {max_len} | {r['examples']} | {r['tokens']} | {r['padded_steps']} | "
        f"{r['packed_steps']} | {r['padded_fraction']:.1%} | {r['packed_fraction']:.1%} | "
        f"{r['pack_s']:.2f} |"
    )
    print(lines[-1], flush=True)
  return lines + [
      "",
      "The smoke run's pieces are nearly all full rows already (a file is cut into max_len "
      "pieces, only its last is short), so packing gains nothing there; chat SFT records are "
      "mostly shorter than a row, and packing them cuts the steps of an epoch by the ratio "
      "above. Packed rows fall short of 100% where no example in the packer's window of "
      f"{packing.OPEN_ROWS} open rows fits a row's free blocks, and at the end of the pass, "
      "where the rows still open are written as they are.\n",
  ]


def write_packing_section(path: str, section: list[str]) -> None:
  """Replaces the packing section of `path` (or appends it), keeping everything else."""
  text = open(path).read() if os.path.exists(path) else "# Data pipeline benchmark\n"
  if PACKING_HEADING in text:
    before, rest = text.split(PACKING_HEADING, 1)
    after = rest[rest.index("\n## ") + 1 :] if "\n## " in rest else ""
  else:
    before, after = text.rstrip("\n") + "\n\n", ""
  with open(path, "w") as f:
    f.write(before + "\n".join(section) + ("\n" + after if after else "\n"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--records", type=int, default=2000)
  parser.add_argument("--max_len", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--out", default="docs/benchmarks/data.md")
  parser.add_argument("--huge_mb", type=float, default=5.0)
  parser.add_argument("--huge_case", default="", help="internal: run one huge-record case")
  parser.add_argument("--packing_only", action="store_true", help="only the packing section")
  args = parser.parse_args()
  if args.packing_only:
    write_packing_section(args.out, packing_lines(args.records, args.batch_size))
    print(f"wrote the packing section of {args.out}")
    return
  if args.huge_case:
    print(json.dumps(huge_case(args.huge_case, args.huge_mb, args.max_len)))
    return

  chats = build_corpus(args.records)
  records = [parse_messages(c, f"bench:{i + 1}") for i, c in enumerate(chats)]
  for info in (
      encode.tokenizer_info("qwen3"),
      encode.tokenizer_info("qwen3", TEACHER_TEMPLATE),
      encode.tokenizer_info("llama3"),
  ):
    del info  # built once here so that no timing below includes tokenizer construction

  lines = [
      "# Data pipeline benchmark\n",
      f"Command: `python benchmarks/bench_data.py --records {args.records} --max_len {args.max_len}`  ",
      f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}.  ",
      f"Corpus: {len(records)} chat records (164 HumanEval problems + standard-library functions/docstrings), "
      f"max_len = teacher_max_len = {args.max_len}, block 32.\n",
      "## Preprocessing throughput, one process\n",
      "| alignment | examples/s (1 core) | ms/example | encode share | alignment share | mean chunks/pairs per example |",
      "|---|---|---|---|---|---|",
  ]
  for kind in ("none", "positions", "chunks"):
    result = time_kind(records, kind, args.max_len)
    sec = result["seconds"]
    units = f"{np.mean(result['units']):.0f}" if result["units"] else "-"
    lines.append(
        f"| {kind} | {result['kept'] / sec['total']:.0f} | {1000 * sec['total'] / result['records']:.2f} | "
        f"{100 * sec['encode'] / sec['total']:.0f}% | {100 * sec['align'] / sec['total']:.0f}% | {units} |"
    )
    print(lines[-1], flush=True)

  lines += [
      "",
      "## Full prepare (TFDS array_record writing included)\n",
      "| alignment | records | processes | seconds | examples/s |",
      "|---|---|---|---|---|",
  ]
  with tempfile.TemporaryDirectory() as tmp:
    path = corpora.write_jsonl(os.path.join(tmp, "bench.jsonl"), chats)
    # The corpus repeated 5 times: where a pool's start-up cost is won back, if at all.
    big = corpora.write_jsonl(os.path.join(tmp, "bench5.jsonl"), chats * 5)
    plan = [
        ("none", path, len(chats), 1),
        ("none", path, len(chats), 2),
        ("chunks", path, len(chats), 1),
        ("chunks", path, len(chats), 2),
        ("chunks", big, 5 * len(chats), 1),
        ("chunks", big, 5 * len(chats), 2),
    ]
    for number, (kind, source, count, workers) in enumerate(plan):
      seconds = time_prepare(
          source, os.path.join(tmp, f"cache{number}"), kind, workers, args.max_len
      )
      lines.append(f"| {kind} | {count} | {workers} | {seconds:.1f} | {count / seconds:.0f} |")
      print(lines[-1], flush=True)

  lines += [
      "",
      f"## Alignment memory per batch (batch {args.batch_size}, Qwen3 vs Llama-3 chunks, Lt = L)\n",
      "| L | mean chunks | max chunks | chunk ids (int32 [b,L] + [b,Lt] + [b]) | dense bool [b,L,n] + [b,Lt,n], n = batch max | dense, n = L (static) | ratio (static) |",
      "|---|---|---|---|---|---|---|",
  ]
  for length, mean, most, ids_bytes, dense_max, dense_static in memory_rows(
      records, args.batch_size
  ):
    lines.append(
        f"| {length} | {mean:.0f} | {most} | {ids_bytes / 2**10:.0f} KiB | {dense_max / 2**20:.1f} MiB | "
        f"{dense_static / 2**20:.1f} MiB | {dense_static / ids_bytes:.0f}x |"
    )
    print(lines[-1], flush=True)
  lines += [
      "",
      f"## One huge record ({args.huge_mb:g} MB, student side, Qwen3, max_len {args.max_len})\n",
      "Each case in a fresh process; `added` is the peak resident memory above the process's "
      "peak before the record (the tokenizer tables), `peak` the process's peak.\n",
      "| huge | tokenized | tokens | seconds | added MiB | peak MiB |",
      "|---|---|---|---|---|---|",
  ]
  lines += huge_rows(args.huge_mb, args.max_len)
  lines += [
      "",
      "With the byte budget a chat record's rendering is cut to max_len x 128 + 64 KiB bytes "
      "before tokenizing (the kept row is the same); a plain-text document is used whole, "
      "tokenized in windows.",
      "",
      "Shares: `encode` is rendering both chat templates and tokenizing; `alignment` is "
      "`chunk_alignment` / `position_pairs` alone; the rest is truncation and EOS padding. "
      "A pool pays only where its workers get cores of their own: here (forked workers that "
      "share the parent's tokenizers, as when JAX is not loaded) 2 workers on 2 busy cores "
      "are no faster than one process, so `num_workers = 0` uses a pool only from 20,000 records.\n",
  ]
  lines.append(
      f"Load average over the run's last minutes (1/5/15 min): {os.getloadavg()[0]:.1f} / "
      f"{os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f} on {os.cpu_count()} cores: above the core "
      "count other processes shared the CPUs and the absolute rates are lower than on an idle machine.\n"
  )
  lines += packing_lines(args.records, args.batch_size)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
