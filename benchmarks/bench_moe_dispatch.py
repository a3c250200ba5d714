"""Expert-parallel MoE dispatch at LLaDA2.0-mini's layer shapes: the all-gather scheme (old)
vs per-device routing with the all-to-all exchange (new), per device, compile only.

One MoE layer (hidden 2048, 256 experts of width 512, 8 active + 1 shared, bf16 weights and
compute, float32 router, tiled dispatch) at pipeline A's teacher tokens per step (global
batch 64 x teacher length 1024, times 2 for CompDemo's two passes), compiled for fake CPU
devices under the mesh. Per device it reports the compiled temporaries
(``memory_analysis``), collective bytes and matmul FLOPs read from the optimized HLO with
each loop body times its trip count (tests/hlo_counts.py; the exchange loop is counted as
one round, the work at a load within the capacity). These are the CPU compiler's
estimates: another backend fuses and schedules differently.

  python benchmarks/bench_moe_dispatch.py [--batch=64 --length=1024 --passes=2]

Prints the table and writes it to docs/benchmarks/teachers.md.
"""

from __future__ import annotations

import os
import sys

# Fake CPU devices for the meshes; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_teachers import LLADA2_MINI  # noqa: E402
from benchmarks.bench_teachers_report import write_section  # noqa: E402
from tide_jax.parallel.hlo_counts import count_hlo  # noqa: E402
from tide_jax.models import llada2, moe  # noqa: E402
from tide_jax.parallel import sharding  # noqa: E402

MESHES = [{"expert": 4}, {"expert": 8}, {"fsdp": 2, "expert": 4}, {"data": 2, "expert": 4}]
DISPATCH = "tiled"  # the CPU / GPU path; "ragged" on CPU expands into all-expert work


def abstract_layer(mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """LLaDA2.0-mini's MoE block with sharded ShapeDtypeStruct parameters (no memory)."""
  cfg = llada2.llada2_config_from_hf(LLADA2_MINI, param_dtype="bfloat16", dtype="bfloat16")
  block = nnx.eval_shape(
      lambda: moe.MoEBlock(
          cfg.hidden_size,
          cfg.moe_intermediate_size,
          cfg.num_shared_experts,
          cfg.router,
          use_expert_bias=cfg.use_expert_bias,
          param_dtype=jnp.bfloat16,
          rngs=nnx.Rngs(params=0),
          dispatch=DISPATCH,
          mesh=mesh,
      )
  )
  graphdef, state = nnx.split(block)
  shardings = sharding.state_shardings(state, mesh, sharding.TEACHER_RULES)
  state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), state, shardings
  )
  return graphdef, state


def all_gather_layer(graphdef, mesh, axes):
  """The former scheme: routing on the global tokens, then all-gather / psum_scatter."""

  def layer(state, x):
    block = nnx.merge(graphdef, state)
    weights, experts = block.routing(x)
    stacked = (block.gate[...], block.up[...], block.down[...])
    out = moe.expert_parallel_all_gather(DISPATCH, mesh, axes, x, weights, experts, *stacked)
    return out + block.shared(x)

  return layer


def measure(sizes: dict, tokens: int) -> dict[str, dict]:
  devices = math.prod(sizes.values())
  mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
  graphdef, state = abstract_layer(mesh)
  hidden = LLADA2_MINI["hidden_size"]
  x = jax.ShapeDtypeStruct(
      (tokens, hidden), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp", "expert")))
  )
  axes = moe.expert_parallel_axes(
      mesh, tokens, LLADA2_MINI["num_experts"], ("data", "fsdp", "expert")
  )
  variants = {
      "old (all-gather)": all_gather_layer(graphdef, mesh, axes),
      "new (all-to-all)": lambda s, v: nnx.merge(graphdef, s)(v),
  }
  out = {}
  for name, fn in variants.items():
    start = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(state, x).compile()
    counts = count_hlo(compiled.as_text())
    out[name] = dict(
        temporaries=compiled.memory_analysis().temp_size_in_bytes,
        collective_bytes=counts.collective_bytes,
        flops=counts.dot_flops,
        compile_s=time.perf_counter() - start,
    )
  return out


def table(batch: int, length: int, passes: int) -> str:
  tokens = batch * length * passes
  rows = [
      "| mesh | devices | scheme | temporaries / device | collective bytes / device "
      "| matmul TFLOP / device |",
      "|---|---|---|---|---|---|",
  ]
  for sizes in MESHES:
    mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
    for name, m in measure(sizes, tokens).items():
      rows.append(
          f"| {mesh_text} | {math.prod(sizes.values())} | {name} | "
          f"{m['temporaries'] / 2**30:.2f} GiB | {m['collective_bytes'] / 2**30:.2f} GiB | "
          f"{m['flops'] / 1e12:.2f} |"
      )
      print(rows[-1], f"(compiled in {m['compile_s']:.0f} s)", flush=True)
  return (
      f"One LLaDA2.0-mini MoE layer (hidden {LLADA2_MINI['hidden_size']}, "
      f"{LLADA2_MINI['num_experts']} experts of width {LLADA2_MINI['moe_intermediate_size']}, "
      f"{LLADA2_MINI['num_experts_per_tok']} active + 1 shared), bf16, {DISPATCH} dispatch, "
      f"{tokens:,} tokens per step ({batch} x {length} x {passes} passes), per device, "
      "the CPU compiler's estimate (compile only, fake CPU devices). Collective bytes: the "
      "larger of each collective's input and output; the new scheme's exchange counted as "
      "one round (capacity 1.25x an even share; a more skewed load adds rounds). FLOPs: "
      "matmuls, the tile loop at its bound.\n\n" + "\n".join(rows)
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--passes", type=int, default=2)
  args = parser.parse_args()
  body = table(args.batch, args.length, args.passes)
  print(body)
  defaults = (args.batch, args.length, args.passes) == (64, 1024, 2)
  flags = "" if defaults else f" --batch={args.batch} --length={args.length} --passes={args.passes}"
  write_section(
      "Expert-parallel MoE dispatch per device (CPU compiler, LLaDA2.0-mini layer)",
      "python benchmarks/bench_moe_dispatch.py" + flags,
      body,
  )


if __name__ == "__main__":
  main()
