# GPU session call 1 (2 H200s, under 10 minutes): the synthetic studies on both GPUs
# while the CPUs prepare the main study's corpus for call 2.
source experiments/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
(bytelm prepare --source python-env --out data/python-env --workers 12 > "$OUT/prepare.log" 2>&1
 echo "prepare exit $?" >> "$OUT/prepare.log") &
bytelm synth induction --out data/synth/induction > "$OUT/synth_data.log" 2>&1
S="--no-mlflow --set train.time_limit_s=${SYNTH_LIMIT:-420}"
timeout 500 bytelm sweep experiments/sweeps/induction.yaml $S --set train.steps=600 \
  --devices cuda:0,cuda:1,cuda:0,cuda:1 > "$OUT/induction.log" 2>&1 &
timeout 500 bytelm sweep experiments/sweeps/induction_bytes.yaml $S --set train.steps=600 --only '*-s0' \
  --devices cuda:1,cuda:0 > "$OUT/induction_bytes.log" 2>&1 &
(bytelm synth poly --out data/synth/poly >> "$OUT/synth_data.log" 2>&1
 timeout 470 bytelm sweep experiments/sweeps/poly.yaml $S --set train.steps=1500 --only '30M*' \
   --devices cuda:0,cuda:1,cuda:0 > "$OUT/poly.log" 2>&1) &
wait
pack synthetic runs/induction runs/induction_bytes runs/poly
cp data/python-env/manifest.json "$OUT/" 2>/dev/null; cp data/python-env/*/meta.json "$OUT/" 2>/dev/null
ls data/python-env/*/ > "$OUT/python_env_files.txt" 2>&1
