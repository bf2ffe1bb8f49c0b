# GPU session script (issue 4), two GPUs: compiled flex decoding audited in float32 after
# its fix (model.materialise: Inductor read the 8-query verify step's queries with the wrong
# strides, 13_flex_diag.sh), and the batch-16 costs with the block mask built from the
# positions (model.cache_block_mask, replacing create_block_mask's per-step reduction).
#   bash experiments/gpu/12_flex_audit.sh     (a second call resumes what the first left)
# GPU 1, beside the training: the batch-16 step alone with its kernel profile
# (decode_step.py), then in float32 the kernel alone and whole decoders on random weights,
# plain and 8 heads, each run twice (flex_check.py), then decode-bench's float32 audit of
# the trained model at batch 4 once GPU 0 has trained it.
# GPU 0: the byte n = 8 model (n8_ready), then on it the batch-16 queue of 240 prompts in
# bf16 and the float32 audit at batch 1. Each
# piece runs once: its JSON marks it done.
source experiments/gpu/env.sh
D=runs/flex_audit
mkdir -p $D
A=(--cuda-graphs --compile --prompts code --cache-block 2048 --heads 1,8)
# (disowned: n8_ready's `wait` is for its own background work, not this)
( export CUDA_VISIBLE_DEVICES=1
  [ -f $D/step_b16.json ] || timeout $(left) python3 benchmarks/decode_step.py --preset bytes-30m \
    --batch-sizes 16 --heads 1,8 --modes compile --attention auto,flex --flex-split-kv 0,4 --profile \
    --json $D/step_b16.json > $D/step_b16.log 2>&1
  [ -f $D/flex_check_random.json ] || timeout $(left) python3 benchmarks/flex_check.py --queries 1,8,9 --cache 393 \
    --options none,split4 --q-layouts bthd --decoder --decoder-batches 4 --runs 2 --dtypes float32 \
    --decoder-variants flex+compile+graphs,auto+compile+graphs --json $D/flex_check_random.json \
    > $D/flex_check_random.log 2>&1
  while [ ! -e $D/checkpoints/n8 ] && [ "$(left)" -gt 120 ]; do sleep 5; done  # n8_ready, on GPU 0
  bench_n8 $D f32_b4 "${A[@]}" --batch-sizes 4 --n-prompts 8 --prompt-len 256 --max-new 128 --dtype float32 \
    --attention auto,flex ) &
GPU1=$!
disown
gpu1_done() { while kill -0 $GPU1 2>/dev/null; do sleep 2; done; }
NO_SMOKE=1 n8_ready $D || { gpu1_done; pack flex_audit $D $N8_RUN; exit 0; }  # trained on in the next call
bench_n8 $D b16_queue240 "${A[@]}" --batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 --attention auto,flex \
  --repeats 3 --flex-split-kv 4
bench_n8 $D f32_b1 "${A[@]}" --batch-sizes 1 --n-prompts 8 --prompt-len 256 --max-new 128 --dtype float32 --attention flex
gpu1_done
pack flex_audit $D $N8_RUN
