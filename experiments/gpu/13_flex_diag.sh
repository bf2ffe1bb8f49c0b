# GPU session script (issue 4), one GPU: where the float32 mismatches of compiled flex
# decoding come from, on random weights of the main study's byte shape (no training), all
# three at once on GPU 0 (their compilations share the CPUs):
# 1. two layers: step by step (tokens and KV-cache writes against eager SDPA) and whole
#    decoders, for each variant: flex compiled and graphed, compiled alone, graphed alone;
#    SDPA (auto) compiled and graphed; float32 and bf16;
# 2. one layer, compiled flex steps with Inductor's generated code logged (TORCH_LOGS), in
#    float32 and in bf16, to compare the two;
# 3. all 16 layers, float32, the step audit of the failing variant.
#   bash experiments/gpu/13_flex_diag.sh
source experiments/gpu/env.sh
D=$OUT/flex_diag
mkdir -p $D
FC="timeout $(left) python3 benchmarks/flex_check.py --no-kernels --decoder"
$FC --decoder-layers 2 --decoder-batches 4 --steps 4 \
  --decoder-variants flex+compile+graphs,flex+compile,flex+graphs,auto+compile+graphs \
  --json $D/layers2.json > $D/layers2.log 2>&1 &
for dt in float32 bfloat16; do
  TORCH_LOGS=output_code $FC --decoder-layers 1 --decoder-batches "" --steps 2 --dtypes $dt \
    --decoder-variants flex+compile --json $D/layer1_$dt.json > $D/layer1_$dt.log 2>&1 &
done
$FC --dtypes float32 --decoder-batches "" --steps 4 --decoder-variants flex+compile+graphs \
  --json $D/layers16.json > $D/layers16.log 2>&1 &
wait
ls -la $D
