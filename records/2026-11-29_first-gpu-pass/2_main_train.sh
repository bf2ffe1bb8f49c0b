# GPU call 2 (2 H200s, under 10 minutes): trains the main study's nine runs
# (experiments/sweeps/main_h200x2.yaml) on the corpus call 1 prepared (prepared again
# if this machine is a fresh one).
source experiments/gpu/env.sh
prepare_python_env
timeout 570 bytelm sweep experiments/sweeps/main_h200x2.yaml --no-mlflow --stages train > "$OUT/main_train.log" 2>&1
echo "sweep exit $?" >> "$OUT/main_train.log"
nvidia-smi > "$OUT/nvidia-smi.txt"
pack main_train runs/main_h200x2
