# GPU call 1 of the main study's 2026-11-30 pass (2 H200s, under 10 minutes): the main study
# again, with its evaluations this time. This call: a one-minute check of the
# CUDA-graphed and compiled decoding paths on GPU 0 (graph_smoke.sh) while the CPUs
# prepare python-env; then the nine training runs of experiments/sweeps/main_h200x2.yaml
# (1e8 bytes each), their time limit set to what is left of the call.
source experiments/gpu/env.sh
(CUDA_VISIBLE_DEVICES=0 timeout 240 bash experiments/gpu/graph_smoke.sh /tmp/graph_smoke > "$OUT/graph_smoke.log" 2>&1
 echo "graph smoke exit $?" >> "$OUT/graph_smoke.log"; tail -n 5 /tmp/graph_smoke.*.log >> "$OUT/graph_smoke.log") &
prepare_python_env
timeout $(left) bytelm sweep experiments/sweeps/main_h200x2.yaml --no-mlflow --stages train --only '*-s0' \
  --set train.time_limit_s=$(( $(left) - 35 )) > "$OUT/main_train.log" 2>&1
echo "sweep exit $? with $(left) s left" >> "$OUT/main_train.log"
wait
nvidia-smi > "$OUT/nvidia-smi.txt"
pack main_train runs/main_h200x2
