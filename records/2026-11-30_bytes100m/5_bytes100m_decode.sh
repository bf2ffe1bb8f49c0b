# GPU call 2 of 2026-11-30 (2 H200s, under 10 minutes; right after call 1, whose
# checkpoints it reads): self-speculative decoding of the trained ~100M byte n = 8 model
# against the best plain decoder: compiled and CUDA-graphed steps, attention
# auto (SDPA, boolean mask) and flex (FlexAttention), 16 code prompts of 512 bytes, 512 new
# bytes, batch 1 on GPU 0 and batch 16 on GPU 1. Then on GPU 0: the step costs of a random
# 100M model (benchmarks/decode_step.py) and a float32 equality audit of the compiled
# FlexAttention step.
source experiments/gpu/env.sh
B="bytelm decode-bench --checkpoint runs/bytes100m/n8 --cuda-graphs --compile --attention auto,flex --prompts code
   --n-prompts 16 --prompt-len 512 --max-new 512 --cache-block 2048 --heads 1,8"
CUDA_VISIBLE_DEVICES=1 timeout 560 $B --batch-sizes 16 --json "$OUT/decode_b16.json" > "$OUT/decode_b16.log" 2>&1 &
(CUDA_VISIBLE_DEVICES=0 timeout 300 $B --batch-sizes 1 --json "$OUT/decode_b1.json" > "$OUT/decode_b1.log" 2>&1
 CUDA_VISIBLE_DEVICES=0 timeout 90 bytelm decode-bench --checkpoint runs/bytes100m/n8 --cuda-graphs --compile --attention flex \
   --dtype float32 --prompts code --n-prompts 8 --prompt-len 256 --max-new 128 --cache-block 2048 --heads 1,8 --batch-sizes 4 \
   --json "$OUT/decode_flex_float32.json" > "$OUT/decode_flex_float32.log" 2>&1
 CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/decode_step.py --preset bytes-100m --cache 1024 --modes compile \
   --attention auto,flex --batch-sizes 1,16 --heads 1,8 --json "$OUT/decode_step_flex.json" > "$OUT/decode_step.log" 2>&1) &
wait
pack bytes100m_decode runs/bytes100m
