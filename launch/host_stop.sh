#!/usr/bin/env bash
# Stops this host's run (started by launch/host_run.sh under setsid) and frees the TPU.
#
#   launch/host_stop.sh
#
# 1. SIGTERM to the run's process group: training checkpoints at the next step and exits 0.
# 2. After STOP_WAIT seconds (default 300) without exiting: SIGKILL to the group.
# 3. Any process still holding a TPU device file (TPU_DEVICES, a regular expression over
#    the targets of /proc/<pid>/fd; default /dev/accel<n> and /dev/vfio/<n>) is killed and
#    the libtpu lock file removed, so the next run can open the TPU (an orphan from an
#    earlier run would otherwise keep it busy).
set -uo pipefail
cd "$(dirname "$0")/.."
STOP_WAIT="${STOP_WAIT:-300}"
TPU_DEVICES="${TPU_DEVICES:-^/dev/(accel[0-9]+|vfio/[0-9]+)$}"
LIBTPU_LOCK="${LIBTPU_LOCK:-/tmp/libtpu_lockfile}"

if [ -f run/pid ] && kill -0 "$(cat run/pid)" 2>/dev/null; then
  group="$(cat run/pid)"
  echo "[host_stop] SIGTERM to run group $group; waiting up to ${STOP_WAIT}s for its checkpoint"
  kill -TERM -- "-$group" 2>/dev/null || kill -TERM "$group"
  for ((waited = 0; waited < STOP_WAIT; waited++)); do
    kill -0 "$group" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$group" 2>/dev/null; then
    echo "[host_stop] still running after ${STOP_WAIT}s: SIGKILL"
    kill -KILL -- "-$group" 2>/dev/null || kill -KILL "$group"
    echo "killed" >run/state
  fi
else
  echo "[host_stop] no run in progress"
fi

holders=()
for fd_dir in /proc/[0-9]*/fd; do
  pid="${fd_dir#/proc/}"
  pid="${pid%/fd}"
  [ "$pid" = "$$" ] && continue
  for fd in "$fd_dir"/*; do
    target="$(readlink "$fd" 2>/dev/null)" || continue
    if [[ "$target" =~ $TPU_DEVICES ]]; then
      holders+=("$pid")
      break
    fi
  done
done
if [ "${#holders[@]}" -gt 0 ]; then
  echo "[host_stop] freeing the TPU: killing ${holders[*]}"
  kill -KILL "${holders[@]}" 2>/dev/null
fi
rm -f "$LIBTPU_LOCK"
echo "[host_stop] done"
