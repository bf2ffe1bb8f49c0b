#!/usr/bin/env bash
# The test command: installs what it needs (scripts/setup_env.sh), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The Slurm tests need a real one-node cluster (scripts/slurm_cluster.sh): Debian's slurm-wlm
# and munge. They are installed only in CI (root, CI=true), never on a user's machine
# unasked; elsewhere those tests are skipped with the reason.
if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
export MLFLOW_DISABLE_TELEMETRY=true
# Two pytest workers on two cores: one thread each (torch's default of one thread per core
# made every worker, and the subprocesses tests start, several times slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@"
