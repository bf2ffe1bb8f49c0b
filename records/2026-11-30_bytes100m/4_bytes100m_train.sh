# GPU call 1 of 2026-11-30 (2 H200s, under 10 minutes): the ~100M byte models the
# decoding and evaluation measurements need: bytes_100m.yaml with n = 8
# on GPU 0 and n = 1 on GPU 1, 2,000 steps of 65,536 bytes (1.3e8 bytes) each, on the
# python-env corpus prepared first on the CPUs; then, on GPU 1, the training-step benchmark's
# whole h200 preset, which now has a context-4,096 row, profiled (its
# compilations hit the cache the two runs filled, so it fits in 100 s).
source experiments/gpu/env.sh
prepare_python_env
train() {
  CUDA_VISIBLE_DEVICES=$1 timeout 440 bytelm train --config experiments/configs/bytes_100m.yaml --run-dir runs/bytes100m/n$2 \
    --set model.n_future=$2 --set train.steps=2000 --set train.time_limit_s=420 --set tracking.mlflow=false \
    > "$OUT/train_n$2.log" 2>&1
  echo "train n$2 exit $?" >> "$OUT/train_n$2.log"
}
train 0 8 & train 1 1 & wait
CUDA_VISIBLE_DEVICES=1 timeout 100 python3 benchmarks/train_bench.py --profile bytes-n1-ctx4096 --steps 10 --warmup 3 \
  --json "$OUT/train_bench_ctx4096.json" > "$OUT/train_bench_ctx4096.log" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt"
pack bytes100m_train runs/bytes100m
