"""Entrypoint: ``python -m tide_jax.main --config=configs/<name>.py[:arg] --workdir=DIR``.

Modes: ``train`` (default; resumes from the latest checkpoint in the workdir), ``eval``,
``sample`` and ``export`` (see ``tide_jax.modes``).
Config fields are overridden with ``--config.<field>=value``. All logic lives in
importable functions (``tide_jax.train.loop.train_and_evaluate``) so tests and notebooks
call the same code.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tide_jax import modes
from tide_jax.data import vocab
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
  config = vocab.restricted_config(config, loop.absolute_workdir(workdir))

  if mode == "eval":
    return modes.run_eval(config, workdir)
  if mode == "sample":
    return modes.run_sample(config, workdir, _PROMPTS.value, _CHAT.value)
  if mode == "export":
    return modes.run_export(config, workdir, _EXPORT_DIR.value)
  raise UserError(f"Unknown mode {mode!r}.")


def main(argv):
  # Library INFO/WARNING logs (orbax, tfds) drown the progress lines; --verbosity=0 shows them.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (a local directory or a gs:// URL).")
  from tide_jax.parallel import distributed, preemption

  try:
    distributed.maybe_initialize()  # several hosts: before anything touches a device
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except preemption.Preempted as stop:  # SIGTERM: the checkpoint is written; resumable
    print(stop, flush=True)
    sys.exit(0)
  except (ValueError, FileNotFoundError, FloatingPointError, UserError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
