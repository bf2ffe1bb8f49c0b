#!/usr/bin/env bash
# Chain against trees of 16, 32 and 64 nodes on a ~100M byte n = 8 model, on one GPU.
#   bash records/2026-12-07_tree-decoding/run.sh train-b1   # prepare, train, tree-fit, batch 1
#   bash records/2026-12-07_tree-decoding/run.sh b16        # batch 16, 240-prompt queue (same machine)
# Run from the repository root through scripts/gpu_machine.sh's environment; results in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
RUN=runs/tree100m
T0=$(date +%s); left() { echo $(( ${BUDGET:-570} - ($(date +%s) - T0) )); }
BENCH=(--prompts code --cuda-graphs --heads 1,8 --tree 16,32,64 --prompt-len 512 --max-new 512 --cache-block 2048)
case ${1:-} in
  train-b1)
    [ -f data/python-env/bytes/val/meta.json ] || timeout 200 bytelm prepare --source python-env --out data/python-env \
      --tokenizer bytes --max-bytes 100000000 > "$OUT/prepare.log" 2>&1
    echo "prepare exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
    timeout $(( $(left) - 200 )) bytelm train --config experiments/configs/bytes_100m.yaml --run-dir $RUN \
      --set train.time_limit_s=$(( $(left) - 240 )) --set train.checkpoint_every=100000 --set tracking.mlflow=false \
      > "$OUT/train.log" 2>&1
    echo "train exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
    timeout 60 bytelm tree-fit --checkpoint $RUN --nodes 64 --n-prompts 64 --max-new 256 > "$OUT/tree_fit.log" 2>&1
    echo "tree-fit exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"
    cp $RUN/checkpoints/*/trees.json "$OUT/trees.json" 2>/dev/null
    timeout $(( $(left) - 5 )) bytelm decode-bench --checkpoint $RUN "${BENCH[@]}" --batch-sizes 1 --n-prompts 16 \
      --json "$OUT/decode_tree_b1.json" > "$OUT/bench_b1.log" 2>&1
    echo "bench b1 exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt" ;;
  b16)
    [ -d $RUN/checkpoints ] || { echo "no checkpoint: this machine is not the one that trained" | tee "$OUT/timeline.txt"; exit 1; }
    timeout $(( $(left) - 5 )) bytelm decode-bench --checkpoint $RUN "${BENCH[@]}" --batch-sizes 16 --n-prompts 240 \
      --json "$OUT/decode_tree_b16.json" > "$OUT/bench_b16.log" 2>&1
    echo "bench b16 exit $? at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt" ;;
  *) echo "usage: run.sh train-b1|b16" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
