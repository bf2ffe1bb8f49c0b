# FSDP2 against DDP on 2 H200s (prepared, not yet run): 30 steps each of the ~100M byte
# and ~135M token configs on the smoke corpus, then the losses, gradient norms, speed and
# memory side by side, and the FSDP checkpoint loaded in one process. About 6-8 minutes.
source experiments/gpu/env.sh
bytelm prepare --preset smoke --out /tmp/smoke > /dev/null
for c in bytes_100m tokens_135m; do
  for p in ddp fsdp; do
    rm -rf /tmp/cmp/$c-$p
    torchrun --nproc_per_node 2 -m bytelm train --config experiments/configs/$c.yaml --run-dir /tmp/cmp/$c-$p \
      --set data.root=/tmp/smoke $([ $c = tokens_135m ] && echo --set model.vocab_size=32768) \
      --set train.parallel=$p --set train.steps=30 --set train.warmup_steps=10 --set train.log_every=1 \
      --set train.eval_every=1000 --set train.eval_batches=2 --set train.checkpoint_every=1000 \
      --set tracking.mlflow=false > "$OUT/$c-$p.log" 2>&1 || tail -20 "$OUT/$c-$p.log"
    cp /tmp/cmp/$c-$p/metrics.jsonl "$OUT/$c-$p.metrics.jsonl" 2>/dev/null
  done
done
python3 - <<'PY' | tee "$OUT/fsdp_vs_ddp.txt"
import json
rows = lambda d: {x["step"]: x for x in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in x}
for c in ["bytes_100m", "tokens_135m"]:
    a, b = rows(f"/tmp/cmp/{c}-ddp"), rows(f"/tmp/cmp/{c}-fsdp")
    for s in sorted(a):
        print(c, s, "loss %.5f %.5f" % (a[s]["loss"], b[s]["loss"]), "grad_norm %.4f %.4f" % (a[s]["grad_norm"], b[s]["grad_norm"]),
              "tok/s %d %d" % (a[s]["tokens_per_s"], b[s]["tokens_per_s"]), "mem_gb %.1f %.1f" % (a[s].get("peak_mem_gb", 0), b[s].get("peak_mem_gb", 0)))
    print(c, "max relative loss difference %.2e" % max(abs(a[s]["loss"] - b[s]["loss"]) / a[s]["loss"] for s in a))
from bytelm.checkpoint import load_model
m, _, cfg = load_model("/tmp/cmp/tokens_135m-fsdp")
print("the fsdp checkpoint loads in one process:", cfg.train.parallel, sum(p.numel() for p in m.parameters()), "parameters")
PY
