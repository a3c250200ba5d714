"""Per-device memory and traffic of the training step at the paper's shapes, per target.

  python benchmarks/bench_memory_plan.py --full-depth --teacher-attention blocked
      # writes docs/benchmarks/memory_plan.md

Method. The step is the training path itself: ``tide_jax.train.abstract_step`` builds
and compiles it with the loop's own functions, under ``jax.set_mesh``, on fake CPU devices
arranged as the target's mesh, with abstract (never allocated) state, teacher and batch at
the real widths, vocabularies, lengths and global batch (pipelines A and B of
``configs/pipeline_{a,b}.py``: global batch 64, student 512 tokens, teacher 1024 / 768,
bfloat16 compute, float32 master weights, per-layer recompute of the student).

* Parameters, optimizer moments and teacher weights are exact: the bytes of each device's
  shard of the full-depth abstract state under the logical-axis rules.
* Temporaries are XLA's (``memory_analysis``) for the step compiled once at full depth
  (``--full-depth``: the 28-layer student and the whole teacher), with the CPU compiler's
  memory-oriented schedule (set below unless XLA_FLAGS is given). Without
  ``--full-depth`` they are extrapolated from students of 2 and 4 layers and a teacher of
  2, which does not hold on this compiler (0.6x to 1.9x apart; docs/benchmarks/memory_plan.md).
  The CPU compiler's schedule, buffer assignment and fusion still differ from the TPU and
  GPU compilers': this column is the CPU compiler's figure, not a prediction for the card.
* Collective bytes per device per step come from the optimized HLO, loop bodies times their
  trip counts (``parallel.hlo_counts``), of the same compile (extrapolated without
  ``--full-depth``, the teacher's per-layer gathers from 2 and 3 teacher layers).

For each target the mesh is the recommended one (see docs/scale_out.md) and the number of
micro-batches the smallest that leaves at least 15% of the HBM free.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# The CPU compiler's default schedule favours concurrency over memory; the memory-oriented
# one is the closer stand-in for the accelerators' memory-aware schedulers.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=16 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import pipeline_a, pipeline_b  # noqa: E402
from tide_jax import configs_lib, teachers  # noqa: E402
from tide_jax.parallel import memory, placement, sharding  # noqa: E402
from tide_jax.train import abstract_step, loop, optimizer  # noqa: E402

# Teacher configs as published (docs/method.md, model facts).
LLADA2_MINI = {
    "model_type": "llada2_moe",
    "vocab_size": 157184,
    "hidden_size": 2048,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 5120,
    "moe_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
    "first_k_dense_replace": 1,
    "partial_rotary_factor": 0.5,
    "rope_theta": 600000.0,
    "rms_norm_eps": 1e-6,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "pad_token_id": 156892,
    "eos_token_id": 156892,
    "rope_scaling": None,
}
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
    "max_position_embeddings": 40960,
}
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=3072,
    tie_word_embeddings=True,
)
GIB = 2**30
HEADROOM = 0.85
# target -> (devices, HBM bytes per device, pipeline -> recommended mesh)
TARGETS = {
    "v5e-16": (16, 16 * GIB, {"A": {"fsdp": 2, "expert": 8}, "B": {"fsdp": 16}}),
    "v5p-8": (4, 95 * GIB, {"A": {"fsdp": 1, "expert": 4}, "B": {"fsdp": 4}}),
    "8x H100": (8, 80 * GIB, {"A": {"fsdp": 1, "expert": 8}, "B": {"fsdp": 8}}),
}
MICROBATCHES = (1, 2, 4, 8, 16)


def pipeline_config(
    name: str, sizes: dict, student_layers: int, microbatches: int, teacher_attention: str = ""
):
  c = pipeline_a.get_config(None) if name == "A" else pipeline_b.get_config(None)
  if teacher_attention:
    c.teacher.attention_impl = teacher_attention
  c.model.init_from = ""
  for key, value in QWEN3_06B.items():
    c.model[key] = value
  c.model.num_layers = student_layers
  c.train.microbatches = microbatches
  for axis in sharding.MESH_AXES:
    c.mesh[axis] = sizes.get(axis, 1)
  return c


def teacher_hf(name: str, layers: int | None) -> dict:
  hf = dict(LLADA2_MINI if name == "A" else QWEN3_8B)
  if layers is not None:
    hf["num_hidden_layers"] = layers
  return hf


def compile_at(name, mesh, sizes, student_layers, teacher_layers, microbatches, attention):
  config = pipeline_config(name, sizes, student_layers, microbatches, attention)
  step = abstract_step.compile_abstract_step(config, mesh, teacher_hf(name, teacher_layers))
  return step.memory()["temporaries"], step.counts().collective_bytes


def exact_parts(name: str, mesh, sizes) -> dict[str, int]:
  """Bytes per device of the full-depth student state and teacher (abstract, no compile)."""
  config = pipeline_config(name, sizes, QWEN3_06B["num_layers"], 1)
  model_cfg = configs_lib.student_model_config(config)
  tx, _ = optimizer.make_optimizer(config.optim, 1000)
  _, abstract_state, state_sh = loop.student_state_plan(config, model_cfg, tx, mesh)
  state = placement.abstract_with_shardings(abstract_state, state_sh)
  _, teacher_params = teachers.abstract_teacher(
      config.teacher, teacher_hf(name, None), mesh, block_size=int(config.block_size)
  )
  return {
      "params": memory.tree_bytes_per_device(state.params),
      "optimizer": memory.tree_bytes_per_device(state.opt_state),
      "teacher": memory.tree_bytes_per_device(teacher_params),
  }


def plan_row(
    target: str, name: str, microbatches=MICROBATCHES, teacher_attention="", full_depth=False
) -> dict:
  devices, hbm, meshes = TARGETS[target]
  sizes = meshes[name]
  mesh = sharding.make_mesh(sizes, jax.devices()[:devices])
  parts = exact_parts(name, mesh, sizes)
  fixed = parts["params"] + parts["optimizer"] + parts["teacher"]
  teacher_layers = teacher_hf(name, None)["num_hidden_layers"]
  row = None
  for k in microbatches:
    t0 = time.perf_counter()
    if full_depth:  # one compile of the whole student and teacher
      temporaries, collectives = compile_at(
          name, mesh, sizes, QWEN3_06B["num_layers"], teacher_layers, k, teacher_attention
      )
      student_layer_t = float("nan")
    else:
      low_t, low_c = compile_at(name, mesh, sizes, 2, 2, k, teacher_attention)
      high_t, high_c = compile_at(name, mesh, sizes, 4, 2, k, teacher_attention)
      _, deep_c = compile_at(name, mesh, sizes, 2, 3, k, teacher_attention)
      student_layer_t = max(high_t - low_t, 0) / 2
      temporaries = low_t + (QWEN3_06B["num_layers"] - 2) * student_layer_t
      collectives = (
          low_c
          + (QWEN3_06B["num_layers"] - 2) * max(high_c - low_c, 0) / 2
          + (teacher_layers - 2) * max(deep_c - low_c, 0)
      )
    total = fixed + temporaries
    row = dict(
        target=target,
        pipeline=name,
        mesh=sizes,
        microbatches=k,
        **parts,
        temporaries=temporaries,
        per_layer=student_layer_t,
        total=total,
        hbm=hbm,
        collectives=collectives,
        seconds=time.perf_counter() - t0,
    )
    print(
        f"{target} {name} {sizes} k={k}: total {total / GIB:.2f} GiB of {hbm / GIB:.0f} "
        f"({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    if total <= HEADROOM * hbm:
      break
  return row


def mesh_text(sizes: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in sizes.items())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="docs/benchmarks/memory_plan.md")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--pipelines", default="A,B")
  parser.add_argument(
      "--microbatches",
      default=",".join(map(str, MICROBATCHES)),
      help="counts to try in order; the first that leaves the headroom is kept (else the last)",
  )
  parser.add_argument(
      "--teacher-attention",
      default="",
      help="teacher.attention_impl for every compile; 'blocked' runs a padded teacher's "
      "attention 256 query rows at a time, the program 'splash' falls back to on a TPU",
  )
  parser.add_argument(
      "--full-depth",
      action="store_true",
      help="compile the 28-layer student and the whole teacher once instead of "
      "extrapolating from 2 and 4 student layers",
  )
  args = parser.parse_args()
  counts = [int(k) for k in args.microbatches.split(",")]
  rows = [
      plan_row(t, p, counts, args.teacher_attention, args.full_depth)
      for t in args.targets.split(",")
      for p in args.pipelines.split(",")
  ]
  g = memory.gib
  per_layer = lambda r: "full depth" if args.full_depth else g(r["per_layer"])
  lines = [
      "| target | pipeline | mesh | micro-batches | student params | optimizer (Adam m, v) "
      "| teacher | temporaries (student per layer) | total | HBM | headroom | collectives per step |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['target']} | {r['pipeline']} | {mesh_text(r['mesh'])} | {r['microbatches']} | "
        f"{g(r['params'])} | {g(r['optimizer'])} | {g(r['teacher'])} | "
        f"{g(r['temporaries'])} ({per_layer(r)}) | {g(r['total'])} | {g(r['hbm'])} | "
        f"{100 * (1 - r['total'] / r['hbm']):.0f}% | {g(r['collectives'])} |"
    )
  table = "\n".join(lines)
  print(table)
  command = "python benchmarks/bench_memory_plan.py " + " ".join(sys.argv[1:])
  with open(args.out, "w") as f:
    f.write(
        "# Memory plan per device (paper shapes)\n\n"
        f"Produced by `{command.strip()}` on CPU with fake devices: the training step "
        "itself (`tide_jax.train.abstract_step`, compiled under the mesh), see the method "
        "in the script's docstring. Parameters, optimizer and teacher are exact shard "
        "sizes; temporaries and collectives are the CPU compiler's (not a measurement on "
        "the card), "
        + (
            "compiled at full depth.\n\n"
            if args.full_depth
            else "at 2 and 4 student layers extrapolated to 28.\n\n"
        )
        + "Global batch 64, student 512 tokens, teacher 1024 (A) / 768 (B, fed as "
        "[x0 ; x_t], doubled by CompDemo in tide_shared); student float32 master weights, "
        "bfloat16 compute, per-layer recompute; teacher bfloat16, teacher attention "
        f"{args.teacher_attention or 'as configured'}. Micro-batches: the "
        "smallest count that leaves 15% of the HBM free.\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
  main()
