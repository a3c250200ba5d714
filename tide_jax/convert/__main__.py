"""Convert an HF teacher checkpoint into a sharded orbax checkpoint, streaming.

  python -m tide_jax.convert --hf_dir=DIR --out=DIR_OR_GS \\
      [--mesh=data=1,fsdp=-1,tensor=1,expert=1] [--dtype=bfloat16] [--overwrite]

Any architecture registered in ``tide_jax.teachers.ARCHITECTURES`` (LLaDA2 MoE,
Qwen3/Qwen2) is recognised from ``config.json``. Each tensor goes straight onto its shard of
the mesh (teacher sharding rules), and every finished layer is written and released, so the
full model is never held in memory. On a multi-host TPU slice, run the same command on every
host (after ``jax.distributed.initialize`` is done by the launcher's environment).
"""

from __future__ import annotations

import resource
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Local HF directory with config.json and safetensors.")
flags.DEFINE_string("out", None, "Output directory (local or gs://) for the orbax checkpoint.")
flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axis sizes, e.g. data=1,fsdp=-1,tensor=1,expert=4.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def parse_mesh(text: str) -> dict[str, int]:
  """``"data=1,fsdp=-1"`` -> ``{"data": 1, "fsdp": -1}`` with a clear error on bad input."""
  sizes = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    try:
      if not sep:
        raise ValueError
      sizes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(
          f"--mesh entry {item!r} is not AXIS=SIZE; write for example "
          "--mesh=data=1,fsdp=-1,tensor=1,expert=4."
      ) from None
  return sizes


def _peak_rss_gb() -> float:
  # ru_maxrss is in kilobytes on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(argv):
  del argv
  from tide_jax.convert import streaming  # after flag parsing: imports jax
  from tide_jax import teachers
  from tide_jax.parallel import sharding

  streaming.release_freed_memory_eagerly()

  if not FLAGS.hf_dir or not FLAGS.out:
    raise app.UsageError("--hf_dir and --out are required.")
  try:
    mesh = sharding.make_mesh(parse_mesh(FLAGS.mesh))
    print(
        f"mesh {dict(mesh.shape)}; converting {FLAGS.hf_dir} -> {FLAGS.out} " f"({FLAGS.dtype})",
        flush=True,
    )
    start = time.perf_counter()
    stats = teachers.convert_teacher(
        FLAGS.hf_dir,
        FLAGS.out,
        mesh=mesh,
        param_dtype=FLAGS.dtype,
        overwrite=FLAGS.overwrite,
        progress=lambda line: print(line, flush=True),
    )
  except (ValueError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
  seconds = time.perf_counter() - start
  print(
      f"done: {stats['tensors']} tensors, {stats['bytes_read'] / 1e9:.3f} GB read in "
      f"{seconds:.1f} s ({stats['bytes_read'] / 1e9 / seconds:.2f} GB/s), "
      f"{stats['groups']} parameter groups, {stats['param_bytes'] / 1e9:.3f} GB stored, "
      f"peak RSS {_peak_rss_gb():.2f} GB",
      flush=True,
  )


if __name__ == "__main__":
  app.run(main)
