#!/usr/bin/env bash
# Training-step cost of the MTP options on the ~100M byte configuration, on one GPU:
# unembed / transformer / sequential heads at n = 2 and 4 against n = 1, and the first stage
# of a forward curriculum at n = 4 (heads 2..4 at weight 0, skipped by the loss).
#   bash scripts/gpu_machine.sh -- bash records/2026-12-07_mtp-options/run.sh
# Results in $OUT (raw JSON and the printed table).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 benchmarks/train_bench.py --preset mtp --steps 10 --warmup 3 --json "$OUT/train_bench_mtp.json" 2>&1 | tee "$OUT/train_bench_mtp.log"
