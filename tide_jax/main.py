"""Entrypoint: ``python -m tide_jax.main --config=configs/<name>.py[:arg] --workdir=DIR``.

Modes: ``train`` (default; resumes from the latest checkpoint in the workdir), ``eval``,
``sample`` and ``export`` (see ``tide_jax.modes``).
Config fields are overridden with ``--config.<field>=value``. All logic lives in
importable functions (``tide_jax.train.loop.train_and_evaluate``) so tests and notebooks
call the same code.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import re
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from tide_jax import cli_flags  # noqa: F401  (list fields on the command line)
from tide_jax import modes
from tide_jax.parallel import distributed, preemption
from tide_jax.train import loop, replicate, smoke_distill

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/smoke.py or configs/smoke.py:arg.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory (local or gs://) for checkpoints, " "metrics and the resolved config.",
)
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "sample", "export"],
    "train (resumes from the workdir), eval (bits per byte, optional HumanEval), sample "
    "(generate for --prompt or --chat), export (HF directory for transformers).",
)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompt for --mode=sample (repeatable).")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive chat in --mode=sample.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Output of --mode=export (default <workdir>/hf_export)."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "--mode=export: replace a previous export in --export_dir (a directory holding anything "
    "else is always refused).",
)


class UserError(Exception):
  """An error caused by the command line or config, reported as one sentence."""


# config.runner -> the function that runs a multi-stage experiment (default: one training run).
RUNNERS = {"smoke_distill": smoke_distill.run, "replicate": replicate.run}


def run(config, workdir: str, mode: str):
  if mode == "train":
    runner = config.get("runner", "")
    if runner in RUNNERS:
      return RUNNERS[runner](config, workdir)
    if runner:
      raise UserError(
          f"Unknown config.runner {runner!r}; use one of {', '.join(RUNNERS)} or leave it unset."
      )
    return loop.train_and_evaluate(config, workdir)
  if mode == "eval":
    return modes.run_eval(config, workdir)
  if mode == "sample":
    return modes.run_sample(config, workdir, _PROMPTS.value, _CHAT.value)
  if mode == "export":
    return modes.run_export(config, workdir, _EXPORT_DIR.value, _OVERWRITE.value)
  raise UserError(f"Unknown mode {mode!r}.")


def _field_paths(config, prefix: str = "") -> list[str]:
  """Dotted paths of every field and section of a ConfigDict."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, config_dict.ConfigDict):
      paths += _field_paths(value, f"{prefix}{key}.")
  return paths


def _has_field(config, path: str) -> bool:
  for key in path.split("."):
    if not isinstance(config, config_dict.ConfigDict) or key not in config:
      return False
    config = config[key]
  return True


def _load_config_file(spec: str):
  """The ConfigDict of ``--config=FILE[:ARG]`` (loaded again, only to name fields)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("tide_jax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_field_message(argv: list[str]) -> str | None:
  """One line for the first ``--config.<field>`` of ``argv`` the config does not have."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [m.group(1) for a in argv if (m := re.match(r"--config\.([^=]+)", a))]
  if spec is None or not overrides:
    return None
  try:
    config = _load_config_file(spec)
  except Exception:  # the config file itself is broken: absl reports that
    return None
  for field in overrides:
    if not _has_field(config, field):
      close = difflib.get_close_matches(field, _field_paths(config), n=3, cutoff=0.6)
      hint = (
          f"did you mean {' or '.join(close)}?" if close else "see the config file for the fields."
      )
      return f"--config.{field} is not a field of {spec}; {hint}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a one-line error for a misspelled ``--config.<field>``."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as err:  # raised by config_flags for an unknown field
    message = unknown_field_message(argv) or f"bad --config override ({err})"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# Why an operating-system error happened, in words a user acts on.
_OS_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted (a read-only or immutable location)",
    errno.ENOSPC: "no space is left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file would exceed the allowed file size (a file-size limit)",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def os_error_sentence(err: OSError) -> str:
  """One sentence for a failed file-system operation, naming the file."""
  if err.errno is None or not err.filename:
    return str(err)  # already a sentence (e.g. a checkpoint that could not be written)
  reason = _OS_REASONS.get(err.errno, err.strerror or "it failed")
  return (
      f"Cannot write or read {err.filename}: {reason}; use a writable --workdir on a file "
      "system with free space, or fix its permissions."
  )


def _drop_closed_loop_callbacks(unraisable) -> None:
  """After a failed checkpoint write, tensorstore completes its other pending writes on the
  event loop orbax has already closed; each would print a traceback ("Event loop is
  closed") around the one-sentence error. Every other unraisable exception is reported."""
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def main(argv):
  sys.unraisablehook = _drop_closed_loop_callbacks
  # Library logs (orbax, tfds) drown the progress lines, and failures end in one sentence
  # below rather than in a library's logged traceback; --verbosity=0 shows them all.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.FATAL)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (a local directory or a gs:// URL).")
  try:
    distributed.maybe_initialize()  # several hosts: before anything touches a device
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except preemption.Preempted as stop:  # SIGTERM: the checkpoint is written; resumable
    print(stop, flush=True)
    sys.exit(0)
  except (ValueError, FileNotFoundError, FloatingPointError, UserError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as err:  # a read-only or full workdir, missing permissions
    print(f"error: {os_error_sentence(err)}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
