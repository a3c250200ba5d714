"""Peak memory of the distillation objectives (value + gradient) at a Qwen3-sized vocabulary.

The objectives take hidden states and output kernels: the student's ``[N, Es]`` hidden
states and ``[Es, V]`` kernel (differentiated) and the teacher's ``[N, Et]`` and
``[Et, V]`` (frozen). The fused formulation (``tide_jax.distill.fused``: a block of rows
at a time, reduced a vocabulary tile at a time, hand-written backward) is compared with the naive one
(project both models to full float32 ``[N, V]`` logits and let autodiff differentiate the
formula), on the same inputs, for forward KL, TIDAL, reverse KL, Jensen-Shannon and the
target log-probabilities behind the cross-entropy and (Reverse) CALM.

Each configuration runs in a fresh subprocess. On CPU the measure is the process's peak
resident memory during the first call (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident memory just before it, when the inputs already
exist and the program is compiled: the memory the objective needs beyond its inputs, its
gradients (``[N, Es]`` and ``[Es, V]``) included. The time column is a second call. On an
accelerator the compiled program's own statistics are used (temporaries plus outputs).

Usage:
  python benchmarks/bench_distill_memory.py [--positions 2048] [--vocab 151936]
      [--student-width 1024] [--teacher-width 4096] [--only "label;label"]
      [--dtypes float32,bfloat16] [--write docs/benchmarks/distill.md]
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tide_jax.distill import fused, terms  # noqa: E402

_TILE = fused.VOCAB_TILE
_CE = "target log-probs (CE, CALM)"
CONFIGS = [
    # (label, objective, formulation, block rows, vocabulary tile (at most), dtype)
    ("naive forward KL", "forward_kl", "naive", 0, 0, "float32"),
    ("fused forward KL, 128 rows", "forward_kl", "fused", 128, _TILE, "float32"),
    ("fused forward KL, 64 rows", "forward_kl", "fused", 64, _TILE, "float32"),
    ("fused forward KL, 64 rows, vocab_tile 16384", "forward_kl", "fused", 64, 16384, "float32"),
    ("naive TIDAL", "tidal", "naive", 0, 0, "float32"),
    ("fused TIDAL, 64 rows", "tidal", "fused", 64, _TILE, "float32"),
    ("naive reverse KL", "reverse_kl", "naive", 0, 0, "float32"),
    ("fused reverse KL, 64 rows", "reverse_kl", "fused", 64, _TILE, "float32"),
    ("naive Jensen-Shannon", "jensen_shannon", "naive", 0, 0, "float32"),
    ("fused Jensen-Shannon, 64 rows", "jensen_shannon", "fused", 64, _TILE, "float32"),
    (f"naive {_CE}", "target_logp", "naive", 0, 0, "float32"),
    (f"fused {_CE}, 64 rows", "target_logp", "fused", 64, _TILE, "float32"),
] + [
    (label, objective, formulation, block, _TILE if block else 0, "bfloat16")
    for label, objective, formulation, block in [
        ("naive forward KL", "forward_kl", "naive", 0),
        ("fused forward KL, 64 rows", "forward_kl", "fused", 64),
        ("naive TIDAL", "tidal", "naive", 0),
        ("fused TIDAL, 64 rows", "tidal", "fused", 64),
        ("naive reverse KL", "reverse_kl", "naive", 0),
        ("fused reverse KL, 64 rows", "reverse_kl", "fused", 64),
        (f"naive {_CE}", "target_logp", "naive", 0),
        (f"fused {_CE}, 64 rows", "target_logp", "fused", 64),
    ]
]
TEMPERATURE = 2.0


def _naive(objective):
  """The baseline: full [N, V] float32 logits of both models, plain autodiff."""

  def loss(hs, ws, ht, wt, w, t, targets):
    zs = jnp.dot(hs, ws, preferred_element_type=jnp.float32)
    if objective == "target_logp":
      full = jax.nn.log_softmax(zs, axis=-1)
      return jnp.sum(w * jnp.take_along_axis(full, targets[:, None], axis=-1)[:, 0])
    zt = jax.lax.stop_gradient(jnp.dot(ht, wt, preferred_element_type=jnp.float32))
    ls = jax.nn.log_softmax(zs / TEMPERATURE, axis=-1)
    lt = jax.nn.log_softmax(zt / TEMPERATURE, axis=-1)
    if objective == "forward_kl":
      per = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    elif objective == "reverse_kl":
      per = jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)
    elif objective == "jensen_shannon":
      lm = jnp.logaddexp(ls, lt) - jnp.log(2.0)
      per = 0.5 * jnp.sum(jnp.exp(lt) * (lt - lm) + jnp.exp(ls) * (ls - lm), axis=-1)
    else:  # tidal, lambda = 0.5 (1 - t), midrange weight
      lam = (0.5 * (1 - t))[:, None]
      lr = jax.lax.stop_gradient(jax.nn.log_softmax(((1 - lam) * zs + lam * zt) / TEMPERATURE, -1))
      per = jnp.sum(jnp.exp(lr) * (lr - ls), axis=-1) * jnp.exp(-((t - 0.5) ** 2) / 0.045)
    return TEMPERATURE**2 * jnp.sum(w * per)

  return loss


def _fused(objective, block_rows, vocab_tile):
  def loss(hs, ws, ht, wt, w, t, targets):
    student, teacher = fused.Projection(hs, ws), fused.Projection(ht, wt)
    kw = dict(temperature=TEMPERATURE, block_rows=block_rows, vocab_tile=vocab_tile)
    if objective == "target_logp":
      logp = terms.target_log_probs(student, targets, block_rows=block_rows, vocab_tile=vocab_tile)
      return (w * logp[0]).sum()
    if objective == "tidal":
      options = terms.TidalOptions(l0=0.5, l1=0.5)  # lambda = 0.5 (1 - t), as the baseline
      return terms.tidal(student, teacher, w, t=t, progress=0.5, options=options, **kw)[0]
    return terms.token_term(objective, student, teacher, w, **kw)[0]

  return loss


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(
    objective,
    formulation,
    block_rows,
    vocab_tile,
    dtype,
    positions,
    vocab,
    student_width,
    teacher_width,
):
  """Runs in the child process; returns a dict of measurements."""
  rng = np.random.default_rng(0)
  # Logits of about +-20, as in a trained model: hidden states of norm sqrt(E), kernels
  # scaled to match.
  dt = jnp.dtype(dtype)  # the inputs' dtype: hidden states and kernels of both models
  hs = jnp.asarray(rng.normal(size=(positions, student_width)), dt)
  ht = jnp.asarray(rng.normal(size=(positions, teacher_width)), dt)

  def kernel(width):
    out = np.empty((width, vocab), dt)
    for start in range(0, width, 128):  # filled in pieces: no float64 [E, V] temporary
      out[start : start + 128] = (
          rng.normal(size=(min(128, width - start), vocab)) * 7 / np.sqrt(width)
      ).astype(dt)
    return jax.device_put(out)

  ws, wt = kernel(student_width), kernel(teacher_width)
  w = jnp.asarray(np.arange(positions) % 4 != 0, jnp.float32)
  t = jnp.linspace(0.05, 0.95, positions, dtype=jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, positions), jnp.int32)
  args = (hs, ws, ht, wt, w, t, targets)
  jax.block_until_ready(args)
  inputs_bytes = sum(a.size * a.dtype.itemsize for a in args)
  if formulation == "naive":
    loss = _naive(objective)
  else:
    loss = _fused(objective, block_rows, vocab_tile)
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(*args).compile()
  stats = compiled.memory_analysis()
  result = {
      "inputs_bytes": inputs_bytes,
      "backend": jax.default_backend(),
      "temp_bytes": stats.temp_size_in_bytes,
      "output_bytes": stats.output_size_in_bytes,
  }
  on_cpu = jax.default_backend() == "cpu"
  if not on_cpu:
    result["peak_extra_bytes"] = stats.temp_size_in_bytes + stats.output_size_in_bytes
  else:
    # The first call is the measured one: after it the allocator keeps its pages, so a
    # second call would not raise the resident size again.
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # reset VmHWM to the current RSS
  value, grads = compiled(*args)
  jax.block_until_ready(grads)
  if on_cpu:
    result["peak_extra_bytes"] = (_status_kib("VmHWM") - before) * 1024
  result["value"] = float(value)
  result["grad_bytes"] = sum(g.size * g.dtype.itemsize for g in grads)
  del value, grads
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  result["seconds"] = time.perf_counter() - start
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--positions", type=int, default=2048)
  parser.add_argument("--vocab", type=int, default=151936)
  parser.add_argument("--student-width", type=int, default=1024, help="Qwen3-0.6B: 1024")
  parser.add_argument("--teacher-width", type=int, default=4096, help="Qwen3-8B: 4096")
  parser.add_argument("--only", default="", help="semicolon-separated labels to run")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="input dtypes to run")
  parser.add_argument("--write", default="", help="markdown file for the table")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    spec = json.loads(args.child)
    print("RESULT " + json.dumps(run_one(**spec)))
    return

  rows = []
  wanted = [
      c
      for c in CONFIGS
      if (not args.only or c[0] in args.only.split(";")) and c[-1] in args.dtypes.split(",")
  ]
  for label, objective, formulation, block, tile, dtype in wanted:
    spec = dict(
        objective=objective,
        formulation=formulation,
        block_rows=block,
        vocab_tile=tile,
        dtype=dtype,
        positions=args.positions,
        vocab=args.vocab,
        student_width=args.student_width,
        teacher_width=args.teacher_width,
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
    result = json.loads(lines[-1][7:])
    result["tile"] = fused.tile_count(args.vocab, tile)[0] if tile else None
    rows.append((label, objective, formulation, dtype, result))
    print(f"done: {label} ({dtype})", file=sys.stderr)

  naive = {(o, d): r for _, o, form, d, r in rows if form == "naive"}
  backend = rows[0][4]["backend"]
  gib = 2.0**30
  header = (
      "| configuration | inputs | vocabulary tile (columns) | peak above inputs (GiB) | vs naive "
      "| compiled temporaries (GiB) | vs naive | gradients (GiB) | one call (s) | value |\n"
      "|---|---|---|---|---|---|---|---|---|---|"
  )
  lines = [header]
  for label, objective, formulation, dtype, r in rows:
    base = naive.get((objective, dtype))
    peak_ratio = r["peak_extra_bytes"] / base["peak_extra_bytes"] if base else float("nan")
    temp_ratio = r["temp_bytes"] / base["temp_bytes"] if base else float("nan")
    lines.append(
        f"| {label} | {dtype} | {r['tile'] or '-'} | {r['peak_extra_bytes'] / gib:.3f} | "
        f"{peak_ratio:.3f} | "
        f"{r['temp_bytes'] / gib:.3f} | {temp_ratio:.3f} | {r['grad_bytes'] / gib:.3f} | "
        f"{r['seconds']:.3g} | {r['value']:.6g} |"
    )
  table = "\n".join(lines)
  summary = (
      f"value + gradient (student hidden states and kernel), {args.positions} positions x "
      f"{args.vocab} vocabulary, student width {args.student_width}, teacher width "
      f"{args.teacher_width}, backend {backend}; peak above inputs measured as "
      + (
          "peak RSS during the call minus RSS before it (inputs allocated, program compiled)"
          if backend == "cpu"
          else "the compiled program's temporaries plus outputs (memory_analysis)"
      )
      + "; compiled temporaries from memory_analysis (the gradients, which both "
      "formulations return, are outputs, not temporaries)"
  )
  print(summary)
  print(table)
  if args.write:
    command = "python benchmarks/bench_distill_memory.py " + " ".join(a for a in sys.argv[1:])
    with open(args.write, "w") as f:
      f.write(f"# Distillation objective memory\n\nCommand: `{command}`\n\n{summary}.\n\n{table}\n")


if __name__ == "__main__":
  main()
