# GPU script, two GPUs, one call: the efficiency targets again, flex only.
# The first two calls of 12_flex_audit.sh (2026-11-30) measured efficiency 0.83 at
# batch 1 (target 0.85) and 0.77 at batch 16 with a queue of 240 (target 0.80), with the
# fixed step; but a row's statistics came from the first timed run and its wall time from
# the median (runs 7% apart): decode-bench now keeps the median run whole. cuDNN (auto)
# lost at both batch sizes, so only flex runs here, with more repeats.
#   bash experiments/gpu/14_efficiency.sh
# GPU 1, while GPU 0 trains the byte n = 8 model: Inductor's code and a profile of the
#   batch-16 verify step alone (the 4 µs-a-layer kernel of 8-position steps).
# Then GPU 0: batch 1 (16 prompts 512/512, 5 repeats); GPU 1: the batch-16 queue of 240
#   with each finished slot refilled at once (--refill-min 1), then the default refill.
source experiments/gpu/env.sh
D=runs/efficiency
mkdir -p $D
A=(${FLAGS---cuda-graphs --compile} --prompts code --cache-block 2048 --heads 1,8 --attention flex)  # a CPU rehearsal sets FLAGS=
# (disowned: n8_ready's `wait` is for its own background work, not this)
( export CUDA_VISIBLE_DEVICES=1
  [ -f $D/step_b16_h8.json ] || [ -n "${FLAGS+set}" ] || TORCH_LOGS=output_code timeout $(left) python3 benchmarks/decode_step.py \
    --preset bytes-30m --batch-sizes 16 --heads 8 --modes compile --attention flex --flex-split-kv 4 --profile \
    --json $D/step_b16_h8.json > $D/step_b16_h8.log 2>&1
  while [ ! -e $D/checkpoints/n8 ] && [ "$(left)" -gt 120 ]; do sleep 5; done  # n8_ready, on GPU 0
  bench_n8 $D b16_queue240_refill1 "${A[@]}" --batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 \
    --repeats 3 --flex-split-kv 4 --refill-min 1
  bench_n8 $D b16_queue240 "${A[@]}" --batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 \
    --repeats 3 --flex-split-kv 4 ) &
GPU1=$!
disown
gpu1_done() { while kill -0 $GPU1 2>/dev/null; do sleep 2; done; }
NO_SMOKE=1 n8_ready $D || { gpu1_done; pack efficiency $D $N8_RUN; exit 0; }
bench_n8 $D b1 "${A[@]}" --batch-sizes 1 --n-prompts 16 --prompt-len 512 --max-new 512 --repeats 5
gpu1_done
pack efficiency $D $N8_RUN
