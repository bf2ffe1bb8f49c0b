# A minute's check that the GPU decoding paths work on this machine before the heavy work
# relies on them: a tiny byte n = 4 model trained for 40 steps, then decode-bench in
# float32 with CUDA graphs and with torch.compile, the compiled one with FlexAttention too
# (every mismatch must be 0: the captured prefills and steps against the eager reference),
# and a small HumanEval sampling run (speculative sampling from captured graphs). First,
# the compiled FlexAttention kernel alone against a float64 reference, and compiled flex
# decoders of the main study's byte shape on random weights (benchmarks/flex_check.py):
# on 2026-11-30 the main study's byte model decoded with compiled flex in float32 at batch 4
# gave other tokens than plain decoding (docs/decoding.md), while the kernel alone was exact.
# Usage: bash experiments/gpu/graph_smoke.sh DIR
set -e
D=${1:?usage: graph_smoke.sh DIR}
python3 benchmarks/flex_check.py --queries 1,8 --cache 393 --dtypes float32 --decoder --decoder-batches 4 --json "$D.flex_check.json" > "$D.flex_check.log" 2>&1 || echo "flex_check failed: $D.flex_check.log"
bytelm prepare --preset smoke --out "$D/data" --workers 2 > "$D.prepare.log" 2>&1
bytelm train --config experiments/configs/smoke.yaml --run-dir "$D/run" --set data.root="$D/data" \
  --set model.n_future=4 --set train.steps=40 --set train.device=auto --set tracking.mlflow=false > "$D.train.log" 2>&1
for mode in --cuda-graphs "--cuda-graphs --compile"; do
  # TORCH_LOGS=recompiles: what made a compiled step slow (2026-11-30: 38 plain steps at
  # batch 4). Set for the compiled mode only: an empty TORCH_LOGS fails torch's import (2.11)
  logs=(); attention=auto; [ "$mode" = --cuda-graphs ] || { logs=(env TORCH_LOGS=recompiles); attention=auto,flex; }
  "${logs[@]}" bytelm decode-bench --checkpoint "$D/run" $mode --dtype float32 --heads 1,4 --batch-sizes 1,4 --n-prompts 8 \
    --prompt-len 100 --max-new 48 --attention $attention --json "$D/bench.json"
  python3 - "$D/bench.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
bad = [(r["attention"], r["heads_used"], r["batch_size"], r["mismatched_sequences"]) for r in rows if r["mismatched_sequences"]]
print("smoke rows", len(rows), "mismatches", bad)
sys.exit(1 if bad or not rows else 0)
PY
done
bytelm eval --checkpoint "$D/run" --task humaneval --n-samples 4 --temperatures 0.8 --max-problems 8 --timeout 3 \
  --json "$D/eval.json"
echo "graph smoke passed"
