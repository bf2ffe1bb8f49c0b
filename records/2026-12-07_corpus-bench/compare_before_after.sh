# The corpus stage before (main at 634b68e, the hand-written pipeline, extracted with
# `git archive 634b68e | tar -x -C /tmp/corpus_old`) and after (the datatrove stage, this
# worktree): the smoke preset (both arms) and python-env (byte arm), then every shard file
# compared byte for byte. Output: compare_before_after.out, times: compare_before_after_time.txt.
set -e
export BYTELM_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1 TQDM_DISABLE=1
PY=/work/main/.venv/bin/python
rm -rf /tmp/cmp_old_smoke /tmp/cmp_new_smoke /tmp/cmp_old_env /tmp/cmp_new_env
cd /tmp/corpus_old && PYTHONPATH=/tmp/corpus_old $PY -m bytelm prepare --preset smoke --out /tmp/cmp_old_smoke --workers 2 > /tmp/cmp_old_smoke.log
cd /work/wt/corpus && PYTHONPATH=/work/wt/corpus $PY -m bytelm prepare --preset smoke --out /tmp/cmp_new_smoke --workers 2 > /tmp/cmp_new_smoke.log
cd /tmp/corpus_old && PYTHONPATH=/tmp/corpus_old /usr/bin/time -v $PY -m bytelm prepare --source python-env --tokenizer bytes --out /tmp/cmp_old_env --workers 2 > /tmp/cmp_old_env.log 2>&1
cd /work/wt/corpus && PYTHONPATH=/work/wt/corpus /usr/bin/time -v $PY -m bytelm prepare --source python-env --tokenizer bytes --out /tmp/cmp_new_env --workers 2 > /tmp/cmp_new_env.log 2>&1
for d in smoke env; do
  for f in $(cd /tmp/cmp_old_$d && find corpus bytes bpe -name "*.bin" -o -name "*.npy" -o -name tokenizer.json 2>/dev/null | sort); do
    cmp -s /tmp/cmp_old_$d/$f /tmp/cmp_new_$d/$f && echo "same $d $f" || echo "DIFF $d $f"
  done
done
