"""Per-device memory plan of the distillation step at the paper's shapes, per mesh.

  python benchmarks/bench_memory_plan.py            # writes docs/benchmarks/memory_plan.md

Method. Parameters, optimizer moments and teacher weights are exact: the bytes of each
device's shard of the abstract (never allocated) state under the logical-axis rules of
``tide_jax.parallel.sharding`` for the full-depth models. Activations are XLA's
temporaries of the compiled train step (``compiled.memory_analysis()``), compiled on fake
CPU devices arranged as the target mesh at the real widths, vocabularies, sequence lengths
and global batch, for a student of 2 and of 4 layers (teacher at reduced depth: it runs
forward only under stop_gradient, so its layers' activations are not kept for the
backward pass); the per-layer increment (half the difference) is extrapolated linearly to 28 layers. The CPU
compiler's buffer assignment and fusion differ from the TPU and GPU compilers', so the
activation column is an estimate of the order of magnitude, not a guarantee; the other
columns are exact. Nothing is executed, so no device memory is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import pipeline_a, pipeline_b  # noqa: E402
from tide_jax import configs_lib  # noqa: E402
from tide_jax.data import features  # noqa: E402
from tide_jax import teachers  # noqa: E402
from tide_jax.parallel import memory, placement, sharding  # noqa: E402
from tide_jax.train import distillation, loop, optimizer, step as step_lib  # noqa: E402

# Teacher configs as published (SPEC section 6).
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
# name -> (devices, HBM bytes per device, mesh per pipeline)
TARGETS = {
    "v5e-16": (16, 16 * 2**30, {"A": {"data": 1, "expert": 16}, "B": {"data": 1, "fsdp": 16}}),
    "v5p-8": (4, 95 * 2**30, {"A": {"data": 1, "expert": 4}, "B": {"data": 1, "fsdp": 4}}),
    "8x H100": (8, 80 * 2**30, {"A": {"data": 1, "expert": 8}, "B": {"data": 1, "fsdp": 8}}),
}


def pipeline_config(name: str):
  c = pipeline_a.get_config(None) if name == "A" else pipeline_b.get_config(None)
  c.model.init_from = ""
  return c


def abstract_teacher(name: str, layers: int | None):
  hf = dict(LLADA2_MINI if name == "A" else QWEN3_8B)
  if layers is not None:
    hf["num_hidden_layers"] = layers
  arch = teachers.architecture_for(hf)
  cfg = arch.config_from_hf(hf, param_dtype="bfloat16", dtype="bfloat16")
  graphdef, params = nnx.split(arch.abstract_model(cfg))
  return cfg, graphdef, params


def abstract_batch(c, mesh, rows: int):
  shapes = features.Shapes(
      int(c.data.max_len),
      int(c.block_size),
      int(c.data.teacher_max_len),
      int(c.block_size),
      c.data.alignment,
      int(c.data.max_len),
  )
  row = features.empty_row(shapes, 0, 0)
  out = {}
  for k, v in row.items():
    shape = (rows,) + np.shape(v)
    out[k] = jax.ShapeDtypeStruct(
        shape,
        np.asarray(v).dtype,
        sharding=sharding.batch_sharding(mesh, sharding.STUDENT_RULES, len(shape), rows),
    )
  return out


def compile_step(name: str, mesh, student_layers: int, teacher_layers: int):
  """Compiled memory statistics of the train step at reduced depth (nothing allocated)."""
  c = pipeline_config(name)
  c.model.num_layers = student_layers
  model_cfg = configs_lib.student_model_config(c)
  tx, schedule = optimizer.make_optimizer(c.optim, 1000)
  graphdef, abstract_state, state_sh = loop.student_state_plan(c, model_cfg, tx, mesh)
  t_cfg, t_graphdef, t_params = abstract_teacher(name, teacher_layers)
  t_sh = sharding.state_shardings(t_params, mesh, sharding.TEACHER_RULES)
  family = teachers.TEACHERS[c.teacher.name]
  plan = distillation.make_distillation(
      c,
      model_cfg,
      teacher_graphdef=t_graphdef,
      teacher_vocab=t_cfg.vocab_size,
      teacher_mask_token_id=family.mask_token_id,
      teacher_input_builder=family.input_builder,
  )
  step_fn = step_lib.make_train_step(graphdef, tx, schedule, c, 1000, plan.extra_loss, plan.mask_fn)
  batch = abstract_batch(c, mesh, int(c.train.batch_size))
  batch_sh = {k: v.sharding for k, v in batch.items()}
  jitted = jax.jit(
      step_fn,
      in_shardings=(state_sh, batch_sh, t_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,),
  )
  compiled = jitted.lower(
      placement.abstract_with_shardings(abstract_state, state_sh),
      batch,
      placement.abstract_with_shardings(t_params, t_sh),
  ).compile()
  return memory.memory_stats(compiled)


def exact_parts(name: str, mesh) -> dict[str, int]:
  c = pipeline_config(name)
  model_cfg = configs_lib.student_model_config(c)
  tx, _ = optimizer.make_optimizer(c.optim, 1000)
  _, abstract_state, state_sh = loop.student_state_plan(c, model_cfg, tx, mesh)
  with_sh = placement.abstract_with_shardings(abstract_state, state_sh)
  _, _, t_params = abstract_teacher(name, None)
  t_sh = sharding.state_shardings(t_params, mesh, sharding.TEACHER_RULES)
  return {
      "params": memory.tree_bytes_per_device(with_sh.params),
      "optimizer": memory.tree_bytes_per_device(with_sh.opt_state),
      "teacher": memory.tree_bytes_per_device(placement.abstract_with_shardings(t_params, t_sh)),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="docs/benchmarks/memory_plan.md")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--teacher_layers", type=int, default=2)
  args = parser.parse_args()
  rows = []
  for target in args.targets.split(","):
    n, hbm, meshes = TARGETS[target]
    for name in ("A", "B"):
      mesh = sharding.make_mesh(meshes[name], jax.devices()[:n])
      t0 = time.perf_counter()
      parts = exact_parts(name, mesh)
      low = compile_step(name, mesh, 2, args.teacher_layers)
      high = compile_step(name, mesh, 4, args.teacher_layers)
      per_layer = max(high["temporaries"] - low["temporaries"], 0) // 2
      acts = low["temporaries"] + 26 * per_layer
      total = parts["params"] + parts["optimizer"] + parts["teacher"] + acts
      rows.append((target, name, dict(meshes[name]), parts, per_layer, acts, total, hbm))
      print(
          f"{target} pipeline {name}: params {memory.gib(parts['params'])}, optimizer "
          f"{memory.gib(parts['optimizer'])}, teacher {memory.gib(parts['teacher'])}, "
          f"activations {memory.gib(acts)} ({memory.gib(per_layer)}/layer), total "
          f"{memory.gib(total)} of {memory.gib(hbm)} ({time.perf_counter() - t0:.0f} s)",
          flush=True,
      )
  write_table(rows, args.out)


def write_table(rows, out: str) -> None:
  lines = [
      "# Memory plan per device (paper shapes)",
      "",
      "Produced by `python benchmarks/bench_memory_plan.py` (CPU, fake devices; see the "
      "method in the script's docstring: parameters, optimizer and teacher are exact "
      "shard sizes; activations are XLA temporaries of the compiled step at 2 and 4 "
      "student layers, extrapolated linearly to 28).",
      "",
      "Global batch 64, student 512 tokens, teacher 1024 (A) / 768 (B, fed as [x0 ; x_t]); "
      "student float32 master weights with bf16 compute and per-layer remat; teacher bf16.",
      "",
      "| target | pipeline | mesh | student params | optimizer (Adam m, v) | teacher | "
      "activations (per layer) | total | HBM |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for target, name, mesh, parts, per_layer, acts, total, hbm in rows:
    mesh_s = " ".join(f"{k}={v}" for k, v in mesh.items())
    lines.append(
        f"| {target} | {name} | {mesh_s} | {memory.gib(parts['params'])} | "
        f"{memory.gib(parts['optimizer'])} | {memory.gib(parts['teacher'])} | "
        f"{memory.gib(acts)} ({memory.gib(per_layer)}) | {memory.gib(total)} | "
        f"{memory.gib(hbm)} |"
    )
  lines += [
      "",
      "Reading:",
      "",
      "- Parameters, optimizer and teacher fit everywhere. In pipeline A the student is "
      "replicated over the expert axis (STUDENT_RULES use fsdp and tensor only): "
      "`--config.mesh.fsdp=2 --config.mesh.expert=8` on v5e-16 halves its 6.7 GiB.",
      "- Activations dominate, and in pipeline B they barely shrink from 16 rows per device "
      "(v5p-8) to 4 (v5e-16): the large `[rows, length, vocab]` logits are not split "
      "over the batch axes everywhere. The residual stream and the `[b, L, V]` logits "
      "carry layout constraints (`tide_jax.parallel.sharding.constrain`), which did not "
      "change this table; the flattened `[rows, vocab]` views inside the chunked loss "
      "and distillation terms are the next place to constrain. For scale: one row's "
      "float32 logits are 297 MiB for the "
      "student (512 x 151,936) and, with CompDemo's doubled pass, 1.2 GiB for the "
      "pipeline-A teacher (2 x 1024 x 157,184); a device holding 4 rows needs about 6 "
      "GiB for them, before gradients.",
      "- The CPU compiler's temporaries overstate what the TPU and GPU compilers (with "
      "their memory-aware scheduling) allocate; treat that column as an upper estimate.",
  ]
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
