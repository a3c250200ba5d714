"""Convert an HF teacher checkpoint into a sharded orbax checkpoint, streaming.

  python -m tide_jax.convert --hf_dir=DIR --out=DIR_OR_GS \\
      [--mesh=data=1,fsdp=-1,tensor=1,expert=1] [--dtype=bfloat16] [--overwrite]
  python -m tide_jax.convert --config=configs/pipeline_a.py [--config.teacher.hf_dir=...]

Any architecture registered in ``tide_jax.teachers.ARCHITECTURES`` (LLaDA2 MoE,
Qwen3/Qwen2) is recognised from ``config.json``. Each tensor goes straight onto its shard of
the mesh (teacher sharding rules), and every finished layer is written and released, so the
full model is never held in memory.

With ``--config`` the teacher section of a training config says what to convert
(``teacher.hf_dir`` into ``teacher.checkpoint``, ``teacher.param_dtype``); a checkpoint that
is already converted is left alone, and an ``hf_dir`` on gs:// is staged to local disk
first. This is the explicit step the launchers run once, on one host, before training
(launch/prepare.sh): run it in ONE process, never on every host of a slice.
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from tide_jax import cli_flags  # noqa: F401  (list fields on the command line)
from tide_jax import teachers
from tide_jax.convert import streaming
from tide_jax.parallel import sharding
from tide_jax.teachers import prepare as prepare_teacher

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config whose teacher section names what to convert."
)
flags.DEFINE_string("hf_dir", None, "HF directory with config.json and safetensors.")
flags.DEFINE_string("out", None, "Output directory (local or gs://) for the orbax checkpoint.")
flags.DEFINE_string("mesh", "fsdp=-1", "Mesh axis sizes, e.g. data=1,fsdp=-1,tensor=1,expert=4.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
flags.DEFINE_string(
    "stage_dir",
    None,
    "Local directory to copy a gs:// HF directory into before converting (default: a "
    "temporary directory, removed afterwards).",
)


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
  streaming.release_freed_memory_eagerly()

  if _CONFIG.value is None and (not FLAGS.hf_dir or not FLAGS.out):
    raise app.UsageError("Pass --config=CONFIG, or both --hf_dir and --out.")

  def say(line: str) -> None:
    print(line, flush=True)

  start = time.perf_counter()
  try:
    mesh = sharding.make_mesh(parse_mesh(FLAGS.mesh))
    if _CONFIG.value is not None:
      outcome = prepare_teacher.prepare_teacher(
          _CONFIG.value, mesh=mesh, stage_root=FLAGS.stage_dir, say=say
      )
      if outcome == "converted":
        say(f"done in {time.perf_counter() - start:.1f} s, peak RSS {_peak_rss_gb():.2f} GB")
      return
    hf_dir, temporary = FLAGS.hf_dir, None
    if not prepare_teacher.is_local(hf_dir):
      stage_root = FLAGS.stage_dir or (temporary := tempfile.mkdtemp(prefix="tide_teacher_"))
      hf_dir = prepare_teacher.stage_hf_dir(hf_dir, stage_root, say)
    say(f"mesh {dict(mesh.shape)}; converting {FLAGS.hf_dir} -> {FLAGS.out} ({FLAGS.dtype})")
    try:
      stats = teachers.convert_teacher(
          hf_dir,
          FLAGS.out,
          mesh=mesh,
          param_dtype=FLAGS.dtype,
          overwrite=FLAGS.overwrite,
          progress=say,
      )
    finally:
      if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)
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
