#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, copy this checkout to every
# worker, install, and run the same absl command on all workers with a gs:// workdir.
#
#   TPU_NAME=tide-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 \
#     launch/tpu_vm.sh configs/pipeline_a.py gs://my-bucket/tide/runs/a_tide_cross \
#     --config.model.init_from=gs://my-bucket/tide/models/qwen3-0.6b
#
# Environment:
#   TPU_NAME (required)        slice name; reused when it exists
#   ZONE (required)            e.g. us-west4-a (v5e), us-east5-a (v5p)
#   PROJECT                    gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE           e.g. v5litepod-16, v5p-8 (default v5litepod-16)
#   RUNTIME_VERSION            TPU VM image (default v2-alpha-tpuv5-lite; v5p: v2-alpha-tpuv5)
#   SPOT=1                     create a Spot slice (preemptible; SIGTERM -> checkpoint, exit 0)
#   CREATE=0                   fail instead of creating a missing slice
#   DETACH=1                   start the run in the background on every worker (log in
#                              ~/tide_train.log) instead of streaming it
#   JAX_TPU_EXTRA              pip requirement for the TPU runtime (default: jax[tpu] of the
#                              pinned jax version)
# Re-running the same command after a preemption resumes from the latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 2 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG GS_WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
: "${TPU_NAME:?set TPU_NAME to the slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-west4-a}"
case "$WORKDIR" in
  gs://*) ;;
  *) echo "error: the workdir must be a gs:// URL that every worker can reach, got $WORKDIR" >&2; exit 2 ;;
esac
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
PROJECT_FLAG=()
[ -n "${PROJECT:-}" ] && PROJECT_FLAG=(--project="$PROJECT")
JAX_VERSION="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
JAX_TPU_EXTRA="${JAX_TPU_EXTRA:-jax[tpu]==${JAX_VERSION}}"
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" "${PROJECT_FLAG[@]}"; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  if [ "${CREATE:-1}" = "0" ]; then
    echo "error: TPU VM $TPU_NAME does not exist in $ZONE and CREATE=0" >&2; exit 2
  fi
  echo "[tpu_vm] creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  SPOT_FLAG=()
  [ "${SPOT:-0}" = "1" ] && SPOT_FLAG=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${SPOT_FLAG[@]}"
else
  echo "[tpu_vm] reusing $TPU_NAME"
fi
WORKERS="$(tpu describe "$TPU_NAME" --format='value(networkEndpoints.len())' 2>/dev/null || echo 1)"
WORKERS="${WORKERS:-1}"

# Ship exactly the tracked files of this checkout (plus uncommitted edits to them).
ARCHIVE="$(mktemp -t tide_jax.XXXXXX).tar.gz"
trap 'rm -f "$ARCHIVE"' EXIT
git ls-files -z | tar --null -czf "$ARCHIVE" -T -
echo "[tpu_vm] copying the checkout to $WORKERS worker(s)"
tpu scp "$ARCHIVE" "$TPU_NAME":tide_jax.tar.gz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p ~/tide_jax && tar -xzf ~/tide_jax.tar.gz -C ~/tide_jax \
  && cd ~/tide_jax && PYTHON=python3 bash launch/setup.sh \
  && .venv/bin/python -m pip install --quiet '$JAX_TPU_EXTRA' \
       -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# The same command on every worker; several workers form one JAX runtime (TIDE_DISTRIBUTED).
ARGS=""
for a in "$@"; do ARGS="$ARGS $(printf '%q' "$a")"; done
DIST=""
[ "$WORKERS" -gt 1 ] && DIST="TIDE_DISTRIBUTED=auto"
RUN="cd ~/tide_jax && $DIST .venv/bin/python -m tide_jax.main --config=$(printf '%q' "$CONFIG") \
  --workdir=$(printf '%q' "$WORKDIR")$ARGS"
if [ "${DETACH:-0}" = "1" ]; then
  tpu ssh "$TPU_NAME" --worker=all --command="nohup bash -c '$RUN' > ~/tide_train.log 2>&1 &"
  echo "[tpu_vm] started; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/tide_train.log'"
else
  tpu ssh "$TPU_NAME" --worker=all --command="$RUN"
fi
