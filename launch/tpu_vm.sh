#!/usr/bin/env bash
# Train on a Cloud TPU VM slice.
#
#   launch/tpu_vm.sh prepare CONFIG GS_WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh train   CONFIG GS_WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh watch   CONFIG GS_WORKDIR [--config.field=value ...]
#   launch/tpu_vm.sh status | logs [WORKER] | stop | delete
#
# prepare  get the slice, ship the working tree, install, and run launch/prepare.sh (teacher
#          conversion, data preparation) once, on worker 0.
# train    get the slice, ship, install, start the run on every worker in the background
#          (each worker's log: ~/tide_jax/logs/host_<i>.log, copied to
#          GS_WORKDIR/logs/host_<i>.log every minute), then follow worker 0's log unless
#          DETACH=1. Ctrl-C only stops following; `stop` stops the run.
# watch    train, then every WATCH_INTERVAL seconds (default 300): when the slice was
#          preempted (or its queued resource suspended), delete it, recreate it and train
#          again (which resumes from the last checkpoint); when the run ended preempted on
#          a healthy slice (maintenance SIGTERM) or its processes are gone (the VMs were
#          restarted), start it again; stop when GS_WORKDIR holds
#          summary.json (the run finished) or a worker reports a failed run.
# status   the slice's state and every worker's run state (running, finished, preempted,
#          failed rc=N, killed, lost: marked running but the process is gone).
# logs     follow worker WORKER's log (default 0).
# stop     SIGTERM every worker's run (it checkpoints and exits 0), kill what is left after
#          STOP_WAIT seconds (default 300) and free the TPU (launch/host_stop.sh).
# delete   delete the slice (and its queued resource).
# Without a verb, `train` is meant (launch/tpu_vm.sh CONFIG GS_WORKDIR ...).
#
# A preempted slice stays PREEMPTED (a Spot or preemptible slice cannot be restarted); every
# verb that needs the slice deletes and recreates it. Maintenance events send SIGTERM only to
# slices created with Autocheckpoint (--autocheckpoint-enabled, gcloud alpha, v2-v4 and v5e).
#
# Environment:
#   TPU_NAME (required)   slice name (also the queued resource's name with QUEUED=1)
#   ZONE (required)       e.g. us-west4-a (v5e), us-east5-a (v5p)
#   PROJECT               gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE      e.g. v5litepod-16, v5p-8 (default v5litepod-16)
#   RUNTIME_VERSION       TPU VM image (default v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5
#                         for v5p)
#   SPOT=1                create a Spot slice
#   QUEUED=1              request the slice as a queued resource (the way to wait for v5e /
#                         v5p capacity; QUEUED_FLAGS adds flags, e.g. --valid-until-duration=6h)
#   AUTOCHECKPOINT=0|1    create with --autocheckpoint-enabled (default 1 on v2-v5e, 0 on v5p)
#   CREATE=0              fail instead of creating a missing slice
#   DETACH=1              train: return after starting instead of following worker 0's log
#   SKIP_SHIP=1           reuse the tree and .venv already on the workers
#   STOP_WAIT, WATCH_INTERVAL, CREATE_TIMEOUT (seconds; CREATE_TIMEOUT default 3600)
set -euo pipefail
cd "$(dirname "$0")/.."

VERBS=" prepare train watch status logs stop delete "
if [ $# -gt 0 ] && [[ "$VERBS" == *" $1 "* ]]; then
  VERB="$1"
  shift
else
  VERB=train
fi
: "${TPU_NAME:?set TPU_NAME to the slice name}"
: "${ZONE:?set ZONE to the slice zone, e.g. us-west4-a}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
case "$ACCELERATOR_TYPE" in
  v5p-*)
    RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
    AUTOCHECKPOINT="${AUTOCHECKPOINT:-0}"
    ;;
  *)
    RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
    AUTOCHECKPOINT="${AUTOCHECKPOINT:-1}"
    ;;
