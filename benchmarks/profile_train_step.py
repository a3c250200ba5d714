"""Where the CPU train step's time goes: XLA operations ranked by time per step.

Builds the BD3LM student step exactly as ``bench_train_step.py`` does (the smoke config at
the full vocabulary, or its wider student with ``--wider``), runs a few steps under
``jax.profiler`` and sums the trace's per-operation durations. Operations inside loops
appear once per trip (``calls / step``); the fused vocabulary statistics run one trip per
vocabulary tile. Names are XLA's (``ynn_fusion``: a matmul, ``*_fusion``: fused
elementwise work and reductions); the HLO of the step is written next to the table, so
that a name can be looked up (``grep "%name = "``). What the tables show is read in
docs/BENCHMARKS.md ("Where the CPU step's time goes").

Usage:
  python benchmarks/profile_train_step.py [--wider] [--steps 3] [--top 25]
      (writes docs/benchmarks/train_step_profile_{smoke,wider}.md)
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import bench_train_step as bench  # noqa: E402
from tide_jax.data import pipeline  # noqa: E402

# Trace events that are not XLA operations (host-side waits and the runtime's wrappers).
HOST_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "$", "PjitFunction")


def build_step(wider: bool, cache: str):
  config = bench.smoke_variant("shared", "bd3lm", None, bench.WIDER if wider else None)
  config.data.cache_dir = cache
  batches = pipeline.make_iterator(
      config.data, split="train", batch_size=config.train.batch_size, seed=0, workdir_cache=cache
  )
  teacher_cfg, (teacher_graph, teacher_params) = bench.random_teacher(config)
  fn, state, student_cfg = bench.build(config, teacher_cfg, (teacher_graph, teacher_params), None)
  return fn, state, next(batches), teacher_params, student_cfg, config


def operation_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Summed microseconds and call counts per XLA operation name in a profiler trace."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  times, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(HOST_EVENTS):
      times[e["name"]] += e.get("dur", 0)
      calls[e["name"]] += 1
  return times, calls


def describe(hlo: str, name: str) -> str:
  """The result shape and source operation of HLO instruction ``name``."""
  for line in hlo.splitlines():
    line = line.strip()
    if line.startswith(f"%{name} = ") or line.startswith(f"ROOT %{name} = "):
      shape = line.split(" = ", 1)[1].split(" ", 1)[0]
      op = line.split('op_name="', 1)[1].split('"', 1)[0] if 'op_name="' in line else ""
      return f"`{shape}` {op.replace('jit(train_step)/', '')}"
  return ""


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--wider", action="store_true", help="the wider student of the benchmark")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument(
      "--out", default="", help="default: docs/benchmarks/train_step_profile_<student>.md"
  )
  parser.add_argument("--cache", default="/tmp/tide_bench_cache")
  args = parser.parse_args()

  fn, state, batch, teacher_params, cfg, _ = build_step(args.wider, args.cache)
  for _ in range(2):  # compile and warm up
    state, _ = fn(state, batch, teacher_params)
  jax.block_until_ready(state)
  hlo = fn.lower(state, batch, teacher_params).compile().as_text()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      state, _ = fn(state, batch, teacher_params)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    times, calls = operation_times(trace_dir)

  total = sum(times.values()) / args.steps / 1e3
  which = "wider" if args.wider else "smoke"
  lines = [
      f"## {which} student (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
      f"{cfg.vocab_size})",
      "",
      f"Command: `python benchmarks/profile_train_step.py{' --wider' if args.wider else ''} "
      f"--steps {args.steps}`. Sum of XLA operation times: {total:.0f} ms per step (the two "
      "cores' work overlaps, so this is close to, not equal to, the step time).",
      "",
      "| operation | ms / step | share | calls / step | result, source |",
      "|---|---|---|---|---|",
  ]
  for name, micros in times.most_common(args.top):
    ms = micros / args.steps / 1e3
    lines.append(
        f"| {name} | {ms:.1f} | {ms / total:.0%} | {calls[name] // args.steps} | "
        f"{describe(hlo, name)} |"
    )
  text = "\n".join(lines) + "\n"
  print(text)
  hlo_path = os.path.join(tempfile.gettempdir(), f"tide_train_step_{which}.hlo.txt")
  with open(hlo_path, "w") as f:
    f.write(hlo)
  print(f"HLO of the step: {hlo_path}")
  out = args.out or f"docs/benchmarks/train_step_profile_{which}.md"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write("# Profile of the CPU train step\n\n" + text)


if __name__ == "__main__":
  main()
