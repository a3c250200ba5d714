"""``python -m tide_jax.plot --workdir=DIR [--compare=DIR2,...] [--names=a,b,...] --out=DIR``."""

from __future__ import annotations

import sys

from absl import app, flags

from tide_jax import plot

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run to plot (local or gs://).")
_COMPARE = flags.DEFINE_list("compare", [], "More runs on the same axes (comma-separated).")
_NAMES = flags.DEFINE_list("names", None, "Legend labels, one per run (default: directory names).")
_OUT = flags.DEFINE_string(
    "out", None, "Output directory for the PNG files (default <workdir>/plots)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required (a training run's directory or gs:// URL).")
  out = _OUT.value or f"{_WORKDIR.value.rstrip('/')}/plots"
  try:
    result = plot.plot_runs([_WORKDIR.value, *_COMPARE.value], out, _NAMES.value)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)
  for run in result.runs:
    for note in run.notes:
      print(f"note: {run.name}: {note}")
  for name, path in result.paths.items():
    print(f"{name}: {path}")
  for name, why in result.skipped.items():
    print(f"{name}: skipped, {why}")


if __name__ == "__main__":
  app.run(main)