esac
source launch/plan_flags.sh
SCOPE=(--zone="$ZONE")
[ -n "${PROJECT:-}" ] && SCOPE+=(--project="$PROJECT")
say() { echo "[tpu_vm] $*"; }
die() {
  echo "error: $*" >&2
  exit 2
}
tpu() { gcloud compute tpus tpu-vm "$@" "${SCOPE[@]}"; }
queued() { gcloud compute tpus queued-resources "$@" "${SCOPE[@]}"; }
on_workers() { # WORKER COMMAND: run COMMAND (one string, for the remote shell) on WORKER
  tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# ----------------------------------------------------------------------------- the slice

# Prints a resource's state, "MISSING" when it does not exist; any other failure of
# `describe` (credentials, network, a wrong project) stops the launcher with gcloud's words.
state_of() { # KIND (tpu|queued) FORMAT
  local out
  if out="$("$1" describe "$TPU_NAME" --format="$2" 2>&1)"; then
    echo "${out:-UNKNOWN}"
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo MISSING
  else
    die "gcloud could not describe $TPU_NAME in $ZONE: $out"
  fi
}

create_slice() {
  [ "${CREATE:-1}" = "0" ] && die "TPU VM $TPU_NAME does not exist in $ZONE and CREATE=0."
  local track=() extra=()
  if [ "$AUTOCHECKPOINT" = "1" ]; then
    track=(alpha) # --autocheckpoint-enabled exists on the alpha track only
    extra+=(--autocheckpoint-enabled)
  fi
  [ "${SPOT:-0}" = "1" ] && extra+=(--spot)
  if [ "${QUEUED:-0}" = "1" ]; then
    say "requesting $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) as a queued resource in $ZONE"
    # shellcheck disable=SC2086 # QUEUED_FLAGS is a list of flags
    gcloud "${track[@]}" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
      "${extra[@]}" ${QUEUED_FLAGS:-} "${SCOPE[@]}"
  else
    say "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
    gcloud "${track[@]}" compute tpus tpu-vm create "$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      "${extra[@]}" "${SCOPE[@]}"
  fi
}

delete_slice() {
  if [ "${QUEUED:-0}" = "1" ]; then
    say "deleting queued resource $TPU_NAME and its slice"
    queued delete "$TPU_NAME" --force --quiet
  else
    say "deleting $TPU_NAME"
    tpu delete "$TPU_NAME" --quiet
  fi
}

# Makes the slice READY: creates a missing one, deletes and recreates a preempted one
# (PREEMPTED/TERMINATED slices and SUSPENDED/FAILED queued resources cannot be restarted),
# waits through the transitional states.
ensure_slice() {
  local waited=0 state
  while :; do
    if [ "${QUEUED:-0}" = "1" ]; then
      state="$(state_of queued 'value(state.state)')"
      case "$state" in
        MISSING)
          create_slice
          continue
          ;;
        ACTIVE)
          state="$(state_of tpu 'value(state)')"
          case "$state" in
            READY) return 0 ;;
            PREEMPTED | TERMINATED)
              say "$TPU_NAME is $state; it cannot be restarted"
              delete_slice
              continue
              ;;
          esac
          ;;
        SUSPENDING | SUSPENDED | FAILED)
          say "queued resource $TPU_NAME is $state"
          delete_slice
          continue
          ;;
      esac
    else
      state="$(state_of tpu 'value(state)')"
      case "$state" in
        MISSING)
          create_slice
          continue
          ;;
        READY) return 0 ;;
        PREEMPTED | TERMINATED)
          say "$TPU_NAME is $state; it cannot be restarted"
          delete_slice
          continue
          ;;
        STOPPED) die "$TPU_NAME is STOPPED; start it with 'gcloud compute tpus tpu-vm start' or delete it." ;;
      esac
    fi
    [ "$waited" -ge "${CREATE_TIMEOUT:-3600}" ] &&
      die "$TPU_NAME is still $state after ${waited}s; see 'gcloud compute tpus' for why."
    say "$TPU_NAME is $state; waiting"
    sleep "${POLL_SECONDS:-30}"
    waited=$((waited + ${POLL_SECONDS:-30}))
  done
}

worker_count() {
  local count
  count="$(state_of tpu 'value(networkEndpoints.len())')"
  [[ "$count" =~ ^[1-9][0-9]*$ ]] ||
    die "could not read the worker count of $TPU_NAME (gcloud said '$count'); a multi-host start needs it."
  echo "$count"
}

# ----------------------------------------------------------------------------- the workers

# Ships the working tree: tracked files with their uncommitted edits plus untracked files
# that .gitignore does not exclude (a new config file travels; .venv, runs/ do not).
ship_and_install() {
  [ "${SKIP_SHIP:-0}" = "1" ] && return 0
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "launch/tpu_vm.sh ships the git working tree; run it from a git checkout of tide_jax."
  local archive
  archive="$(mktemp -t tide_jax.XXXXXX).tar.gz"
  # shellcheck disable=SC2064 # expand now: the path is fixed
  trap "rm -f '$archive'" EXIT
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do [ -e "$path" ] && printf '%s\0' "$path"; done |
    tar --null -czf "$archive" -T -
  say "copying the working tree to $WORKERS worker(s) and installing (Python 3.11, jax[tpu])"
  tpu scp "$archive" "$TPU_NAME":tide_jax.tar.gz --worker=all
  on_workers all "mkdir -p ~/tide_jax && tar -xzf ~/tide_jax.tar.gz -C ~/tide_jax \
&& cd ~/tide_jax && PROVISION_PYTHON=1 bash launch/setup.sh tpu"
}

quoted_args() { # the arguments, each quoted once for the remote shell
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  echo "$out"
}

