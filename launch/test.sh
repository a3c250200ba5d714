#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q tests "$@"
