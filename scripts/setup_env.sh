#!/usr/bin/env bash
# Creates .venv (once) and installs bytelm with its dependencies into it, saying what it
# installs and how long each part took; pip's own output goes to .venv/install.log.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that
# the plain `torch>=2.11` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=.venv/install.log

step() {  # step "what" command...: runs the command with its output in the log, then says how long it took
  local what=$1 t0=$SECONDS
  shift
  printf 'setup: %s ... ' "$what"
  if "$@" >>"$log" 2>&1; then
    echo "done in $((SECONDS - t0)) s"
  else
    echo "failed after $((SECONDS - t0)) s; the end of $log:"
    tail -n 20 "$log"
    return 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  echo "setup: created .venv with $("$PY" --version); installing bytelm into it (a few minutes the first time)"
fi
stamp=.venv/.bytelm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  : >"$log"
  step "upgrading pip" .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      step "installing torch (CUDA build, several GB)" .venv/bin/python -m pip install -q "torch>=2.11"
    else
      # The CPU wheel; on the project's CPU machines this file lies on disk.
      step "installing torch 2.13.0 (CPU build)" .venv/bin/python -m pip install -q "torch==2.13.0" \
        || step "installing torch (CPU build, from PyTorch's index)" \
             .venv/bin/python -m pip install -q "torch>=2.11" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  step "installing bytelm and its dependencies (MLflow, pandas, matplotlib, pytest, ...)" \
    .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
