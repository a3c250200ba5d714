"""Time and compiled memory of the fused objectives per vocabulary tile and row block.

``objective.vocab_tile`` bounds the columns of each ``[rows, tile]`` piece the fused
objectives (``tide_jax.distill.fused``) project at a time, and so the kernel slices and
gradient tiles they hold; ``objective.row_block`` bounds the rows. This script compiles
value + gradient of the forward KL and of the target log-probabilities at Qwen3 widths
(student 1,024, teacher 4,096, vocabulary 151,936) for each setting, then times them
interleaved (median of ``--reps`` calls each, side by side in one process).

Usage:
  python benchmarks/bench_vocab_tile.py [--positions 512] [--tiles 4096,16384]
      [--blocks 64,256] [--reps 3] [--write docs/benchmarks/vocab_tile.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tide_jax.distill import fused, terms  # noqa: E402


def _loss(objective: str, block_rows: int, vocab_tile: int):
  def loss(hs, ws, ht, wt, w, targets):
    student, teacher = fused.Projection(hs, ws), fused.Projection(ht, wt)
    kw = dict(block_rows=block_rows, vocab_tile=vocab_tile)
    if objective == "target log-probs":
      return (w * terms.target_log_probs(student, targets, **kw)[0]).sum()
    return terms.forward_kl(student, teacher, w, temperature=2.0, **kw)[0]

  return loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--positions", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--student-width", type=int, default=1024)
  parser.add_argument("--teacher-width", type=int, default=4096)
  parser.add_argument("--tiles", default="4096,16384", help="vocab_tile values (at most)")
  parser.add_argument("--blocks", default="64,256", help="row_block values")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--write", default="", help="markdown file for the table")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  n, v = args.positions, args.vocab
  args_ = (
      jnp.asarray(rng.normal(size=(n, args.student_width)), jnp.float32),
      jnp.asarray(rng.normal(size=(args.student_width, v)) * 0.2, jnp.float32),
      jnp.asarray(rng.normal(size=(n, args.teacher_width)), jnp.float32),
      jnp.asarray(rng.normal(size=(args.teacher_width, v)) * 0.1, jnp.float32),
      jnp.ones((n,), jnp.float32),
      jnp.asarray(rng.integers(0, v, n), jnp.int32),
  )
  settings = [
      (objective, int(block), int(tile))
      for objective in ("forward KL", "target log-probs")
      for block in args.blocks.split(",")
      for tile in args.tiles.split(",")
  ]
  compiled, temps = {}, {}
  for key in settings:
    fn = jax.jit(jax.value_and_grad(_loss(*key), argnums=(0, 1)))
    compiled[key] = fn.lower(*args_).compile()
    temps[key] = compiled[key].memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled[key](*args_))  # warm up
    print(f"compiled {key}", file=sys.stderr, flush=True)
  times = {key: [] for key in settings}
  for _ in range(args.reps):
    for key in settings:
      start = time.perf_counter()
      jax.block_until_ready(compiled[key](*args_))
      times[key].append(time.perf_counter() - start)

  lines = [
      "| objective | row block | vocab_tile (columns) | compiled temporaries (MiB) | one call (s, "
      "median) | vs the largest tile |",
      "|---|---|---|---|---|---|",
  ]
  largest = max(int(t) for t in args.tiles.split(","))
  for objective, block, tile in settings:
    seconds = statistics.median(times[(objective, block, tile)])
    base = statistics.median(times[(objective, block, largest)])
    columns = fused.tile_count(v, tile)[0]
    lines.append(
        f"| {objective} | {block} | {tile} ({columns}) | "
        f"{temps[(objective, block, tile)] / 2**20:.0f} | {seconds:.2f} | {seconds / base:.2f}x |"
    )
  table = "\n".join(lines)
  summary = (
      f"value + gradient, {n} positions x {v} vocabulary, student width {args.student_width}, "
      f"teacher width {args.teacher_width}, float32, backend {jax.default_backend()} "
      f"({jax.device_count()} device(s)); calls interleaved, median of {args.reps}"
  )
  print(summary)
  print(table)
  if args.write:
    command = "python benchmarks/bench_vocab_tile.py " + " ".join(sys.argv[1:])
    with open(args.write, "w") as f:
      f.write(f"# Vocabulary tile\n\nCommand: `{command}`\n\n{summary}.\n\n{table}\n")


if __name__ == "__main__":
  main()
