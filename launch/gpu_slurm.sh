#!/usr/bin/env bash
#SBATCH --job-name=tide_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=tide_%j.log
# Train on a SLURM GPU cluster: one process per host, each driving all GPUs of its node;
# JAX detects the SLURM layout and forms one runtime (jax.distributed.initialize).
#
#   sbatch --nodes=2 launch/gpu_slurm.sh configs/pipeline_b.py gs://my-bucket/tide/runs/b_shared
#   sbatch --nodes=1 launch/gpu_slurm.sh configs/pipeline_a.py /shared/runs/a_cross \
#       --config.mesh.expert=8
#
# The checkout (and its .venv) must be on a filesystem every node sees. The workdir is a
# shared directory or a gs:// URL. --signal=TERM@300 sends SIGTERM 5 minutes before the
# time limit: every host checkpoints at the next step boundary and exits 0; --requeue
# reruns the job, which resumes from that checkpoint.
# Environment: JAX_GPU_EXTRA (default jax[cuda12] of the pinned jax version).
set -euo pipefail
REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$REPO"
if [ $# -lt 2 ]; then
  echo "usage: sbatch [--nodes=N] $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
JAX_VERSION="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
JAX_GPU_EXTRA="${JAX_GPU_EXTRA:-jax[cuda12]==${JAX_VERSION}}"

# Install once, on the batch host, into the shared checkout.
bash launch/setup.sh
if ! .venv/bin/python -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "$JAX_GPU_EXTRA"
fi

# One task per node; each sees its node's GPUs. SIGTERM reaches every task through srun.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  .venv/bin/python -m tide_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
