"""Peak memory of the distillation objective (value + gradient) at a Qwen3-sized vocabulary.

Each configuration runs in a fresh subprocess. On CPU the measure is the process's peak
resident memory during the first call (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident memory just before it, when the inputs already
exist and the program is compiled: the memory the objective needs beyond its inputs, its
gradient included. The time column is a second call.
On an accelerator the compiled program's own statistics are used instead (temporaries
plus outputs, from ``memory_analysis()``).

The naive formulation, kept here only as the baseline, materialises full-vocabulary
float32 log-softmax arrays of both models.

Usage:
  python benchmarks/bench_distill_memory.py [--positions 2048] [--vocab 151936]
      [--write docs/benchmarks/distill.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = [
    # (label, objective, formulation, chunk_size)
    ("naive forward KL", "forward_kl", "naive", 0),
    ("forward KL, chunk 128", "forward_kl", "chunked", 128),
    ("forward KL, chunk 256", "forward_kl", "chunked", 256),
    ("naive TIDAL", "tidal", "naive", 0),
    ("TIDAL, chunk 128", "tidal", "chunked", 128),
    ("naive reverse KL", "reverse_kl", "naive", 0),
    ("reverse KL, chunk 128", "reverse_kl", "chunked", 128),
    ("naive chunk log-probs (CALM)", "target_logp", "naive", 0),
    ("chunk log-probs (CALM), chunk 128", "target_logp", "chunked", 128),
]
TEMPERATURE = 2.0


def _naive(objective):
  """The baseline: full [N, V] float32 log-softmax of both models, plain autodiff."""
  import jax
  import jax.numpy as jnp

  def loss(zs, zt, w, t, targets):
    ls = jax.nn.log_softmax(zs.astype(jnp.float32) / TEMPERATURE, axis=-1)
    if objective == "target_logp":
      full = jax.nn.log_softmax(zs.astype(jnp.float32), axis=-1)
      return jnp.sum(w * jnp.take_along_axis(full, targets[:, None], axis=-1)[:, 0])
    lt = jax.nn.log_softmax(zt.astype(jnp.float32) / TEMPERATURE, axis=-1)
    if objective == "forward_kl":
      per = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    elif objective == "reverse_kl":
      per = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
    else:  # tidal, lambda = 0.5 (1 - t), midrange weight
      lam = (0.5 * (1 - t))[:, None]
      lr = jax.lax.stop_gradient(
          jax.nn.log_softmax(
              ((1 - lam) * zs.astype(jnp.float32) + lam * zt.astype(jnp.float32)) / TEMPERATURE,
              axis=-1,
          )
      )
      per = jnp.sum(jnp.exp(lr) * (lr - ls), axis=-1) * jnp.exp(-((t - 0.5) ** 2) / 0.045)
    return TEMPERATURE**2 * jnp.sum(w * per)

  return loss


def _chunked(objective, chunk_size):
  from tide_jax.distill import terms

  def loss(zs, zt, w, t, targets):
    if objective == "target_logp":
      return (w * terms.target_log_probs(zs, targets, chunk_size=chunk_size)).sum()
    if objective == "tidal":
      return terms.tidal(
          zs, zt, w, t=t, progress=0.5, temperature=TEMPERATURE, chunk_size=chunk_size
      )[0]
    fn = terms.forward_kl if objective == "forward_kl" else terms.reverse_kl
    return fn(zs, zt, w, temperature=TEMPERATURE, chunk_size=chunk_size)[0]

  return loss


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(objective, formulation, chunk_size, positions, vocab, force_bits=""):
  """Runs in the child process; returns a dict of measurements."""
  import jax
  import jax.numpy as jnp

  if force_bits:  # compare the uint16 carry with native 16-bit slicing on one backend
    from tide_jax.distill import rows

    rows.carry_as_bits = lambda: force_bits == "on"

  import numpy as np

  rng = np.random.default_rng(0)

  def make_logits():
    # Filled block by block so that no float32 [N, V] temporary is ever resident.
    out = np.empty((positions, vocab), jnp.bfloat16)
    for start in range(0, positions, 128):
      rows = min(128, positions - start)
      out[start : start + rows] = rng.uniform(-20, 20, (rows, vocab)).astype(jnp.bfloat16)
    device = jax.device_put(out)
    del out
    return device

  zs, zt = make_logits(), make_logits()
  w = jnp.asarray(np.arange(positions) % 4 != 0, jnp.float32)
  t = jnp.linspace(0.05, 0.95, positions, dtype=jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, positions), jnp.int32)
  args = (zs, zt, w, t, targets)
  jax.block_until_ready(args)
  inputs_bytes = sum(a.size * a.dtype.itemsize for a in args)
  loss = _naive(objective) if formulation == "naive" else _chunked(objective, chunk_size)
  step = jax.jit(jax.value_and_grad(loss))
  compiled = step.lower(*args).compile()
  result = {"inputs_bytes": inputs_bytes, "backend": jax.default_backend()}
  if jax.default_backend() != "cpu":
    stats = compiled.memory_analysis()
    result["peak_extra_bytes"] = stats.temp_size_in_bytes + stats.output_size_in_bytes
    result["temp_bytes"] = stats.temp_size_in_bytes
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    # The first call is the measured one: after it the allocator keeps its pages, so a
    # second call would not raise the resident size again.
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # reset VmHWM to the current RSS
  value, grad = compiled(*args)
  jax.block_until_ready(grad)
  if on_cpu:
    result["peak_extra_bytes"] = (_status_kib("VmHWM") - before) * 1024
  result["value"] = float(value)
  del value, grad
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  result["seconds"] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--positions", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--only", default="", help="semicolon-separated labels to run")
  parser.add_argument("--write", default="", help="markdown file for the table")
  parser.add_argument(
      "--force-bits",
      default="",
      choices=["", "on", "off"],
      help="override rows.carry_as_bits (default: backend's choice)",
  )
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    spec = json.loads(args.child)
    print("RESULT " + json.dumps(run_one(**spec)))
    return

  rows = []
  wanted = [c for c in CONFIGS if not args.only or c[0] in args.only.split(";")]
  for label, objective, formulation, chunk in wanted:
    spec = dict(
        objective=objective,
        formulation=formulation,
        chunk_size=chunk,
        positions=args.positions,
        vocab=args.vocab,
        force_bits=args.force_bits,
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    rows.append((label, objective, formulation, json.loads(lines[-1][7:])))
    print(f"done: {label}", file=sys.stderr)

  naive = {obj: r["peak_extra_bytes"] for _, obj, form, r in rows if form == "naive"}
  if args.force_bits:
    rows = [
        (f"{label} (uint16 carry {args.force_bits})" if form != "naive" else label, obj, form, r)
        for label, obj, form, r in rows
    ]
  backend = rows[0][3]["backend"]
  gib = 2.0**30
  header = (
      "| configuration | peak above inputs (GiB) | vs naive | one call (s) | value |\n"
      "|---|---|---|---|---|"
  )
  lines = [header]
  for label, objective, formulation, r in rows:
    ratio = r["peak_extra_bytes"] / naive[objective] if objective in naive else float("nan")
    lines.append(
        f"| {label} | {r['peak_extra_bytes'] / gib:.3f} | {ratio:.2f} | "
        f"{r['seconds']:.3g} | {r['value']:.6g} |"
    )
  table = "\n".join(lines)
  inputs_gib = rows[0][3]["inputs_bytes"] / gib
  summary = (
      f"value + gradient, {args.positions} positions x {args.vocab} vocabulary, "
      f"bfloat16 logits (inputs {inputs_gib:.2f} GiB), backend {backend}; "
      "the bfloat16 gradient alone is "
      f"{args.positions * args.vocab * 2 / gib:.3f} GiB; measured as "
      + (
          "peak RSS during the call minus RSS before it (inputs allocated, program " "compiled)"
          if backend == "cpu"
          else "the compiled program's temporaries plus outputs (memory_analysis)"
      )
  )
  print(summary)
  print(table)
  if args.write:
    command = "python benchmarks/bench_distill_memory.py " + " ".join(a for a in sys.argv[1:])
    with open(args.write, "w") as f:
      f.write(
          f"# Distillation objective memory\n\nCommand: `{command}`\n\n{summary}.\n\n" f"{table}\n"
      )


if __name__ == "__main__":
  main()
