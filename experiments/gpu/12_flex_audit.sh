# GPU session script (issue 4), two GPUs: is compiled flex decoding exact in float32, and
# what the block mask built from the positions (model.cache_block_mask, replacing
# create_block_mask's per-step reduction) does to the batch-16 verify step.
# On 2026-11-30 the main study's byte n = 8 model, decoded at batch 4 in float32 with
# compiled, graphed flex steps, gave other tokens than plain decoding in 8 of 8 sequences
# (drafts accepted 11% of the time against 72% in bf16), while the kernel alone was exact;
# on random weights (13_flex_diag.sh) every compiled step was exact.
#   bash experiments/gpu/12_flex_audit.sh     (a second call resumes what the first left)
# GPU 1, beside the training: the kernel alone with the new mask and whole decoders on
# random weights (flex_check.py), then the batch-16 step alone with its kernel profile.
# GPU 0: the byte n = 8 model (n8_ready), then on it: flex_check.py's step-by-step and
# twice-run decoder audit in float32, decode-bench's float32 audit (batch 4), and the
# batch-16 queue of 240 prompts in bf16. Each piece runs once: its JSON marks it done.
source experiments/gpu/env.sh
D=runs/flex_audit
mkdir -p $D
FC=(python3 benchmarks/flex_check.py --decoder --decoder-batches 4 --steps 4 --runs 2 --dtypes float32
    --decoder-variants flex+compile+graphs,auto+compile+graphs)
( export CUDA_VISIBLE_DEVICES=1
  [ -f $D/flex_check_random.json ] || timeout $(left) "${FC[@]}" --json $D/flex_check_random.json \
    > $D/flex_check_random.log 2>&1
  [ -f $D/step_b16.json ] || [ "$(left)" -lt 150 ] || timeout $(left) python3 benchmarks/decode_step.py --preset bytes-30m \
    --batch-sizes 16 --heads 1,8 --modes compile --attention auto,flex --flex-split-kv 0,4 --profile \
    --json $D/step_b16.json > $D/step_b16.log 2>&1 ) &
NO_SMOKE=1 n8_ready $D || { wait; pack flex_audit $D $N8_RUN; exit 0; }  # trained on in the next call
[ -f $D/flex_check_trained.json ] || [ "$(left)" -lt 120 ] || timeout $(left) "${FC[@]}" --no-kernels \
  --checkpoint $D/checkpoints/n8 --json $D/flex_check_trained.json > $D/flex_check_trained.log 2>&1
A=(--cuda-graphs --compile --prompts code --cache-block 2048 --heads 1,8)
bench_n8 $D f32_b4 "${A[@]}" --batch-sizes 4 --n-prompts 8 --prompt-len 256 --max-new 128 --dtype float32 --attention auto,flex
bench_n8 $D b16_queue240 "${A[@]}" --batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 --attention auto,flex \
  --repeats 3 --flex-split-kv 4
bench_n8 $D f32_b1 "${A[@]}" --batch-sizes 1 --n-prompts 8 --prompt-len 256 --max-new 128 --dtype float32 --attention flex
wait
pack flex_audit $D $N8_RUN
