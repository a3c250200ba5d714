#!/usr/bin/env bash
# Sets up the environment and runs (or resumes) the replication study into
# ${WORKDIR:-runs/replicate}, then writes docs/replication.md's table and figures from the
# runs found there (see docs/replication.md). Extra arguments go to tide_jax.main, e.g.
# --config=configs/replicate.py:gpu on an accelerator, or --config.replicate.quick=True
# for the whole study in miniature (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The CPU study runs on the CPU; the :gpu variant on whatever accelerator JAX finds.
if [[ " $* " != *"replicate.py:gpu"* ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
fi
exec .venv/bin/python -m tide_jax.main --config=configs/replicate.py \
  --workdir="${WORKDIR:-runs/replicate}" "$@"
