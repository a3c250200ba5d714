"""Output directories that are written whole or not at all, and never clobber foreign files.

Writers of model directories (the HF export, ``save_dense_as_hf``, teacher conversion)
assemble their output in a temporary sibling of the target and rename it into place at the
end, so a failure leaves no half-written directory. An existing, non-empty target is refused
unless the caller passes ``overwrite``; even then it is replaced only when everything in it
matches what such a writer produces, so an export pointed at a training workdir can never
delete checkpoints or metrics. Directories and files come out with the permissions the
process umask gives (``tempfile.mkdtemp`` alone would leave them 0700).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from typing import Sequence

# Everything an HF model directory written by this package may hold: weights, configs,
# tokenizer files (``save_pretrained`` of a fast tokenizer) and the BD3LM sampler settings.
HF_DIR_PATTERNS = (
    "config.json",
    "generation_config.json",
    "bd3lm.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


def current_umask() -> int:
  """The process umask (read by setting and restoring it: the only portable way)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(root: str) -> None:
  """Gives ``root`` and everything under it the permissions a plain ``mkdir``/``open`` would."""
  mask = current_umask()
  os.chmod(root, 0o777 & ~mask)
  for parent, dirs, files in os.walk(root):
    for name in dirs:
      os.chmod(os.path.join(parent, name), 0o777 & ~mask)
    for name in files:
      os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def foreign_entries(out_dir: str, patterns: Sequence[str]) -> list[str]:
  """Entries of ``out_dir`` that no pattern matches (directories always count as foreign)."""
  return sorted(
      name
      for name in os.listdir(out_dir)
      if os.path.isdir(os.path.join(out_dir, name))
      or not any(fnmatch.fnmatchcase(name, p) for p in patterns)
  )


def check_target(
    out_dir: str,
    *,
    overwrite: bool,
    patterns: Sequence[str] = HF_DIR_PATTERNS,
    what: str = "export",
    flag: str = "--overwrite",
) -> None:
  """Refuses a target that is a file, or a non-empty directory without ``overwrite``.

  With ``overwrite`` a non-empty directory is accepted only when every entry matches
  ``patterns``, i.e. it holds a previous output of the same kind and nothing else.

  Raises:
    ValueError: with one sentence naming the directory and the way out.
  """
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise ValueError(f"The {what} target {out_dir} is a file; choose a directory path.")
  if not os.listdir(out_dir):
    return
  if not overwrite:
    raise ValueError(
        f"The {what} directory {out_dir} is not empty; choose a new directory or pass "
        f"{flag} to replace a previous {what} there."
    )
  foreign = foreign_entries(out_dir, patterns)
  if foreign:
    shown = ", ".join(foreign[:8]) + (f" (and {len(foreign) - 8} more)" if len(foreign) > 8 else "")
    raise ValueError(
        f"The {what} directory {out_dir} holds files the {what} did not write ({shown}); "
        f"{flag} only replaces a previous {what}, so choose another directory."
    )


def make_staging(out_dir: str) -> str:
  """A new temporary directory next to ``out_dir`` (same file system, so renames are atomic)."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)


def publish(staging: str, out_dir: str) -> None:
  """Moves a finished ``staging`` directory to ``out_dir``, replacing what was checked there.

  The caller has run :func:`check_target`: ``out_dir`` is absent, empty, or a previous
  output of the same kind. The old directory is renamed aside first and deleted only after
  the new one is in place.
  """
  apply_umask(staging)
  out_dir = os.path.abspath(out_dir)
  if not os.path.lexists(out_dir):
    os.replace(staging, out_dir)
    return
  if not os.listdir(out_dir):
    os.rmdir(out_dir)
    os.replace(staging, out_dir)
    return
  aside = tempfile.mkdtemp(
      prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir)
  )
  os.rmdir(aside)  # only the unique name is needed
  os.replace(out_dir, aside)
  os.replace(staging, out_dir)
  shutil.rmtree(aside)
