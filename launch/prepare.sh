#!/usr/bin/env bash
# The first-use steps of a run, done once, in one process on one host, before training:
#   - teacher conversion (`python -m tide_jax.convert --config=CONFIG`): teacher.hf_dir into
#     teacher.checkpoint; skipped when teacher.checkpoint already holds a converted teacher
#     (its teacher.json) or the recipe needs no teacher; a gs:// hf_dir is staged to local
#     disk first.
# Training refuses to start without the converted teacher (teacher.convert_if_missing is off
# outside the CPU smoke config), so hosts never convert into the same directory at once.
# Data is still prepared by the training run itself (docs/data.md).
#
#   bash launch/prepare.sh CONFIG [--config.field=value ...]
#
# The same overrides as the training command are accepted. It runs on the CPU
# (JAX_PLATFORMS=cpu; PREPARE_PLATFORMS overrides): the converter streams one layer at a
# time, and one process of a multi-host TPU slice cannot start the slice's TPU runtime alone.
# launch/tpu_vm.sh runs it on worker 0 (`prepare` verb); launch/gpu_slurm.sh on the batch
# host before the training step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [--config.field=value ...]" >&2
  exit 2
fi
CONFIG="$1"
shift
if [ ! -x .venv/bin/python ]; then
  echo "error: no .venv in $(pwd); run 'bash launch/setup.sh' first." >&2
  exit 2
fi
echo "[prepare] teacher conversion for $CONFIG"
JAX_PLATFORMS="${PREPARE_PLATFORMS:-cpu}" .venv/bin/python -m tide_jax.convert \
  --config="$CONFIG" "$@"
