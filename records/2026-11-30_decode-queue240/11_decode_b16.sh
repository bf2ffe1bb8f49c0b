# GPU script, GPU 0 only, beside a synthetic study on GPU 1 in the same call:
#   bash experiments/gpu/11_decode_b16.sh & GPUS=1 SLOTS=16 bash experiments/gpu/10_synthetic_sweep.sh SPEC STEPS; wait
# The main study's byte n = 8 model (bytes-n8-unembed-s0 of main_h200x2.yaml, trained here
# first where this machine lacks it) decoded at batch 16 the paper's way: a queue of prompts
# (240 here, what the call's time allows; 4,096 in the paper) streams
# through the 16 slots, so a finished row takes the next prompt instead of the batch
# waiting for its slowest row (occupancy 0.59 with 16 prompts on 2026-11-30:
# records/2026-11-30_main-study). Then a slice of MBPP sampled under two
# attention kernels, the float32 audit of the compiled FlexAttention step, and the batch-16
# step costs (all run on 2026-11-30: this record's README). A call cut short
# resumes in the next: the training from its checkpoint, each benchmark whose JSON is
# missing (the compilations come from inductor's cache on a warm machine).
source experiments/gpu/env.sh
D=runs/decode_b16
FLAGS=${FLAGS---cuda-graphs --compile}  # a CPU rehearsal sets FLAGS= and ATTENTION=auto
n8_ready $D || exit 0  # trained on in the next call
bench() { local name=$1; shift; bench_n8 $D $name $FLAGS --prompts code --cache-block 2048 --heads 1,8 "$@"; }
# flex split 4: its full-batch verify step costs 1.18 plain (cuDNN) steps, against 1.26 unsplit
# (records/2026-11-30_decode-b16-step)
QUEUE=(--batch-sizes 16 --n-prompts 240 --prompt-len 512 --max-new 512 --attention ${ATTENTION:-auto,flex} --repeats 3
       --flex-split-kv ${SPLIT:-4})
bench b16_queue240 "${QUEUE[@]}"
# evaluation's sampling with 8 heads over MBPP's long prompts, under the default cuDNN kernel
# and the memory-efficient one (cuDNN costs ~4x for 8 query positions): the summaries'
# decoding.<T>.ms_per_step say which kernel evaluation should use
for a in ${EVAL_KERNELS:-auto efficient}; do
  [ -f $D/eval_$a.json ] || [ "$(left)" -lt 120 ] || timeout $(left) bytelm eval --checkpoint $D/checkpoints/n8 --task mbpp \
    --max-problems 50 --n-samples 10 --temperatures 0.8 --max-new-tokens 512 --timeout 3 --attention $a \
    --json $D/eval_$a.json > $D/eval_$a.log 2>&1
done
bench b4_float32 --batch-sizes 4 --n-prompts 8 --prompt-len 256 --max-new 128 --attention ${ATTENTION:-flex} --dtype float32
# the queue again, each finished slot refilled at once (the default waits for 4 free slots,
# one prefill for the group): which costs less, idle slots or more prefills
bench b16_queue240_refill1 "${QUEUE[@]}" --refill-min 1
# where a batch-16 verify step's time goes (1.28 plain steps on 2026-11-30): the step alone
# on random weights of this shape, flex with and without splitting the cache, and the
# top kernels of one eager step
[ -f $D/step_b16.json ] || [ "$(left)" -lt 240 ] || timeout $(left) python3 benchmarks/decode_step.py --preset bytes-30m \
  --batch-sizes 16 --heads 1,8 --modes ${STEP_MODES:-compile} --attention ${ATTENTION:-auto,flex} --flex-split-kv 0,4 \
  --profile --json $D/step_b16.json > $D/step_b16.log 2>&1
pack decode_b16 $D $N8_RUN
