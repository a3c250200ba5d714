#!/usr/bin/env bash
# Creates (or reuses) .venv: Python 3.11, the exact pins of requirements.txt, and the JAX
# build of an accelerator. Idempotent: a second run only checks a stamp.
#
#   bash launch/setup.sh        CPU (tests, the smoke run)
#   bash launch/setup.sh tpu    + jax[tpu] of the pinned version (TPU VM workers)
#   bash launch/setup.sh gpu    + jax[cuda12] of the pinned version (run it on a machine
#                               with network access, e.g. a SLURM login node)
#
# Python 3.11 is required: jax 0.10.2 declares Requires-Python >=3.11 and numpy 2.4.6 has no
# 3.10 wheels. The first of $PYTHON, python3.11, python3 that is 3.11 and has its venv
# module is used. Without one, PROVISION_PYTHON=1 installs uv (pinned below, `pip install
# --user`) and lets it download a standalone CPython 3.11 build into ~/.local/share/uv
# (launch/tpu_vm.sh sets it: TPU VM images ship an older system Python and may lack
# python3-venv); otherwise the script stops with one sentence.
# torch: on TPU and GPU hosts it comes from the PyTorch CPU wheel index (TORCH_INDEX): it
# only serves reference models and tests there, and PyPI's default Linux wheel pulls in
# several GiB of CUDA libraries. The CPU setup (tests, CI) takes it from PyPI.
# Environment: JAX_TPU_EXTRA, JAX_GPU_EXTRA (the accelerator's pip requirement).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCELERATOR="${1:-cpu}"
case "$ACCELERATOR" in
  cpu | tpu | gpu) ;;
  *)
    echo "error: unknown accelerator '$ACCELERATOR'; use cpu, tpu or gpu." >&2
    exit 2
    ;;
esac
UV_VERSION=0.13.8
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
LIBTPU_RELEASES=https://storage.googleapis.com/jax-releases/libtpu_releases.html
JAX_VERSION="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"

is_python311() { # a 3.11 interpreter whose venv module can create environments with pip
  "$1" -c 'import sys, ensurepip, venv; sys.exit(sys.version_info[:2] != (3, 11))' \
    >/dev/null 2>&1
}

provision_uv() { # prints the path of a uv binary of UV_VERSION
  if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    command -v uv
    return
  fi
  python3 -m pip install --user --quiet "uv==$UV_VERSION" >&2 ||
    python3 -m pip install --user --quiet --break-system-packages "uv==$UV_VERSION" >&2 || {
    echo "error: could not install uv with '$(command -v python3) -m pip'; install Python 3.11 with its venv module by hand." >&2
    exit 2
  }
  echo "$HOME/.local/bin/uv"
}

if [ -x .venv/bin/python ] &&
  ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "[setup] .venv runs $(.venv/bin/python -V 2>&1), not Python 3.11; recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  PY=""
  for candidate in "${PYTHON:-}" python3.11 python3; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && is_python311 "$candidate"; then
      PY="$candidate"
      break
    fi
  done
  if [ -n "$PY" ]; then
    echo "[setup] creating .venv with $("$PY" -V 2>&1)"
    "$PY" -m venv .venv
  elif [ "${PROVISION_PYTHON:-0}" = "1" ]; then
    echo "[setup] no Python 3.11 with venv here (python3 is $(python3 -V 2>&1 || echo missing)); provisioning CPython 3.11 with uv $UV_VERSION"
    UV="$(provision_uv)"
    "$UV" python install 3.11
    "$UV" venv --seed --python 3.11 .venv
  else
    echo "error: launch/setup.sh needs Python 3.11 with its venv module (jax $JAX_VERSION requires >=3.11, numpy 2.4.6 has no 3.10 wheels) but found $(python3 -V 2>&1 || echo 'no python3'); install python3.11 and python3.11-venv, or rerun with PROVISION_PYTHON=1 to download one with uv." >&2
    exit 2
  fi
fi

stamp=.venv/.requirements.sha256
want="$(sha256sum requirements.txt | cut -d' ' -f1) $ACCELERATOR"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date ($ACCELERATOR)"
  exit 0
fi
echo "[setup] installing requirements.txt ($ACCELERATOR) into .venv (first run takes a few minutes)"
PIP=(.venv/bin/python -m pip install --quiet)
"${PIP[@]}" --upgrade pip
if [ "$ACCELERATOR" != cpu ]; then
  "${PIP[@]}" "$(grep -E '^torch==' requirements.txt)" --index-url "$TORCH_INDEX"
fi
"${PIP[@]}" -r requirements.txt
case "$ACCELERATOR" in
  tpu) "${PIP[@]}" "${JAX_TPU_EXTRA:-jax[tpu]==$JAX_VERSION}" -f "$LIBTPU_RELEASES" ;;
  gpu) "${PIP[@]}" "${JAX_GPU_EXTRA:-jax[cuda12]==$JAX_VERSION}" ;;
esac
echo "$want" >"$stamp"
