"""BD3LM student train step at the paper's shapes on an accelerator: tokens/s, MFU, memory.

The student is Qwen3-0.6B's architecture (from its published config.json values) with
float32 master parameters and bfloat16 computation; one step is the full BD3LM forward
on ``[x_t ; x_0]`` (2 x 512 tokens per sequence), backward and AdamW. The script also
measures a large bf16 matmul in the same process, so MFU is reported both against the
card's nominal dense bf16 peak and against what a matmul reaches here.

Usage:
  python benchmarks/bench_student_accel.py [--batch 8] [--steps 10] [--tiny] [--out FILE]
      [--attention-impl xla|blocked|cudnn|splash] [--remat none|full|...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tide_jax.models import config as mcfg, dense  # noqa: E402
from tide_jax.distill import plan as plan_lib  # noqa: E402
from tide_jax.train import step as step_lib  # noqa: E402

QWEN3_0_6B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def step_flops(cfg, batch: int, length: int) -> float:
  e, h, k, d, i, v = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.intermediate_size,
      cfg.vocab_size,
  )
  per_token = 2 * (e * h * d + 2 * e * k * d + h * d * e + 3 * e * i)
  attention = 2 * 2 * (2 * length) * h * d
  forward = (
      cfg.num_layers * batch * 2 * length * (per_token + attention) + batch * length * 2 * e * v
  )
  return 3.0 * forward


def matmul_tflops(n: int) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(10):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--row_block", type=int, default=1024, help="objective.row_block")
  p.add_argument("--tiny", action="store_true", help="a small config (CPU check of the script)")
  p.add_argument("--out", default="")
  p.add_argument("--attention-impl", default="xla", choices=mcfg.ATTENTION_IMPLS)
  p.add_argument("--remat", default="none", choices=mcfg.REMAT_POLICIES)
  args = p.parse_args()
  hf = dict(QWEN3_0_6B)
  if args.tiny:
    hf.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128, head_dim=16)
  cfg = mcfg.decoder_config_from_hf(hf, param_dtype="float32", dtype="bfloat16")
  cfg = cfg.replace(attention_impl=args.attention_impl, remat=args.remat)
  model = dense.build_decoder(cfg)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-5, weight_decay=0.01))
  objective = plan_lib.Objective(
      "bd3lm", "linear", 1e-3, 151669, block_size=32, row_block=args.row_block
  )
  fn = step_lib.make_train_step(graphdef, tx, lambda s: 5e-5, plan_lib.Plan(objective), 1000)
  state = step_lib.create_train_state(params, tx, 0)
  rng = np.random.default_rng(0)
  batch = {
      "input_ids": jnp.asarray(rng.integers(0, 151643, (args.batch, args.length)), jnp.int32),
      "maskable": jnp.ones((args.batch, args.length), bool),
      "valid": jnp.ones((args.batch, args.length), bool),
  }
  jitted = jax.jit(fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / args.steps
  flops = step_flops(cfg, args.batch, args.length)
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", str(device))
  peak = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in kind), None)
  mm = matmul_tflops(8192 if not args.tiny else 512)
  params_n = dense.count_params(model)
  lines = [
      f"# BD3LM student step on {kind}",
      "",
      f"Command: `python benchmarks/bench_student_accel.py --batch {args.batch} "
      f"--length {args.length} --steps {args.steps}{' --tiny' if args.tiny else ''} "
      f"--attention-impl {args.attention_impl} --remat {args.remat}`",
      "",
      f"Model: Qwen3-0.6B architecture ({params_n / 1e6:.0f}M parameters), float32 parameters, "
      f"bfloat16 compute, batch {args.batch} x {args.length} (`[x_t ; x_0]` = "
      f"{2 * args.length} tokens per sequence), chunked CE (1024 rows), AdamW, attention "
      f"`{args.attention_impl}`, remat `{args.remat}`; JAX {jax.__version__}.",
      "",
      "| quantity | value |",
      "|---|---|",
      f"| step time (mean of {args.steps}) | {dt * 1e3:.1f} ms |",
      f"| tokens/s (x_0 tokens) | {args.batch * args.length / dt:,.0f} |",
      f"| model FLOPs per step | {flops / 1e12:.2f} TFLOP |",
      f"| achieved | {flops / dt / 1e12:.1f} TFLOP/s |",
      f"| bf16 8192^3 matmul in the same process | {mm:.0f} TFLOP/s |",
      f"| MFU vs that matmul | {flops / dt / 1e12 / mm:.1%} |",
  ]
  if peak:
    lines.append(
        f"| MFU vs nominal dense bf16 peak ({peak:.0f} TFLOP/s) | {flops / dt / 1e12 / peak:.1%} |"
    )
  if mem is not None:
    gib = 1024**3
    lines += [
        f"| compiled: arguments | {mem.argument_size_in_bytes / gib:.2f} GiB |",
        f"| compiled: temporaries | {mem.temp_size_in_bytes / gib:.2f} GiB |",
        f"| compiled: outputs | {mem.output_size_in_bytes / gib:.2f} GiB |",
    ]
  lines.append(f"| compile time | {compile_s:.1f} s |")
  lines.append(f"| loss after {args.steps + 1} steps (random tokens) | {float(m['loss']):.3f} |")
  text = "\n".join(lines) + "\n"
  print(text, flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
