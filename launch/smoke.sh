#!/usr/bin/env bash
# Sets up the environment and runs the CPU smoke job into ${WORKDIR:-runs/smoke}.
# Extra arguments are passed to tide_jax.main (for example --config.train.num_steps=40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m tide_jax.main --config=configs/smoke.py --workdir="${WORKDIR:-runs/smoke}" "$@"
