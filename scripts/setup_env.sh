#!/usr/bin/env bash
# Creates .venv (once) and installs bytelm with its dependencies into it.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that
# the plain `torch>=2.11` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bytelm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      .venv/bin/python -m pip install -q "torch>=2.11"
    else
      # The CPU wheel; on the project's CPU machines this file lies on disk.
      .venv/bin/python -m pip install -q "torch==2.13.0" \
        || .venv/bin/python -m pip install -q "torch>=2.11" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
