# One GPU call (2 H200s, under 10 minutes) of a synthetic study: builds the task's
# data where this machine lacks it, then trains the sweep's runs with the given steps,
# their time limit what is left of the call after a margin for the synthetic evaluations,
# then evaluates them. Usage (from the repository root of the GPU machine):
#   bash experiments/gpu/10_synthetic_sweep.sh SPEC STEPS [GLOB]
# e.g. experiments/sweeps/induction.yaml 1000, or experiments/sweeps/poly.yaml 2500 '30M*'.
# A run its time limit stopped is evaluated at its last checkpoint and the report says so;
# a later call with the same arguments resumes what did not finish.
source experiments/gpu/env.sh
SPEC=${1:?usage: 10_synthetic_sweep.sh SPEC STEPS [GLOB]}; STEPS=${2:?steps per run}; ONLY=${3:+--only $3}
# every run at once (SLOTS runs a GPU, default 8 on each of GPUS 0 and 1: these models are
# small), so that one time limit fits all; GPUS=1 SLOTS=16 leaves GPU 0 to 11_decode_b16.sh
GPUS=${GPUS:-0 1}; SLOTS=${SLOTS:-8}
DEVICES=${DEVICES:-$(for _ in $(seq $SLOTS); do for g in $GPUS; do printf 'cuda:%s,' $g; done; done)}
DEVICES=${DEVICES%,}
read -r TASK ROOT < <(python3 -c "
import sys; from bytelm.sweep.spec import load_spec; from bytelm.sweep.plan import plan_sweep
spec = load_spec(sys.argv[1]); print(spec.synth.task, plan_sweep(spec)[0].data_root)" "$SPEC") || exit 1
NAME=$(basename "$SPEC" .yaml)
[ -f $ROOT/manifest.json ] || bytelm synth $TASK --out $ROOT > "$OUT/${TASK}_data.log" 2>&1 || exit 1
timeout $(left) bytelm sweep "$SPEC" --no-mlflow --stages train $ONLY --devices $DEVICES --set train.steps=$STEPS \
  --set train.time_limit_s=$(( $(left) - ${EVAL_MARGIN_S:-90} )) > "$OUT/${NAME}_train.log" 2>&1
echo "train sweep exit $? with $(left) s left" >> "$OUT/${NAME}_train.log"
timeout $(left) bytelm sweep "$SPEC" --no-mlflow --stages synth $ONLY --devices $DEVICES > "$OUT/${NAME}_synth.log" 2>&1
echo "synth sweep exit $? with $(left) s left" >> "$OUT/${NAME}_synth.log"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
pack "$NAME" runs/$NAME
