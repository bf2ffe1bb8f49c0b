# GPU script, two GPUs, two calls back to back: the decoding measurements
# with the fixed step. Earlier on 2026-11-30 a change fixed compiled flex decoding's float32
# mismatch (model.materialise: Inductor read the verify step's queries with the wrong
# strides; found with 13_flex_diag.sh) and built the step's block mask from the positions
# (model.cache_block_mask). It audited float32 at batch 4 and timed the step alone
# (records/2026-11-30_flex-float32-fix); the runs below were cut by that call's time limit.
#   bash experiments/gpu/12_flex_audit.sh     (the second call resumes what the first left)
# GPU 0: the byte n = 8 model (n8_ready), then the batch-1 benchmark of the efficiency target
# (bf16, 16 code prompts of 512 bytes, 512 new) and the batch-16 queue of 240 prompts.
# GPU 1: the batch-16 step alone at the queue run's cache fill; once the model is trained,
# the float32 audits at batch 1 and at batch 16 (32 prompts through 16 slots). Each piece runs once: its JSON marks it done.
source experiments/gpu/env.sh
D=runs/flex_audit
mkdir -p $D
A=(${FLAGS---cuda-graphs --compile} --prompts code --cache-block 2048 --heads 1,8)  # a CPU rehearsal sets FLAGS=
# (disowned: n8_ready's `wait` is for its own background work, not this)
( export CUDA_VISIBLE_DEVICES=1
  # the step alone with the cache three quarters full, the queue run's mean (rows at
  # 513..1,033 of 1,033): a candidate for what a run adds to the half-full step benchmark
  [ -f $D/step_b16_fill75.json ] || timeout $(left) python3 benchmarks/decode_step.py --preset bytes-30m \
    --batch-sizes 16 --heads 1,8 --modes compile --attention auto,flex --flex-split-kv 4 --fill 0.75 \
    --json $D/step_b16_fill75.json > $D/step_b16_fill75.log 2>&1
  while [ ! -e $D/checkpoints/n8 ] && [ "$(left)" -gt 120 ]; do sleep 5; done  # n8_ready, on GPU 0
  bench_n8 $D f32_b1 "${A[@]}" --batch-sizes 1 --n-prompts 8 --prompt-len 256 --max-new 128 --dtype float32 \
    --attention flex
  bench_n8 $D f32_b16 "${A[@]}" --batch-sizes 16 --n-prompts 32 --prompt-len 256 --max-new 128 --dtype float32 \
    --attention auto,flex --flex-split-kv 4 ) &
GPU1=$!
disown
gpu1_done() { while kill -0 $GPU1 2>/dev/null; do sleep 2; done; }
NO_SMOKE=1 n8_ready $D || { gpu1_done; pack flex_audit $D $N8_RUN; exit 0; }  # trained on in the next call
bench_n8 $D b1 "${A[@]}" --batch-sizes 1 --n-prompts 16 --prompt-len 512 --max-new 512 --attention auto,flex --repeats 3
bench_n8 $D b16_queue240 "${A[@]}" --batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 --attention auto,flex \
  --repeats 3 --flex-split-kv 4
gpu1_done
pack flex_audit $D $N8_RUN
