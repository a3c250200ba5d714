#!/usr/bin/env bash
# The memory plan's mesh and micro-batch count for the paper's pipelines, as --config flags.
#
#   source launch/plan_flags.sh; plan_flags CONFIG TARGET
#   bash launch/plan_flags.sh CONFIG TARGET          # the same, printed
#
# CONFIG is configs/pipeline_a.py or configs/pipeline_b.py (any directory, any ':recipe');
# TARGET is a TPU accelerator type (v5litepod-16, v5p-8) or gpuN (N GPUs per process, e.g.
# gpu8 for one 8x H100 node). Prints the flags, space-separated, or nothing for other
# configs and targets. The launchers put them before the user's overrides, so a flag on
# the command line wins. Where the numbers come from: docs/benchmarks/memory_plan.md
# (`python benchmarks/bench_memory_plan.py --full-depth ...`): the smallest micro-batch count
# that leaves 15% of the HBM free with this mesh (one, on every target). mesh.fsdp=-1 takes
# the devices the other axes leave, so the same flags serve one host and several.

plan_flags() { # CONFIG TARGET
  local name
  name="$(basename "${1%%:*}")"
  case "$name:$2" in
    # LLaDA2.0-mini: experts over 8 devices (4 on a v5p-8); fsdp takes the rest (2 on a
    # v5e-16). The student's state splits over fsdp x expert (it has no experts).
    pipeline_a.py:v5litepod-16) echo "--config.mesh.expert=8 --config.mesh.fsdp=-1 --config.train.microbatches=1" ;;
    pipeline_a.py:v5p-8) echo "--config.mesh.expert=4 --config.mesh.fsdp=-1 --config.train.microbatches=1" ;;
    pipeline_a.py:gpu*) echo "--config.mesh.expert=8 --config.mesh.fsdp=-1 --config.train.microbatches=1" ;;
    # WeDLM-8B: every device on fsdp.
    pipeline_b.py:v5litepod-16) echo "--config.mesh.fsdp=-1 --config.train.microbatches=1" ;;
    pipeline_b.py:v5p-8 | pipeline_b.py:gpu*) echo "--config.mesh.fsdp=-1 --config.train.microbatches=1" ;;
  esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  if [ $# -ne 2 ]; then
    echo "usage: $0 CONFIG TARGET" >&2
    exit 2
  fi
  plan_flags "$1" "$2"
fi
