"""Streaming conversion benchmark: throughput and peak resident memory.

Writes a synthetic LLaDA2 checkpoint (random bfloat16 weights under the real tensor names,
~2.1 GB in ~250 MB safetensors shards) and converts it in a child process (so that the
measured peak RSS is the converter's alone), onto an 8-device CPU mesh, to bfloat16 orbax.
The mesh is fsdp=8 so that no tensor is replicated: fake CPU devices live in host memory,
and a replicated tensor would be counted once per device (on TPU/GPU that is device memory,
not host memory). Prints a table and writes it to
docs/benchmarks/teachers.md (section "Conversion").

  python benchmarks/bench_teachers_convert.py [--gb=2.1] [--keep_dir=DIR]

The source files were just written, so they are read from the page cache: the GB/s is the
converter's own cost (transform + placement + orbax write), not disk read speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_teachers_report import write_section  # noqa: E402
from tests import teachers_fixtures as tf  # noqa: E402

CHILD = """
import json, resource, sys, time
from tide_jax.convert import streaming
from tide_jax import teachers
from tide_jax.parallel import sharding
streaming.release_freed_memory_eagerly()   # as the CLI does
mesh = sharding.make_mesh({"fsdp": 8})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
stats = teachers.convert_teacher(sys.argv[1], sys.argv[2], mesh=mesh)
stats["wall"] = time.perf_counter() - start
stats["rss_after_imports"] = before
stats["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(stats))
"""


def bench_config(target_gb: float) -> dict:
  """LLaDA2-shaped config whose bf16 size is about ``target_gb`` (layers of ~110 MB)."""
  base = tf.tiny_llada2_config(
      vocab_size=32768,
      hidden_size=1024,
      num_attention_heads=8,
      num_key_value_heads=2,
      head_dim=128,
      intermediate_size=2816,
      moe_intermediate_size=512,
      num_experts=32,
      n_group=8,
      topk_group=4,
      num_experts_per_tok=4,
  )
  per_layer = 2 * (3 * 32 * 1024 * 512 + 3 * 1024 * 512 + 12 * 128 * 1024 + 1024 * 1024)
  base["num_hidden_layers"] = int(np.ceil((target_gb * 1e9 - 2 * 32768 * 1024 * 2) / per_layer))
  return base


def write_random_checkpoint(out_dir: str, cfg: dict, shard_bytes: float = 250e6) -> int:
  """Writes random bf16 tensors layer by layer into ~shard_bytes shards; returns bytes."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  rng = np.random.default_rng(0)
  shard: dict[str, np.ndarray] = {}
  files, weight_map, total = [], {}, 0

  def flush():
    fname = f"model-{len(files) + 1:05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    files.append(fname)
    weight_map.update({k: fname for k in shard})
    shard.clear()

  size = 0
  for name, (shape, kind) in tf.llada2_tensor_shapes(cfg).items():
    arr = tf.random_tensor(rng, shape, kind, 0.02).astype(ml_dtypes.bfloat16)
    shard[name] = arr
    size += arr.nbytes
    total += arr.nbytes
    if size >= shard_bytes:
      flush()
      size = 0
  if shard:
    flush()
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gb", type=float, default=2.1)
  parser.add_argument("--keep_dir", default="")
  args = parser.parse_args()
  work = args.keep_dir or tempfile.mkdtemp(prefix="bench_convert_")
  try:
    cfg = bench_config(args.gb)
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "orbax")
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    size = write_random_checkpoint(hf_dir, cfg)
    shards = len([f for f in os.listdir(hf_dir) if f.endswith(".safetensors")])
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    done = subprocess.run(
        [sys.executable, "-c", CHILD, hf_dir, out_dir],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
      sys.exit(f"conversion failed:\n{done.stderr}")
    stats = json.loads(done.stdout.strip().splitlines()[-1])
  finally:
    if not args.keep_dir:
      shutil.rmtree(work, ignore_errors=True)
  growth = stats["peak_rss"] - stats["rss_after_imports"]
  rows = [
      (
          "checkpoint (bf16 safetensors)",
          f"{size / 1e9:.2f} GB in {shards} shards, "
          f"{cfg['num_hidden_layers']} layers x {cfg['num_experts']} experts",
      ),
      (
          "converted (bf16 orbax, router f32)",
          f"{stats['param_bytes'] / 1e9:.2f} GB, " f"{stats['groups']} groups",
      ),
      ("mesh", "8 CPU devices: fsdp=8 (every large tensor split, nothing replicated)"),
      ("wall time", f"{stats['wall']:.1f} s"),
      ("throughput", f"{size / 1e9 / stats['wall']:.2f} GB/s"),
      ("RSS after imports", f"{stats['rss_after_imports'] / 1e9:.2f} GB"),
      (
          "peak RSS",
          f"{stats['peak_rss'] / 1e9:.2f} GB "
          f"({100 * stats['peak_rss'] / size:.0f}% of the checkpoint)",
      ),
      (
          "peak RSS growth during conversion",
          f"{growth / 1e9:.2f} GB " f"({100 * growth / size:.0f}% of the checkpoint)",
      ),
  ]
  table = "| quantity | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
  print(table)
  verdict = "below" if stats["peak_rss"] < size / 2 else "NOT below"
  print(f"peak RSS is {verdict} half the checkpoint size")
  write_section(
      "Conversion",
      "python benchmarks/bench_teachers_convert.py",
      table + f"\n\nPeak RSS of the whole converting process is {verdict} half the "
      "checkpoint size. Source files were in the page cache (just written).",
  )


if __name__ == "__main__":
  main()
