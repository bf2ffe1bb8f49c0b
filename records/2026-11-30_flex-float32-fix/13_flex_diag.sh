# GPU script, two GPUs: where the float32 mismatches of compiled flex
# decoding come from, on random weights of the main study's byte shape (no training).
# Known (2026-11-30, flex_check.py): plain compiled flex steps are exact in float32; the
# 8-head decoder (8-query verify steps) is not (7 of 8 sequences on random weights, 8 of 8
# on the trained model); the kernel alone on contiguous queries is exact.
#   bash experiments/gpu/13_flex_diag.sh
# GPU 1: the kernel alone, block mask from create_block_mask or from the positions
#   (cache_block_mask), queries contiguous or in the model's (B, T, H, hd) layout;
#   then one layer's compiled steps (plain and 8-query) with Inductor's code logged.
# GPU 0: whole 16-layer decoders, plain and 8 heads, flex compiled and graphed: as is, with
#   create_block_mask's mask; SDPA (auto) beside them.
source experiments/gpu/env.sh
D=$OUT/flex_diag
mkdir -p $D
FC="timeout $(left) python3 benchmarks/flex_check.py"
( export CUDA_VISIBLE_DEVICES=1
  $FC --queries 1,8 --cache 393 --options none --masks cache,create --q-layouts contiguous,bthd \
    --json $D/kernels.json > $D/kernels.log 2>&1
  TORCH_LOGS=output_code $FC --no-kernels --decoder --decoder-layers 1 --decoder-batches 4 --dtypes float32 \
    --decoder-variants flex+compile+graphs --json $D/code_l1.json > $D/code_l1.log 2>&1 ) &
CUDA_VISIBLE_DEVICES=0 $FC --no-kernels --decoder --decoder-batches 4 --dtypes float32 \
  --decoder-variants flex+compile+graphs,flex+compile+graphs+create_mask,auto+compile+graphs \
  --json $D/decoders.json > $D/decoders.log 2>&1
wait
ls -la $D
