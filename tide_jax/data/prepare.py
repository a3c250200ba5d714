"""Prepare the TFDS dataset of a config ahead of training (training also does it on first use).

    python -m tide_jax.data.prepare --config=configs/smoke.py [--workdir=DIR] [--stage_dir=DIR] \
        [--config.data.strict=True]

The config file's `get_config()` may return a full run config (its `data` field is used) or a
data config alone. Prints progress, then the summary of what was kept, truncated and dropped
per split (also stored in the dataset's metadata). A dataset already prepared is left alone.
A `gs://` cache_dir is prepared on local disk first (`--stage_dir`, default a temporary
directory) and uploaded.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from tide_jax import cli_flags  # noqa: F401  (list fields on the command line)
from tide_jax.data import builder as builder_lib
from tide_jax.data.options import parse_options
from tide_jax.data.records import DataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (ml_collections), optionally file.py:arg."
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory; the dataset goes to <workdir>/data_cache unless data.cache_dir is set.",
)
_STAGE_DIR = flags.DEFINE_string(
    "stage_dir",
    None,
    "Local directory to prepare a gs:// dataset in before uploading it (default: a "
    "temporary directory, removed afterwards; a kept one lets a re-run resume the upload).",
)


def data_section(config):
  """The data config inside a run config, or the config itself."""
  return config.data if "data" in config else config


def run(config, workdir: str | None, stage_root: str | None = None) -> dict:
  """Prepares the dataset and returns its summary (per split)."""
  options = parse_options(data_section(config), workdir)
  builder = builder_lib.prepare(options, stage_root)
  summary = dict(builder.info.metadata).get("summary", {})
  print(f"dataset: {builder.data_dir}")
  print(json.dumps(summary, indent=2, sort_keys=True))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (an ml_collections config file)")
  try:
    run(_CONFIG.value, _WORKDIR.value, _STAGE_DIR.value)
  except (DataError, ValueError) as err:
    # One clear sentence for input and configuration problems, not a traceback.
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
