# GPU call 3 (2 H200s, under 10 minutes): the main study's evaluations on GPU 0
# and its decoding benchmarks on GPU 1, alone there so that their timings are clean;
# then the decoding step's attention kernels (benchmarks/decode_step.py).
source experiments/gpu/env.sh
SPEC=experiments/sweeps/main_h200x2.yaml
timeout ${EVAL_LIMIT:-520} bytelm sweep $SPEC --no-mlflow --stages eval --devices cuda:0,cuda:0,cuda:0 \
  > "$OUT/main_eval.log" 2>&1 &
(timeout ${BENCH_LIMIT:-440} bytelm sweep $SPEC --no-mlflow --stages bench --devices cuda:1 > "$OUT/main_bench.log" 2>&1
 CUDA_VISIBLE_DEVICES=1 timeout 60 python3 benchmarks/decode_step.py --preset bytes-100m --modes graphs \
   --attention auto,efficient,math --json "$OUT/decode_step_attention.json" > "$OUT/decode_step.log" 2>&1) &
wait
pack main_eval runs/main_h200x2
for arm in bytes bpe; do
  tar cJf "$OUT/main_${arm}_samples.tar.xz" runs/main_h200x2/runs/$arm-*/eval/*.results.jsonl 2>/dev/null
done
