"""The explicit teacher-conversion step: convert the teacher a training config names, once.

Training never converts on its own in a multi-host run (``load_teacher`` refuses a
checkpoint without a manifest), so the launchers run this step on one host before training
(``launch/prepare.sh``, ``python -m tide_jax.convert --config=CONFIG``). It is idempotent:
a checkpoint that already has its manifest is left alone, so running it before every
launch costs one metadata read.

The converter reads safetensors with plain file reads, so an HF directory on ``gs://`` is
first copied to local disk (``stage_hf_dir``), one file at a time in 64 MiB pieces.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import ml_collections
from etils import epath
from jax.sharding import Mesh

from tide_jax.convert import streaming
from tide_jax.teachers import registry as teachers

_COPY_PIECE = 64 << 20  # bytes per read while staging; bounds the copy's memory


def is_local(path: str) -> bool:
  """Whether ``path`` names the local filesystem (no ``scheme://`` prefix)."""
  return "://" not in path


def stage_hf_dir(hf_dir: str, stage_root: str, say: Callable[[str], None] = print) -> str:
  """Copies the files of a remote HF directory (e.g. ``gs://``) under ``stage_root``.

  Args:
    hf_dir: the remote directory (config.json, safetensors, tokenizer files).
    stage_root: a local directory; the copy goes to ``stage_root/<basename of hf_dir>``.
    say: progress lines.

  Returns:
    The local directory. Files already staged with the same size are not copied again.
  """
  source = epath.Path(hf_dir)
  if not source.exists():
    raise FileNotFoundError(
        f"HF model directory {hf_dir} does not exist; set teacher.hf_dir to the "
        "directory that holds config.json and the safetensors files."
    )
  target = os.path.join(stage_root, source.name or "hf")
  os.makedirs(target, exist_ok=True)
  for item in sorted(source.iterdir(), key=lambda p: p.name):
    if item.is_dir():
      continue  # HF directories keep their weights at the top level
    local = os.path.join(target, item.name)
    size = item.stat().length
    if os.path.exists(local) and os.path.getsize(local) == size:
      continue
    say(f"staging {item} ({size / 1e9:.2f} GB) -> {local}")
    with item.open("rb") as reader, open(local + ".part", "wb") as writer:
      shutil.copyfileobj(reader, writer, _COPY_PIECE)
    os.replace(local + ".part", local)  # a killed copy never looks complete
  return target


def prepare_teacher(
    config: ml_collections.ConfigDict,
    *,
    mesh: Mesh | None = None,
    stage_root: str | None = None,
    say: Callable[[str], None] = print,
) -> str:
  """Converts ``config.teacher.hf_dir`` into ``config.teacher.checkpoint`` unless done.

  Args:
    config: a training config (``distill`` and ``teacher`` sections).
    mesh: placement while converting (default: the first local device).
    stage_root: local directory for a remote ``hf_dir`` (default: a temporary directory,
      removed afterwards).
    say: progress lines.

  Returns:
    ``"no teacher"``, ``"already converted"`` or ``"converted"``.
  """
  if "distill" not in config or config.distill.recipe == "bd3lm" or "teacher" not in config:
    say("the recipe needs no teacher; nothing to convert")
    return "no teacher"
  section = config.teacher
  if not section.checkpoint:
    raise ValueError(
        "teacher.checkpoint is empty; set it to the directory (local or gs://) the "
        "converted teacher goes to."
    )
  if (epath.Path(section.checkpoint) / streaming.MANIFEST).exists():
    say(f"teacher already converted: {section.checkpoint}")
    return "already converted"
  if not section.hf_dir:
    raise ValueError(
        f"{section.checkpoint} holds no converted teacher and teacher.hf_dir is empty; "
        "set teacher.hf_dir to the teacher's HF directory."
    )
  if epath.Path(section.checkpoint).exists():
    say(
        f"{section.checkpoint} holds an unfinished conversion (no {streaming.MANIFEST}); redoing it"
    )
  temporary = None
  hf_dir = section.hf_dir
  if not is_local(hf_dir):
    if stage_root is None:
      temporary = stage_root = tempfile.mkdtemp(prefix="tide_teacher_")
    hf_dir = stage_hf_dir(hf_dir, stage_root, say)
  try:
    say(f"converting {section.hf_dir} -> {section.checkpoint} ({section.param_dtype})")
    teachers.convert_teacher(
        hf_dir,
        section.checkpoint,
        mesh=mesh,
        param_dtype=section.param_dtype,
        overwrite=True,
        progress=say,
    )
  finally:
    if temporary is not None:
      shutil.rmtree(temporary, ignore_errors=True)
  return "converted"
