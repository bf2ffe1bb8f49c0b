# GPU session call (2 H200s, under 10 minutes): the main study's second seed for the
# comparisons that decide a finding (byte n = 8 against n = 1, BPE n = 4 against n = 1;
# the `include` runs of experiments/sweeps/main_h200x2.yaml, `--only '*-s1'`): one byte and
# one BPE run per GPU, on the corpus already prepared (prepared again on a fresh machine),
# then their evaluations with what is left of the call (each task its own command:
# HumanEval lands first, MBPP if the time allows).
source experiments/gpu/env.sh
SPEC=experiments/sweeps/main_h200x2.yaml
prepare_python_env
timeout $(left) bytelm sweep $SPEC --no-mlflow --stages train --only '*-s1' \
  --set train.time_limit_s=$(( $(left) - 35 )) > "$OUT/seeds_train.log" 2>&1
echo "sweep exit $? with $(left) s left" >> "$OUT/seeds_train.log"
timeout $(left) bytelm sweep $SPEC --no-mlflow --stages eval --only '*-s1' > "$OUT/seeds_eval.log" 2>&1
echo "eval sweep exit $? with $(left) s left" >> "$OUT/seeds_eval.log"
pack main_seeds runs/main_h200x2/runs/*-s1
pack_samples main_seeds_samples runs/main_h200x2/runs/*-s1/eval/*.results.jsonl
