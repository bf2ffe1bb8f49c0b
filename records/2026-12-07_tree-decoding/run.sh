#!/usr/bin/env bash
# Chain against trees of 16, 32 and 64 nodes on a ~100M byte n = 8 model, on one GPU, in one
# call: prepare the python-env corpus (byte arm only), train for what the budget leaves,
# tree-fit, then decode-bench at batch 1 and at batch 16 with a queue of prompts.
#   BUDGET=380 B16_PROMPTS=240 MAX_NEW=256 bash scripts/gpu_machine.sh -- bash records/2026-12-07_tree-decoding/run.sh
# From the repository root; results in $OUT. BUDGET: seconds for the whole script; the
# benchmarks get TAIL of them (default 190), training the rest after the corpus.
# MAX_BYTES caps the corpus (default 100 MB); COMPILE=false trains eagerly (a short run
# loses less to compilation than it gains). If the batch-1 bench fails with CUDA graphs,
# both benches run again without them (the log says so).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
RUN=runs/tree100m
T0=$(date +%s); left() { echo $(( ${BUDGET:-380} - ($(date +%s) - T0) )); }
mark() { echo "$1 exit $2 at $(( $(date +%s) - T0 )) s" | tee -a "$OUT/timeline.txt"; }
TAIL=${TAIL:-190}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
BENCH=(--prompts code --cuda-graphs --heads 1,8 --tree 16,32,64 --prompt-len 512 --max-new ${MAX_NEW:-256} --cache-block 2048)
[ -f data/python-env/bytes/val/meta.json ] || timeout 120 bytelm prepare --source python-env --out data/python-env \
  --tokenizer bytes --max-bytes ${MAX_BYTES:-100000000} > "$OUT/prepare.log" 2>&1
mark prepare $?
timeout $(( $(left) - TAIL + 30 )) bytelm train --config experiments/configs/bytes_100m.yaml --run-dir $RUN \
  --set train.time_limit_s=$(( $(left) - TAIL )) --set train.checkpoint_every=100000 --set tracking.mlflow=false \
  --set train.compile=${COMPILE:-auto} \
  > "$OUT/train.log" 2>&1
mark train $?
timeout 30 bytelm tree-fit --checkpoint $RUN --nodes 64 --n-prompts 32 --max-new 256 > "$OUT/tree_fit.log" 2>&1
mark tree-fit $?
cp $RUN/checkpoints/*/trees.json "$OUT/trees.json" 2>/dev/null
timeout 40 bytelm decode-bench --checkpoint $RUN "${BENCH[@]}" --batch-sizes 1 --n-prompts ${B1_PROMPTS:-8} \
  --json "$OUT/decode_tree_b1.json" > "$OUT/bench_b1.log" 2>&1
rc=$?; mark "bench b1" $rc
if [ $rc -ne 0 ]; then
  EAGER=(); for a in "${BENCH[@]}"; do [ "$a" = --cuda-graphs ] || EAGER+=("$a"); done; BENCH=("${EAGER[@]}")
  echo "bench b1 failed with CUDA graphs; again without them" | tee -a "$OUT/timeline.txt"
  timeout 40 bytelm decode-bench --checkpoint $RUN "${BENCH[@]}" --batch-sizes 1 --n-prompts ${B1_PROMPTS:-8} \
    --json "$OUT/decode_tree_b1.json" > "$OUT/bench_b1_eager.log" 2>&1
  mark "bench b1 eager" $?
fi
timeout $(( $(left) - 3 )) bytelm decode-bench --checkpoint $RUN "${BENCH[@]}" --batch-sizes 16 \
  --n-prompts ${B16_PROMPTS:-240} --json "$OUT/decode_tree_b16.json" > "$OUT/bench_b16.log" 2>&1
mark "bench b16" $?
