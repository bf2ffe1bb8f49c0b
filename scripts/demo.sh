#!/usr/bin/env bash
# The main job: installs what it needs, then runs the demo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MLFLOW_DISABLE_TELEMETRY=true
exec .venv/bin/bytelm demo "$@"
