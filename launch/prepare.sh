#!/usr/bin/env bash
# The first-use steps of a run, done once, in one process on one host, before training:
#   - teacher conversion (`python -m tide_jax.convert --config=CONFIG`): teacher.hf_dir into
#     teacher.checkpoint; skipped when teacher.checkpoint already holds a converted teacher
#     (its teacher.json) or the recipe needs no teacher; a gs:// hf_dir is staged to local
#     disk first.
#   - data preparation (`python -m tide_jax.data.prepare --config=CONFIG --workdir=WORKDIR`):
#     the TFDS dataset of data.train_files / data.sources in data.cache_dir (or
#     WORKDIR/data_cache); skipped when it is already prepared; a gs:// cache_dir is prepared
#     on local disk (STAGE_DIR, default a temporary directory) and uploaded.
# Training refuses to start without them in a multi-host run (teacher.convert_if_missing is
# off outside the CPU smoke config; the hosts of a multi-host run never prepare data), so
# hosts never write the same directory at once.
#
#   bash launch/prepare.sh CONFIG [WORKDIR] [--config.field=value ...]
#
# The same WORKDIR and overrides as the training command: the dataset's location and name
# depend on them. It runs on the CPU (JAX_PLATFORMS=cpu; PREPARE_PLATFORMS overrides): the
# converter streams one layer at a time, and one process of a multi-host TPU slice cannot
# start the slice's TPU runtime alone. launch/tpu_vm.sh runs it on worker 0 (`prepare`
# verb); launch/gpu_slurm.sh on the batch host before the training step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [WORKDIR] [--config.field=value ...]" >&2
  exit 2
fi
CONFIG="$1"
shift
WORKDIR_FLAG=()
if [ $# -gt 0 ] && [ "${1:0:2}" != "--" ]; then
  WORKDIR_FLAG=("--workdir=$1")
  shift
fi
STAGE_FLAG=()
if [ -n "${STAGE_DIR:-}" ]; then
  STAGE_FLAG=("--stage_dir=$STAGE_DIR")
fi
if [ ! -x .venv/bin/python ]; then
  echo "error: no .venv in $(pwd); run 'bash launch/setup.sh' first." >&2
  exit 2
fi
echo "[prepare] teacher conversion for $CONFIG"
JAX_PLATFORMS="${PREPARE_PLATFORMS:-cpu}" .venv/bin/python -m tide_jax.convert \
  --config="$CONFIG" "$@"
echo "[prepare] data preparation for $CONFIG"
JAX_PLATFORMS="${PREPARE_PLATFORMS:-cpu}" .venv/bin/python -m tide_jax.data.prepare \
  --config="$CONFIG" ${WORKDIR_FLAG[@]+"${WORKDIR_FLAG[@]}"} \
  ${STAGE_FLAG[@]+"${STAGE_FLAG[@]}"} "$@"
