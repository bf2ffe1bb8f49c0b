# GPU calls 2 and 3 of the main study's 2026-11-30 pass (2 H200s, under 10 minutes each,
# right after call 1 on the same machine, whose checkpoints they read). Each call does
# what is left, in this order, until its time is up:
# 1. the main study's evaluations (sweep --stages eval: two at a time per GPU, each task its
#    own command and JSON; a run whose stage finished, or a task whose JSON is there, is
#    skipped). On 2026-11-30 all nine ran at once: the GPU is their bottleneck, so they
#    took as long as in turn, and a call that ended first kept none; two per GPU land
#    results as they go;
# 2. then, each GPU alone so that its timings are clean:
#    GPU 0: the compiled decoding measurement on the byte n = 8 model: decode-bench with compiled and
#      CUDA-graphed steps, attention auto and flex, heads 1 and 8, batch 1 then batch 16,
#      then a float32 equality audit of the compiled flex step;
#    GPU 1: the sweep's decoding benchmarks (CUDA graphs), one run at a time, the runs
#      that decide a finding first.
# A benchmark cut short writes nothing (its JSON is written whole) and runs again next call.
# EVAL=0 leaves step 1 out (runs trained again only for their benchmarks: their evaluations
# were done on the 2026-11-30 pass, docs/results/main/README.md).
source experiments/gpu/env.sh
SPEC=experiments/sweeps/main_h200x2.yaml
RUNS=runs/main_h200x2/runs
[ -f $RUNS/bytes-n8-unembed-s0/config.yaml ] || { echo "no trained runs here: a fresh machine" > "$OUT/main_eval.log"; exit 1; }
if [ "${EVAL:-1}" != 0 ]; then
  timeout $(left) bytelm sweep $SPEC --no-mlflow --stages eval --only '*-s0' --devices cuda:0,cuda:1,cuda:0,cuda:1 \
    >> "$OUT/main_eval.log" 2>&1
  echo "eval sweep exit $? with $(left) s left" >> "$OUT/main_eval.log"
fi

D4=runs/decode4  # its own folder (symlinked checkpoint), so its metrics do not mix with the sweep's bench
link_n8 $D4 $RUNS/bytes-n8-unembed-s0
spec4() {  # BATCH [extra decode-bench flags]
  local b=$1; shift
  CUDA_VISIBLE_DEVICES=0 bench_n8 $D4 b$b --cuda-graphs --compile --prompts code --n-prompts 16 --prompt-len 512 \
    --max-new 512 --cache-block 2048 --heads 1,8 --batch-sizes $b "$@"
}
(spec4 1 --attention auto,flex; spec4 16 --attention auto,flex; spec4 4 --attention flex --dtype float32 --n-prompts 8 --prompt-len 256 --max-new 128) &
for r in bytes-n8-unembed-s0 bpe-n4-transformer-s0 bytes-n16-unembed-s0 bpe-n2-transformer-s0 bytes-n32-unembed-s0 \
         bpe-n8-transformer-s0 bpe-n6-transformer-s0 bytes-n1-unembed-s0 bpe-n1-transformer-s0; do
  [ "$(left)" -gt 90 ] || break
  timeout $(left) bytelm sweep $SPEC --no-mlflow --stages bench --devices cuda:1 --only $r >> "$OUT/main_bench.log" 2>&1
done
wait
pack main_eval_bench runs/main_h200x2 $D4
for arm in bytes bpe; do pack_samples main_${arm}_samples $RUNS/$arm-*-s0/eval/*.results.jsonl; done
