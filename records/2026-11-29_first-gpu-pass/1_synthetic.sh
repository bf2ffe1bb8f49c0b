# GPU call 1 (2 H200s, under 10 minutes): the synthetic studies on both GPUs
# while the CPUs prepare the main study's corpus for call 2.
source experiments/gpu/env.sh
(bytelm prepare --source python-env --out data/python-env --workers 12 > "$OUT/prepare.log" 2>&1
 echo "prepare exit $?" >> "$OUT/prepare.log") &
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/synth_data.log"
bytelm synth induction --out data/synth/induction >> "$OUT/synth_data.log" 2>&1
# steps cut to fit one call (docs/results/synthetic/report.md gives the budget)
S="--no-mlflow --set train.time_limit_s=400"
timeout 500 bytelm sweep experiments/sweeps/induction.yaml $S --set train.steps=600 \
  --devices cuda:0,cuda:1,cuda:0,cuda:1,cuda:0,cuda:1 > "$OUT/induction.log" 2>&1 &
timeout 500 bytelm sweep experiments/sweeps/induction_bytes.yaml $S --set train.steps=400 --only '*-s0' \
  --devices cuda:1,cuda:0 > "$OUT/induction_bytes.log" 2>&1 &
(bytelm synth poly --out data/synth/poly >> "$OUT/synth_data.log" 2>&1
 timeout 470 bytelm sweep experiments/sweeps/poly.yaml $S --set train.steps=1200 --only '30M*' \
   --devices cuda:0,cuda:1,cuda:0 > "$OUT/poly.log" 2>&1) &
wait
pack synthetic runs/induction runs/induction_bytes runs/poly
tar czf "$OUT/python_env.tgz" data/python-env/manifest.json data/python-env/*/*/meta.json data/python-env/bpe/tokenizer.json
