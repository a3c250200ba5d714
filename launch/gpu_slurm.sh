#!/usr/bin/env bash
#SBATCH --job-name=tide_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=tide_%j.log
# Train on a SLURM GPU cluster: one process per node driving every GPU of its node.
#
#   bash launch/setup.sh gpu          # once, where there is network (e.g. the login node)
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/pipeline_b.py gs://my-bucket/tide/runs/b_shared
#   sbatch --nodes=1 launch/gpu_slurm.sh configs/pipeline_a.py /shared/runs/a_cross \
#       --config.mesh.expert=8
#
# The checkout (and its .venv) must be on a filesystem every node sees; the job installs
# nothing (compute nodes often have no network) and stops with one sentence when .venv was
# not set up for GPUs. It may be submitted from any directory: the checkout is the one
# holding the submitted script (from `scontrol show job`, or TIDE_REPO), and a relative
# CONFIG is looked up in the submission directory first, then in the checkout.
#
# Steps: launch/prepare.sh once on the batch host (teacher conversion, data preparation;
# PREPARE=0 skips it), then one training task per node through launch/host_run.sh: each
# node's log is WORKDIR/logs/host_<i>.log (WORKDIR local or gs://). JAX_LOCAL_DEVICE_IDS
# gives each task all GPUs of its node (JAX alone would bind it to GPU number SLURM_LOCALID
# only).
#
# Time limit: --signal=B:USR1@300 sends USR1 to this batch shell 5 minutes before the limit.
# The trap forwards SIGTERM to every task (`scancel --signal=TERM JOBID` signals the job's
# steps, not the batch shell); each host checkpoints at the next step and exits 0; then the
# trap's flag makes this script `scontrol requeue` the job, which resumes from that
# checkpoint. (--requeue alone requeues after node failures, never after a time limit.)
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N] $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2

# slurmd runs a copy of this script from its spool directory, so $0 does not lead back to
# the checkout; the job's record names the submitted script.
find_repo() {
  if [ -n "${TIDE_REPO:-}" ]; then
    echo "$TIDE_REPO"
    return
  fi
  local command=""
  if [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null 2>&1; then
    command="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' |
      sed -n 's/^Command=//p' | head -n 1)"
  fi
  if [ -n "$command" ] && [ -f "$command" ]; then
    (cd "$(dirname "$command")/.." && pwd)
  elif [ -f "${SLURM_SUBMIT_DIR:-.}/launch/gpu_slurm.sh" ]; then
    (cd "${SLURM_SUBMIT_DIR:-.}" && pwd)
  else
    (cd "$(dirname "$0")/.." && pwd)
  fi
}
REPO="$(find_repo)"
if [ ! -f "$REPO/launch/host_run.sh" ]; then
  echo "error: could not find the tide_jax checkout (tried $REPO); set TIDE_REPO=/path/to/tide_jax when submitting." >&2
  exit 2
fi
if [ "${CONFIG:0:1}" != "/" ] && [ -f "${SLURM_SUBMIT_DIR:-.}/${CONFIG%%:*}" ]; then
  CONFIG="$(cd "${SLURM_SUBMIT_DIR:-.}" && pwd)/$CONFIG"
fi
cd "$REPO"

want="$(sha256sum requirements.txt | cut -d' ' -f1) gpu"
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$want" ]; then
  echo "error: $REPO/.venv is not set up for GPUs with the current requirements.txt; run 'bash launch/setup.sh gpu' in $REPO on a machine with network access (a login node), then submit again." >&2
  exit 2
fi

GPUS="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
GPUS="${GPUS##*:}" # "h100:8" -> 8
JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS - 1)))"
export JAX_LOCAL_DEVICE_IDS
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# The memory plan's mesh and micro-batches for the paper's pipelines on GPUS-GPU nodes,
# before the user's overrides (which win): launch/plan_flags.sh.
source launch/plan_flags.sh
read -ra PLAN <<<"$(plan_flags "$CONFIG" "gpu$GPUS")"
if [ ${#PLAN[@]} -gt 0 ]; then
  echo "[gpu_slurm] memory-plan defaults for $GPUS GPUs per node: ${PLAN[*]}"
fi
set -- ${PLAN[@]+"${PLAN[@]}"} "$@"

if [ "${PREPARE:-1}" = "1" ]; then
  bash launch/prepare.sh "$CONFIG" "$WORKDIR" "$@"
fi

REQUEUE=0
on_time_limit() {
  REQUEUE=1
  echo "[gpu_slurm] time limit near: SIGTERM to every task (checkpoint), then requeue"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_time_limit USR1

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash launch/host_run.sh "$WORKDIR" \
  .venv/bin/python -m tide_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" &
STEP=$!
# A trapped signal interrupts `wait`; wait again until the step has really ended.
while kill -0 "$STEP" 2>/dev/null; do
  wait "$STEP" || true
done
rc=0
wait "$STEP" || rc=$?
if [ "$REQUEUE" = "1" ] && [ "$rc" = "0" ]; then
  echo "[gpu_slurm] checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
