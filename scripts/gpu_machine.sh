#!/usr/bin/env bash
# One bytelm command on a bare GPU machine: a copy of this repository and a Python whose
# torch is the machine's own CUDA build, perhaps without internet or MLflow.
#
#   bash scripts/gpu_machine.sh [--wheels DIR] [--time-limit S] [--out DIR] [--pack DIR]... -- COMMAND [ARG]...
#
# 1. Installs the dependencies of pyproject.toml that the machine's Python lacks into
#    .gpu-site/ beside the repository ($GPU_SITE), never torch: from the wheels in DIR (--wheels, default
#    .whl/ when it exists; for a machine without internet) or else from the package index.
#    A dependency still missing is named; without mlflow, pass --no-mlflow to the command.
# 2. Runs COMMAND with this checkout on the path (`bytelm ...` is this checkout's bytelm),
#    under `timeout S` with --time-limit. A sweep stops cleanly at its own limit
#    (--set train.time_limit_s=...); --time-limit is the hard stop behind it.
# 3. Packs every --pack folder without its checkpoints into OUT/<folder name>.tgz (OUT:
#    --out, else $OUT, else out/), whatever the command's exit, and exits with the command's
#    status. Run the same command again to resume what a time limit stopped; elsewhere,
#    `bytelm track import runs/<sweep>` logs the unpacked folders into MLflow.
# Set BYTELM_GIT_COMMIT=<sha> where the machine's copy has no git history of its own (every
# run records it), and BYTELM_DATA_DIR to a copy of the benchmark data.
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/gpu_machine.sh [--wheels DIR] [--time-limit S] [--out DIR] [--pack DIR]... -- COMMAND [ARG]..." >&2; exit 2; }
PY=${PYTHON:-python3}
WHEELS=.whl LIMIT="" OUTDIR=${OUT:-out} PACK=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] && [ -d "$2" ] || { echo "gpu_machine.sh: --wheels needs a folder of wheels" >&2; exit 2; }; WHEELS=$2; shift 2 ;;
    --time-limit) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "gpu_machine.sh: --time-limit needs a whole number of seconds" >&2; exit 2; }; LIMIT=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; OUTDIR=$2; shift 2 ;;
    --pack) [ $# -ge 2 ] || usage; PACK+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ $# -gt 0 ] || usage
"$PY" -c "import torch" 2>/dev/null || { echo "gpu_machine.sh: $PY has no torch; this script uses the machine's own build" >&2; exit 2; }

SITE=${GPU_SITE:-$PWD/.gpu-site}  # where the missing dependencies go
missing() {  # the requirements of pyproject.toml that $PY does not satisfy, one a line
  PYTHONPATH=$SITE "$PY" - <<'PY'
import importlib.metadata as md, tomllib
from pip._vendor.packaging.requirements import Requirement
for r in map(Requirement, tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]):
    try:
        ok = r.specifier.contains(md.version(r.name), prereleases=True)
    except md.PackageNotFoundError:
        ok = False
    if not ok and r.name != "torch":
        print(r)
PY
}
mapfile -t need < <(missing)
if [ ${#need[@]} -gt 0 ]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  else
    "$PY" -m pip install -q --no-cache-dir --target "$SITE" "${need[@]}"
  fi
  mapfile -t need < <(missing)
  [ ${#need[@]} -eq 0 ] || echo "gpu_machine.sh: still missing: ${need[*]}" >&2
fi
mkdir -p "$SITE/bin" "$OUTDIR"
printf '#!/bin/sh\nexec "%s" -m bytelm "$@"\n' "$(command -v "$PY")" > "$SITE/bin/bytelm"
chmod +x "$SITE/bin/bytelm"
export PATH=$SITE/bin:$PATH PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ -n "$LIMIT" ]; then timeout --kill-after=30 "$LIMIT" "$@"; else "$@"; fi
status=$?
[ $status -ne 124 ] || echo "gpu_machine.sh: stopped at the time limit ($LIMIT s)" >&2
for d in "${PACK[@]}"; do
  if [ -d "$d" ]; then
    tar czf "$OUTDIR/$(basename "$d").tgz" --exclude=checkpoints "$d" || { [ $status -ne 0 ] || status=1; }
  else
    echo "gpu_machine.sh: nothing to pack at $d" >&2
  fi
done
exit $status