# The memory plan's mesh and micro-batches for the paper's pipelines on this slice, before
# the user's overrides (which win): launch/plan_flags.sh.
with_plan() { # CONFIG WORKDIR [overrides] -> the same, with the plan's flags after WORKDIR
  local defaults
  read -ra defaults <<<"$(plan_flags "$1" "$ACCELERATOR_TYPE")"
  if [ ${#defaults[@]} -gt 0 ]; then
    say "memory-plan defaults for $ACCELERATOR_TYPE: ${defaults[*]}" >&2
  fi
  PLANNED=("$1" "$2" ${defaults[@]+"${defaults[@]}"} "${@:3}")
}

start_run() { # CONFIG WORKDIR [overrides]: the training process on every worker, detached
  with_plan "$@"
  set -- "${PLANNED[@]}"
  local config="$1" workdir="$2"
  shift 2
  local dist=""
  [ "$WORKERS" -gt 1 ] && dist="TIDE_DISTRIBUTED=auto"
  local train
  train="$(quoted_args env $dist .venv/bin/python -m tide_jax.main --config="$config" \
    --workdir="$workdir" "$@")"
  say "starting the run on $WORKERS worker(s); logs in $workdir/logs/host_<i>.log"
  on_workers all "cd ~/tide_jax && if [ \"\$(cat run/state 2>/dev/null)\" = running ] && kill -0 \"\$(cat run/pid)\" 2>/dev/null; then echo 'a run is already in progress here; stop it first' >&2; exit 3; fi; \
setsid nohup bash launch/host_run.sh$(quoted_args "$workdir")$train >/dev/null 2>&1 </dev/null &"
}

# Each worker's run state; "lost" when it says running but its process is gone (the VM was
# restarted under it, e.g. by a maintenance event without Autocheckpoint).
RUN_STATE='s="$(cat ~/tide_jax/run/state 2>/dev/null || echo "no run")"; \
if [ "$s" = running ] && ! kill -0 "$(cat ~/tide_jax/run/pid)" 2>/dev/null; then s=lost; fi; \
echo "worker $(cat ~/tide_jax/run/host_index 2>/dev/null || echo ?): $s"'

follow() { on_workers "${1:-0}" "tail -n 200 -F ~/tide_jax/logs/host_${1:-0}.log"; }

need_run_args() {
  [ $# -ge 2 ] || die "usage: TPU_NAME=... ZONE=... $0 $VERB CONFIG GS_WORKDIR [--config.field=value ...]"
  case "$2" in
    gs://*) ;;
    *) die "the workdir must be a gs:// URL that every worker can reach, got $2." ;;
  esac
}

finished() { # WORKDIR: the run wrote summary.json
  gcloud storage ls "${1%/}/summary.json" >/dev/null 2>&1
}

# ----------------------------------------------------------------------------- verbs

case "$VERB" in
  prepare)
    need_run_args "$@"
    ensure_slice
    WORKERS="$(worker_count)"
    ship_and_install
    say "preparing on worker 0 only (one process converts the teacher and prepares the data)"
    with_plan "$@"
    on_workers 0 "cd ~/tide_jax && bash launch/prepare.sh$(quoted_args "${PLANNED[@]}")"
    ;;
  train)
    need_run_args "$@"
    ensure_slice
    WORKERS="$(worker_count)"
    ship_and_install
    start_run "$@"
    if [ "${DETACH:-0}" != "1" ]; then
      say "following worker 0 (Ctrl-C stops following, not the run; '$0 stop' stops it)"
      follow 0 || true
    fi
    ;;
  watch)
    need_run_args "$@"
    while :; do
      ensure_slice
      WORKERS="$(worker_count)"
      ship_and_install
      start_run "$@"
      while sleep "${WATCH_INTERVAL:-300}"; do
        if finished "$2"; then
          say "the run finished: $2/summary.json"
          exit 0
        fi
        if [ "${QUEUED:-0}" = "1" ]; then
          [ "$(state_of queued 'value(state.state)')" = ACTIVE ] || break
        fi
        [ "$(state_of tpu 'value(state)')" = READY ] || break
        states="$(on_workers all "$RUN_STATE" 2>/dev/null)" || continue # unreachable: ask again
        if [[ "$states" == *failed* ]]; then
          die "a worker reports a failed run ($states); see $2/logs/."
        fi
        if [[ "$states" != *running* ]]; then
          if finished "$2"; then
            say "the run finished: $2/summary.json"
            exit 0
          fi
          break # every worker's run ended (preempted): start again
        fi
      done
      say "restarting: the slice or the run was interrupted"
      on_workers all "cd ~/tide_jax && bash launch/host_stop.sh" >/dev/null 2>&1 || true
    done
    ;;
  status)
    say "$TPU_NAME: $(state_of tpu 'value(state)')"
    [ "${QUEUED:-0}" = "1" ] && say "queued resource $TPU_NAME: $(state_of queued 'value(state.state)')"
    on_workers all "$RUN_STATE"
    ;;
  logs)
    follow "${1:-0}"
    ;;
  stop)
    on_workers all "cd ~/tide_jax && STOP_WAIT=${STOP_WAIT:-300} bash launch/host_stop.sh"
    ;;
  delete)
    delete_slice
    ;;
esac
