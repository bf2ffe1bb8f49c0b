# GPU session script (issue 4), GPU 0 (GPU=N for another): where the float32 mismatches of
# the compiled FlexAttention step come from. On 2026-11-30 the main study's byte n = 8 model,
# decoded at batch 4 in float32 with compiled, graphed flex steps, gave other tokens than
# plain decoding in 8 of 8 sequences (drafts accepted 11% of the time against 72% in
# bf16), while the compiled kernel alone was exact at that shape (benchmarks/flex_check.py;
# docs/decoding.md). Then the same model (n8_ready, env.sh) and decode-bench on 8 held-out
# code prompts of 256 bytes, 128 new bytes, one factor changed at a time. Every row is
# audited against the fastest plain decoder of its benchmark, so in float32 any mismatch
# is a defect. A call cut short resumes in the next (each benchmark whose JSON is missing).
#   bash experiments/gpu/12_flex_audit.sh
source experiments/gpu/env.sh
D=runs/flex_audit
mkdir -p $D
# First, while the CPUs prepare the corpus: the kernel alone and whole decoders on random
# weights of this shape (benchmarks/flex_check.py --decoder). If they reproduce the
# mismatch, the trained model is not needed to find its cause.
[ -f $D/flex_check.json ] || (CUDA_VISIBLE_DEVICES=${GPU:-0} timeout $(left) python3 benchmarks/flex_check.py --decoder \
  --json $D/flex_check.json > $D/flex_check.log 2>&1) &
NO_SMOKE=1 n8_ready $D || exit 0  # trained on in the next call
A=(--prompts code --cache-block 2048 --heads 1,8 --n-prompts 8 --prompt-len 256 --max-new 128)
C=(${FLAGS---cuda-graphs --compile}); U=(${UNCOMPILED---cuda-graphs})  # a CPU rehearsal sets both empty
# the failing case, with cuDNN beside it: is the plain flex step wrong too, or only the verify step?
bench_n8 $D f32_b4 "${A[@]}" "${C[@]}" --batch-sizes 4 --dtype float32 --attention auto,flex
# batch 1 (the bf16 batch-1 runs were right)
bench_n8 $D f32_b1 "${A[@]}" "${C[@]}" --batch-sizes 1 --dtype float32 --attention flex
# the decoding kernel's cache split (PyTorch's choice above; 4 in the batch-16 runs)
bench_n8 $D f32_b4_split4 "${A[@]}" "${C[@]}" --batch-sizes 4 --dtype float32 --attention flex --flex-split-kv 4
# bf16 at batch 4: mismatches there must be ties (top-2 logit gap within bf16 rounding)
bench_n8 $D bf16_b4 "${A[@]}" "${C[@]}" --batch-sizes 4 --dtype bfloat16 --attention auto,flex
# not compiled (graphs of FlexAttention's unfused reference): is it the compilation?
bench_n8 $D f32_b4_uncompiled "${A[@]}" "${U[@]}" --batch-sizes 4 --dtype float32 --attention flex
pack flex_audit $D $N8_RUN
