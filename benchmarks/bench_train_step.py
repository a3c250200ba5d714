"""Train-step throughput on CPU: the smoke student per recipe, and the matmul peak.

Measures, in one process and interleaved (so machine noise hits every row alike):
  * the machine's float32 matmul throughput (a large jitted matmul, best of several runs);
  * the BD3LM student step (forward + backward + AdamW) of the smoke config, and of a wider
    Qwen3-shaped student (hidden 256, 4 layers, 4 / 2 heads of 64, intermediate 768, tied)
    on the same batches: tokens/s and model FLOP utilisation against that peak;
  * every recipe's step time relative to ``bd3lm`` on the same shapes and batches, with a
    random teacher of the smoke teacher's shape, and CompDemo's extra cost
    (``tide_shared`` with ratio 0.5 vs 0).

Usage:
  python benchmarks/bench_train_step.py [--reps 5] [--out docs/benchmarks/train_step.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import smoke  # noqa: E402
from tide_jax import configs_lib  # noqa: E402
from tide_jax.data import pipeline  # noqa: E402
from tide_jax.models import dense  # noqa: E402
from tide_jax.models.config import decoder_config_from_hf  # noqa: E402
from tide_jax.distill import plan as plan_lib, recipes  # noqa: E402
from tide_jax.teachers import Teacher  # noqa: E402
from tide_jax.train import optimizer, step as step_lib  # noqa: E402


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  b = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def student_step_flops(cfg, batch: int, length: int) -> float:
  """Forward+backward FLOPs (x3 of forward) of one BD3LM step: layers see 2L tokens, the
  output projection only L (the x_t half); attention scores counted dense over 2L keys."""
  e, h, k, d, i, v = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.intermediate_size,
      cfg.vocab_size,
  )
  per_token_layer = 2 * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * i)
  attention = 2 * 2 * (2 * length) * h * d  # QK^T and PV per query token
  tokens2 = batch * 2 * length
  forward = cfg.num_layers * tokens2 * (per_token_layer + attention) + batch * length * 2 * e * v
  return 3.0 * forward


def smoke_config(variant: str):
  """The smoke config at the full vocabulary: the table measures the 151,936-row output
  layer, not the restricted one the smoke run trains with (``data.restrict_vocab``)."""
  c = smoke.get_config(variant)
  c.unlock()
  c.data.restrict_vocab = False
  return c


WIDER = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
WIDER["intermediate_size"] = 3 * WIDER["hidden_size"]  # Qwen3-0.6B's ratio (3,072 / 1,024)


def smoke_variant(variant: str, recipe: str, ratio: float | None = None, model=None):
  c = smoke_config(variant)
  c.distill.recipe = recipe
  if ratio is not None:
    c.distill.compdemo.ratio = ratio
  c.model.update(model or {})
  return c


def random_teacher(config):
  """``(DecoderConfig, (graphdef, params))`` of a random teacher of the smoke teacher's shape."""
  t = config.smoke.teacher_model
  teacher_cfg = decoder_config_from_hf(
      dict(
          model_type="qwen3",
          vocab_size=t.vocab_size,
          hidden_size=t.hidden_size,
          num_hidden_layers=t.num_layers,
          num_attention_heads=t.num_heads,
          num_key_value_heads=t.num_kv_heads,
          head_dim=t.head_dim,
          intermediate_size=t.intermediate_size,
          rope_theta=1e6,
          tie_word_embeddings=t.tie_word_embeddings,
      )
  )
  return teacher_cfg, nnx.split(dense.build_decoder(teacher_cfg, seed=1))


