"""Teacher benchmarks: MoE dispatches (ragged_dot, tiled, dense all-experts) forward time, and
bytes per device of the real LLaDA2.0-mini (and WeDLM / Qwen3-8B) layouts on v5e-16 and
8x H100 meshes, computed from shapes with ``jax.eval_shape`` (no weights are allocated).

  python benchmarks/bench_teachers.py [--repeats=5] [--only=dispatch|memory]

Prints both tables and writes them to docs/benchmarks/teachers.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_teachers_report import write_section  # noqa: E402
from tests.teachers_fixtures import tiny_llada2_config  # noqa: E402
from tide_jax.models import config as mcfg  # noqa: E402
from tide_jax.models import dense, llada2  # noqa: E402
from tide_jax.parallel import sharding  # noqa: E402

# LLaDA2.0-mini's config.json values as listed in docs/method.md §6.
LLADA2_MINI = tiny_llada2_config(
    vocab_size=157184,
    hidden_size=2048,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=5120,
    moe_intermediate_size=512,
    num_experts=256,
    num_experts_per_tok=8,
    num_shared_experts=1,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    partial_rotary_factor=0.5,
    rope_theta=600000.0,
    pad_token_id=156892,
    eos_token_id=156892,
)
QWEN3_8B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 12288,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
MESHES = [
    ("v5e-16 (16 GiB HBM)", {"expert": 16}),
    ("v5e-16 (16 GiB HBM)", {"fsdp": 4, "expert": 4}),
    ("v5e-16 (16 GiB HBM)", {"tensor": 4, "expert": 4}),
    ("v5e-16 (16 GiB HBM)", {"fsdp": 16}),
    ("8x H100 (80 GB)", {"expert": 8}),
    ("8x H100 (80 GB)", {"tensor": 2, "expert": 4}),
    ("8x H100 (80 GB)", {"fsdp": 8}),
]


def bytes_per_device(abstract_model: nnx.Module, mesh_sizes: dict) -> tuple[int, int]:
  """(total parameter bytes, bytes held by one device) under TEACHER_RULES."""
  shape = sharding.resolve_mesh_shape(mesh_sizes, math.prod(mesh_sizes.values()))
  mesh = jax.sharding.AbstractMesh(tuple(shape[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  total = per_device = 0
  for _, var in nnx.to_flat_state(nnx.state(abstract_model)):
    value = var.get_value()
    nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
    spec = sharding.logical_to_spec(
        var.get_metadata().get("logical_axes"), sharding.TEACHER_RULES, mesh, value.shape
    )
    split = math.prod(
        mesh.shape[a]
        for entry in spec
        if entry
        for a in ((entry,) if isinstance(entry, str) else entry)
    )
    total += nbytes
    per_device += nbytes // split
  return total, per_device


def memory_table() -> str:
  models = [
      (
          "LLaDA2.0-mini",
          llada2.abstract_llada2(llada2.llada2_config_from_hf(LLADA2_MINI, param_dtype="bfloat16")),
      ),
      (
          "WeDLM-8B (Qwen3-8B)",
          dense.abstract_decoder(mcfg.decoder_config_from_hf(QWEN3_8B, param_dtype="bfloat16")),
      ),
  ]
  rows = [
      "| model | params | machine | mesh | bf16 bytes / device | total |",
      "|---|---|---|---|---|---|",
  ]
  for name, model in models:
    params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model)))
    for machine, mesh in MESHES:
      total, per = bytes_per_device(model, mesh)
      mesh_text = ",".join(f"{k}={v}" for k, v in mesh.items())
      rows.append(
          f"| {name} | {params / 1e9:.2f} B | {machine} | {mesh_text} | "
          f"{per / 2**30:.2f} GiB | {total / 2**30:.2f} GiB |"
      )
  return "\n".join(rows)


def time_forward(model: nnx.Module, ids, positions, mask, repeats: int):
  """(median seconds of a jitted forward, its logits)."""
  graphdef, params = nnx.split(model)
  fn = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  logits = fn(params, ids, positions, mask).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(params, ids, positions, mask).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times), logits


# "small": the CPU config; "mini": LLaDA2.0-mini's layer shapes (3 layers, 1 dense + 2 MoE).
DISPATCH_CONFIGS = {
    "small": (
        dict(
            vocab_size=4096,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_experts=64,
            num_experts_per_tok=4,
            n_group=8,
            topk_group=4,
        ),
        2,
        256,
    ),
    "mini": (dict(LLADA2_MINI, num_hidden_layers=3), 4, 1024),
}


def dispatch_table(repeats: int, size: str = "small", dtype: str = "float32") -> str:
  overrides, b, length = DISPATCH_CONFIGS[size]
  hf = tiny_llada2_config(**overrides)
  cfg = llada2.llada2_config_from_hf(hf, param_dtype=dtype, dtype=dtype)
  model = llada2.LLaDA2Model(cfg, rngs=nnx.Rngs(params=0))
  ids = jax.random.randint(jax.random.PRNGKey(0), (b, length), 0, hf["vocab_size"])
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = jnp.ones((length, length), bool)
  times, logits = {}, {}
  for dispatch in ("dense", "ragged", "tiled"):
    # Same parameters, another dispatch (a static attribute of the graph definition).
    variant = nnx.merge(
        nnx.graphdef(llada2.abstract_llada2(cfg.replace(moe_dispatch=dispatch))), nnx.state(model)
    )
    times[dispatch], logits[dispatch] = time_forward(variant, ids, positions, mask, repeats)
  rows = "\n".join(
      f"| {name} | {1e3 * times[name]:.1f} | {times['dense'] / times[name]:.2f}x | "
      f"{float(jnp.max(jnp.abs(logits[name] - logits['dense']))):.1e} |"
      for name in ("ragged", "tiled", "dense")
  )
  return (
      f"Config: hidden {cfg.hidden_size}, {cfg.num_layers} layers (1 dense + "
      f"{cfg.num_layers - 1} MoE), {cfg.num_experts} experts of width "
      f"{cfg.moe_intermediate_size}, {cfg.num_experts_per_tok} active + 1 shared, "
      f"{b}x{length} tokens, {dtype}, jitted, median of {repeats}, on "
      f"{jax.devices()[0].device_kind}.\n\n"
      "| MoE dispatch | forward (ms) | speed vs dense all-experts | max-abs logit diff vs dense |\n"
      "|---|---|---|---|\n" + rows
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--size", choices=sorted(DISPATCH_CONFIGS), default="small")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--only", choices=["dispatch", "memory"], default=None)
  args = parser.parse_args()
  command = "python benchmarks/bench_teachers.py"
  if args.only != "memory":
    dispatch = dispatch_table(args.repeats, args.size, args.dtype)
    print(dispatch)
    flags = "" if args.size == "small" else f" --size={args.size} --dtype={args.dtype}"
    write_section(
        f"MoE dispatch vs dense reference ({jax.default_backend()}, {args.size})",
        command + flags,
        dispatch,
    )
  if args.only != "dispatch":
    memory = memory_table()
    print(memory)
    write_section(
        "Parameter bytes per device (eval_shape, no weights)",
        command + " --only=memory",
        memory + "\n\nTEACHER_RULES: vocab/heads/mlp/expert_mlp -> tensor, embed -> "
        "fsdp x expert (the expert axis only where the tensor's expert dimension has not "
        "taken it), expert -> expert; an axis that does not divide a dimension leaves it "
        "replicated. The router and expert bias stay float32.",
    )


if __name__ == "__main__":
  main()
