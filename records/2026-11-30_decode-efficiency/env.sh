# Sourced by the GPU scripts of these records, on a bare GPU machine without MLflow or
# internet: installs the carried wheels (.whl: omegaconf and antlr4, which the machine
# lacks) and points the suite at the carried benchmark data (.shared_data).
# Two scripts of one call may start together (11_decode_b16.sh beside 10_synthetic_sweep.sh):
# one installs at a time.
{ flock 9; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  } 9> /tmp/bytelm-env.lock || exit 1
export PYTHONPATH=/tmp/site:$PWD BYTELM_DATA_DIR=$PWD/.shared_data PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m bytelm "$@"\n' > /tmp/bin/bytelm.$$ && chmod +x /tmp/bin/bytelm.$$ \
  && mv /tmp/bin/bytelm.$$ /tmp/bin/bytelm  # whole, even with two scripts writing it
export PATH=/tmp/bin:$PATH  # `bytelm` as a command (timeout runs commands, not functions)
# seconds left of this call: a command is cut at 600 s, and packing the results took up to
# 45 s (2026-11-30: a call whose deadline was 565 s ended at 597 s, one at 545 s was cut
# while compressing). At least 1: `timeout 0` would mean no limit.
left() { local s=$(( ${CALL_S:-540} - SECONDS )); echo $(( s > 1 ? s : 1 )); }
# the main study's corpus, prepared unless this (warm) machine has it from an earlier call
prepare_python_env() {
  [ -f data/python-env/bpe/val/meta.json ] || bytelm prepare --source python-env --out data/python-env > "$OUT/prepare.log" 2>&1
}
# the run folders without their checkpoints (what comes back from the machine)
pack() { local name=$1; shift; tar czf "$OUT/$name.tgz" --exclude=checkpoints --exclude='*.results.jsonl' "$@"; }
# each sample of the evaluations (the *.results.jsonl files), compressed on every core
pack_samples() { local name=$1; shift; tar cf - "$@" 2>/dev/null | xz -T0 -3 > "$OUT/$name.tar.xz"; }
# The byte n = 8 checkpoint benchmarked apart from its sweep: DIR/checkpoints/n8 links to
# RUN_DIR's latest checkpoint, so decode-bench logs its metrics into DIR, not the run.
# Linked anew each time, and only once the run has finished training: a link made to a
# stopped run's checkpoint dangled after the next call trained on and pruned it (2026-11-30).
link_n8() {
  mkdir -p $1/checkpoints; rm -f $1/checkpoints/n8
  grep -q '"status": "finished"' $2/status.json 2>/dev/null || { echo "link_n8: $2 has not finished training" >&2; return 1; }
  ln -s "$(ls -d $PWD/$2/checkpoints/step_* | tail -n 1)" $1/checkpoints/n8
}
# decode-bench on DIR/checkpoints/n8 into DIR/NAME.json and .log, unless that JSON is there
# (a benchmark cut short writes nothing and runs again next call) or under 120 s are left
bench_n8() {  # DIR NAME [decode-bench flags]
  local dir=$1 name=$2; shift 2
  [ -f $dir/$name.json ] || [ "$(left)" -lt 120 ] || timeout $(left) bytelm decode-bench --checkpoint $dir/checkpoints/n8 \
    "$@" --json $dir/$name.json > $dir/$name.log 2>&1
}
# The byte n = 8 checkpoint of the decoding benchmarks in DIR/checkpoints/n8, on GPU $GPU
# (default 0): the main study's run bytes-n8-unembed-s0 of main_h200x2.yaml (SPEC, RUN
# override), trained here first where this machine lacks it (~280 s alone, after ~100 s
# of corpus preparation). While the CPUs prepare the corpus, the GPU runs graph_smoke.sh
# (NO_SMOKE=1 skips it). Fails, having packed DIR as NAME.tgz, while the run is unfinished:
# the next call's same command trains on. Sets N8_RUN, the run's folder.
n8_ready() {
  local dir=$1 spec=${SPEC:-experiments/sweeps/main_h200x2.yaml} run=${RUN:-bytes-n8-unembed-s0}
  export CUDA_VISIBLE_DEVICES=${GPU:-0}
  N8_RUN=runs/$(basename "$spec" .yaml)/runs/$run
  mkdir -p $dir
  [ -f $dir/graph_smoke.log ] || [ -n "${NO_SMOKE:-}" ] || (timeout 300 bash experiments/gpu/graph_smoke.sh /tmp/graph_smoke \
    > $dir/graph_smoke.log 2>&1; echo "graph smoke exit $?" >> $dir/graph_smoke.log
    cp /tmp/graph_smoke.*.log /tmp/graph_smoke.*.json $dir/ 2>/dev/null) &
  prepare_python_env
  timeout $(left) bytelm sweep $spec --no-mlflow --stages train --only $run --devices ${TRAIN_DEVICE:-cuda:0} \
    --set train.time_limit_s=$(( $(left) - 30 )) > $dir/train.log 2>&1
  echo "train sweep exit $? with $(left) s left" >> $dir/train.log
  wait  # the graph smoke, before the benchmarks take the GPU
  link_n8 $dir $N8_RUN || { pack "$(basename $dir)" $dir $N8_RUN; return 1; }
}