def build(config, teacher_cfg, teacher_state, data_cfg_variant_batches):
  student_cfg = configs_lib.student_model_config(config)
  model = dense.build_decoder(student_cfg, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  tx, sched = optimizer.make_optimizer(config.optim, 1000)
  recipe = recipes.validate_distill_config(
      config.distill, student_vocab=student_cfg.vocab_size, teacher_vocab=teacher_cfg.vocab_size
  )
  teacher = Teacher(
      "smoke",
      teacher_cfg,
      teacher_state[0],
      int(config.teacher.mask_token_id),
      "bidirectional",
      int(config.block_size),
  )
  plan = plan_lib.Plan(plan_lib.Objective.from_config(config), recipe, teacher)
  fn = step_lib.make_train_step(graphdef, tx, sched, plan, 1000)
  state = step_lib.create_train_state(params, tx, 0)
  return jax.jit(fn, donate_argnums=(0,)), state, student_cfg


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per rep and recipe")
  parser.add_argument("--out", default="docs/benchmarks/train_step.md")
  parser.add_argument("--cache", default="/tmp/tide_bench_cache")
  args = parser.parse_args()

  peak = matmul_peak_gflops()
  print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({jax.device_count()} CPU device(s))")

  rows = [
      ("bd3lm", "shared", "bd3lm", None, None),
      ("bd3lm, wider student", "shared", "bd3lm", None, WIDER),
      ("kl", "shared", "kl", None, None),
      ("reverse_kl", "shared", "reverse_kl", None, None),
      ("tide_shared (CompDemo 0.5)", "shared", "tide_shared", 0.5, None),
      ("tide_shared, CompDemo off", "shared", "tide_shared", 0.0, None),
      ("calm", "cross", "calm", None, None),
      ("tide_cross", "cross", "tide_cross", None, None),
  ]
  batches = {}
  runners = {}
  for name, variant, recipe, ratio, model in rows:
    config = smoke_variant(variant, recipe, ratio, model)
    config.data.cache_dir = args.cache
    if variant not in batches:
      it = pipeline.make_iterator(
          config.data,
          split="train",
          batch_size=config.train.batch_size,
          seed=0,
          workdir_cache=args.cache,
      )
      batches[variant] = [next(it) for _ in range(args.steps)]
    teacher_cfg, (tg, tp) = random_teacher(config)
    fn, state, student_cfg = build(config, teacher_cfg, (tg, tp), None)
    for b in batches[variant]:  # compile + warm up
      state, m = fn(state, b, tp)
    jax.block_until_ready(state)
    runners[name] = [fn, state, tp, variant]
    print(f"compiled {name}", flush=True)

  times = {name: [] for name, *_ in rows}
  for _ in range(args.reps):
    for name, *_ in rows:
      fn, state, tp, variant = runners[name]
      t0 = time.perf_counter()
      for b in batches[variant]:
        state, m = fn(state, b, tp)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t0) / len(batches[variant]))
      runners[name][1] = state

  for name, seconds in times.items():
    print(f"{name}: {', '.join(f'{x * 1e3:.0f}' for x in seconds)} ms", flush=True)
  c = smoke_config("shared")
  cfg = configs_lib.student_model_config(c)
  wide = configs_lib.student_model_config(smoke_variant("shared", "bd3lm", model=WIDER))
  bsz, length = c.train.batch_size, c.data.max_len
  base = statistics.median(times["bd3lm"])

  def utilisation(name, model_cfg):
    seconds = statistics.median(times[name])
    flops = student_step_flops(model_cfg, bsz, length)
    return (
        f"{seconds * 1e3:.0f} ms median = **{bsz * length / seconds:,.0f} tokens/s**; model "
        f"FLOPs {flops / 1e9:.1f} GFLOP per step -> {flops / seconds / 1e9:.1f} GFLOP/s = "
        f"**{flops / seconds / 1e9 / peak:.0%} of the measured matmul peak**"
    )

  lines = [
      "# Train step on CPU (smoke shapes)",
      "",
      "Command: `python benchmarks/bench_train_step.py "
      f"--reps {args.reps} --steps {args.steps}`",
      "",
      f"Machine: {os.cpu_count()} CPU cores, JAX {jax.__version__}, backend "
      f"{jax.default_backend()}; float32 matmul peak measured in the same run: "
      f"**{peak:.1f} GFLOP/s** (2048^3 matmul, best of 5).",
      "",
      f"Student: smoke config (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab "
      f"{cfg.vocab_size}), batch {bsz} x {length} tokens, `[x_t ; x_0]` of length "
      f"{2 * length}, float32.",
      "",
      f"- BD3LM step: {utilisation('bd3lm', cfg)}.",
      f"- BD3LM step of the wider student (hidden {wide.hidden_size}, {wide.num_layers} "
      f"layers, {wide.num_heads} / {wide.num_kv_heads} heads of {wide.head_dim}, "
      f"intermediate {wide.intermediate_size}, tied; same batches): "
      f"{utilisation('bd3lm, wider student', wide)}.",
      "",
      "| recipe | step time (median of reps) | vs bd3lm |",
      "|---|---|---|",
  ]
  for name, *_ in rows:
    med = statistics.median(times[name])
    lines.append(f"| {name} | {med * 1e3:.0f} ms | {med / base:.2f}x |")
  shared_on = statistics.median(times["tide_shared (CompDemo 0.5)"])
  shared_off = statistics.median(times["tide_shared, CompDemo off"])
  lines += [
      "",
      f"CompDemo's extra cost (one teacher call on the doubled batch vs a single "
      f"pass): {shared_on / shared_off:.2f}x the tide_shared step without it.",
      "",
      "Teacher: random weights of the smoke teacher's shape (hidden "
      f"{c.smoke.teacher_model.hidden_size}, {c.smoke.teacher_model.num_layers} layers; "
      "Qwen3 vocabulary for the shared variant, Llama-3 for the cross variant), "
      "bidirectional input. Rows were timed interleaved, "
      f"{args.reps} reps x {args.steps} steps each, on a shared machine: read the "
      "ratios, not the absolute times.",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
