#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup_env.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MLFLOW_DISABLE_TELEMETRY=true
# Two pytest workers on two cores: one thread each (torch's default of one thread per core
# made every worker, and the subprocesses tests start, several times slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
