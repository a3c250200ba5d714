#!/usr/bin/env bash
# Runs this host's process of a run with its output in <workdir>/logs/host_<i>.log and its
# state in run/ of this checkout (for the launchers' status and stop).
#
#   launch/host_run.sh WORKDIR COMMAND [ARG ...]
#
# Host index i: TIDE_HOST_INDEX, else SLURM_PROCID, else the TPU VM worker number from the
# metadata server (attribute agent-worker-number, the one JAX's TPU cluster detection reads),
# else 0.
# Log: a local workdir gets <workdir>/logs/host_<i>.log directly. For a gs:// workdir the
# log is written to logs/host_<i>.log in this checkout and copied to
# <workdir>/logs/host_<i>.log every LOG_SYNC_SECONDS (default 60) and when the process ends
# (through etils.epath in .venv, the same storage client training uses).
# run/: host_index, pid (this script; started with setsid it leads the process group that
# `launch/host_stop.sh` signals), state (running, finished, preempted, or failed rc=N).
# FOLLOW=1 also prints the log here while the process runs.
# SIGTERM to the process group reaches COMMAND, which checkpoints and exits 0; this script
# waits for it rather than exiting first, so the state and the final log copy are written.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: $0 WORKDIR COMMAND [ARG ...]" >&2
  exit 2
fi
WORKDIR="${1%/}"
shift

host_index() {
  if [ -n "${TIDE_HOST_INDEX:-}" ]; then
    echo "$TIDE_HOST_INDEX"
  elif [ -n "${SLURM_PROCID:-}" ]; then
    echo "$SLURM_PROCID"
  elif worker="$(curl -sf -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/agent-worker-number" \
    2>/dev/null)" && [ -n "$worker" ]; then
    echo "$worker"
  else
    echo 0
  fi
}

HOST="$(host_index)"
mkdir -p run logs
case "$WORKDIR" in
  gs://*)
    LOG="logs/host_${HOST}.log"
    REMOTE="$WORKDIR/logs/host_${HOST}.log"
    ;;
  *)
    mkdir -p "$WORKDIR/logs"
    LOG="$WORKDIR/logs/host_${HOST}.log"
    REMOTE=""
    ;;
esac
upload() {
  [ -n "$REMOTE" ] || return 0
  .venv/bin/python -c 'import sys
from etils import epath
epath.Path(sys.argv[2]).write_bytes(open(sys.argv[1], "rb").read())' "$LOG" "$REMOTE" ||
    echo "[host_run] could not copy $LOG to $REMOTE" >&2
}

echo "$HOST" >run/host_index
echo "$$" >run/pid
echo running >run/state
START_BYTES="$(stat -c %s "$LOG" 2>/dev/null || echo 0)"
echo "[host_run] host $HOST: $* (log $LOG${REMOTE:+, copied to $REMOTE})"
echo "[host_run] $(date -u +%FT%TZ) host $HOST starts: $*" >>"$LOG"
trap 'echo "[host_run] SIGTERM: waiting for the run to checkpoint" >>"$LOG"' TERM
"$@" >>"$LOG" 2>&1 &
CHILD=$!
if [ -n "$REMOTE" ]; then
  (while kill -0 "$CHILD" 2>/dev/null; do
    sleep "${LOG_SYNC_SECONDS:-60}"
    upload
  done) &
fi
if [ "${FOLLOW:-0}" = "1" ]; then
  tail -n +1 -f --pid="$CHILD" "$LOG" &
fi
# A trapped signal interrupts `wait`; wait again until the process has really ended.
while kill -0 "$CHILD" 2>/dev/null; do
  wait "$CHILD"
done
wait "$CHILD"
rc=$?
if [ "$rc" -ne 0 ]; then
  state="failed rc=$rc"
elif tail -c +"$((START_BYTES + 1))" "$LOG" | grep -q '^Preempted: checkpoint of step'; then
  state=preempted
else
  state=finished
fi
echo "[host_run] $(date -u +%FT%TZ) host $HOST: $state" >>"$LOG"
echo "$state" >run/state
upload
exit "$rc"
