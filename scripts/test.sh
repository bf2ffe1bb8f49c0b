#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup_env.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
