"""Training throughput, MFU and peak memory of the training step, per configuration.

    python benchmarks/train_bench.py --json out.json [--preset h200|mtp|cpu|cpu-mtp] [--only NAME,...]

Runs the training loop's own `optimizer_step` (bytelm.train) on random token ids — the
step's cost does not depend on the data — after a few warm-up steps (compilation), and
prints a table: ms/step, tokens/s, bytes/s (byte models: = tokens/s; token models:
tokens/s × --bytes-per-token, the measured bytes per token of the BPE on the validation
split, docs/data.md), MFU against the GPU's dense bf16 datasheet peak with every head's
FLOPs included (model.flops_per_token), the step-time ratio to n=1 of the same arm, and
peak GPU memory. The heads' loss weights are those a configuration's `train.mtp_schedule`
gives at step 0 (the `mtp` preset: head types, and a forward curriculum's first stage, whose
zero-weight heads the loss skips); MFU then counts the FLOPs of the heads the step computes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from bytelm.config import load_config
from bytelm.model import MTPTransformer
from bytelm.mtp_schedule import head_weights
from bytelm.train import StepSetup, autocast_for, compile_model, make_optimizer, optimizer_step, peak_flops

BYTE_100M = ["model.n_layers=14", "model.d_model=768", "model.n_heads=12", "model.vocab_size=258", "model.head_type=unembed"]
TOKEN_135M = ["model.n_layers=12", "model.d_model=768", "model.n_heads=12", "model.vocab_size=32768", "model.head_type=transformer"]
CTX_BATCH = ["model.context=2048", "train.batch_size=32"]

# The MTP options on the byte arm: head types at n = 2 and 4 against n = 1, and a forward
# curriculum's first stage (head 1 alone: the other heads' weights 0) at n = 4.
BYTE_100M_TYPES = ["model.n_layers=14", "model.d_model=768", "model.n_heads=12", "model.vocab_size=258"]
FIRST_STAGE = ["train.mtp_schedule.kind=forward"]

PRESETS = {
    "h200": {
        **{f"bytes-n{n}": BYTE_100M + CTX_BATCH + [f"model.n_future={n}"] for n in (1, 8, 16, 32)},
        "bytes-n1-ctx4096": BYTE_100M + ["model.context=4096", "train.batch_size=16", "model.n_future=1"],
        "bytes-n1-ctx8192": BYTE_100M + ["model.context=8192", "train.batch_size=8", "model.n_future=1"],
        **{f"tokens-n{n}": TOKEN_135M + CTX_BATCH + [f"model.n_future={n}"] for n in (1, 2, 4, 8)},
        "tokens-n4-naive": TOKEN_135M + CTX_BATCH + ["model.n_future=4", "train.loss_mode=naive"],
        "bytes-n32-naive": BYTE_100M + CTX_BATCH + ["model.n_future=32", "train.loss_mode=naive"],
    },
    "mtp": {
        "bytes-n1": BYTE_100M_TYPES + CTX_BATCH + ["model.head_type=unembed", "model.n_future=1"],
        **{f"bytes-{ht}-n{n}": BYTE_100M_TYPES + CTX_BATCH + [f"model.head_type={ht}", f"model.n_future={n}"]
           for ht in ("unembed", "transformer", "sequential") for n in (2, 4)},
        **{f"bytes-{ht}-n4-stage1": BYTE_100M_TYPES + CTX_BATCH + [f"model.head_type={ht}", "model.n_future=4"] + FIRST_STAGE
           for ht in ("unembed", "transformer", "sequential")},
    },
    "cpu-mtp": {
        **{f"bytes-{ht}-n{n}": ["model.n_layers=5", "model.d_model=128", "model.vocab_size=258", "model.context=256",
                                "train.batch_size=8", f"model.head_type={ht}", f"model.n_future={n}"]
           for ht, n in (("unembed", 1), ("sequential", 4))},
        "bytes-sequential-n4-stage1": ["model.n_layers=5", "model.d_model=128", "model.vocab_size=258", "model.context=256",
                                       "train.batch_size=8", "model.head_type=sequential", "model.n_future=4"] + FIRST_STAGE,
    },
    "cpu": {
        **{f"bytes-n{n}": ["model.n_layers=4", "model.d_model=128", "model.vocab_size=258", "model.head_type=unembed",
                           "model.context=256", "train.batch_size=8", f"model.n_future={n}"] for n in (1, 8)},
        **{f"tokens-n{n}": ["model.n_layers=5", "model.d_model=128", "model.vocab_size=2048", "model.context=256",
                            "train.batch_size=8", f"model.n_future={n}"] for n in (1, 4)},
    },
}


def bench(name: str, overrides: list[str], steps: int, warmup: int, device: torch.device, bytes_per_token: float,
          profile: bool = False) -> dict:
    # Each configuration compiles afresh, as in its own training process (dynamo's
    # recompile limit would otherwise send later configurations to eager mode).
    torch._dynamo.reset()
    cfg = load_config(None, overrides + [f"train.device={device.type}"])
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = MTPTransformer(m).to(device)
    optimizer = make_optimizer(model, cfg, device)
    compiled = device.type == "cuda" and t.compile != "false"
    if compiled:
        compile_model(model)
    autocast = autocast_for(cfg, device)
    weights = head_weights(t, m.n_future, 0)
    computed = max(i for i, w in enumerate(weights) if w) + 1  # heads 1..computed (sequential: all up to the last)
    x = torch.randint(0, m.vocab_size, (t.batch_size, m.context))
    y = torch.randint(0, m.vocab_size, (t.batch_size, m.context, m.n_future))
    micro = t.micro_batch_size or t.batch_size

    setup = StepSetup(model, optimizer, micro, t.loss_mode, t.grad_clip, autocast, compiled=compiled)

    def step():
        return optimizer_step(setup, x, y, weights)

    t0 = time.time()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.time() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    breakdown = profile_steps(step, device) if profile else None
    tokens = t.batch_size * m.context
    flops = model.flops_per_token(m.context, n_heads=computed)
    peak = peak_flops(device)
    is_bytes = m.vocab_size <= 512
    return {
        "name": name,
        "n_future": m.n_future,
        "head_type": m.head_type,
        "loss_weights": weights,
        "loss_mode": t.loss_mode,
        "params": model.param_counts()["params"],
        "context": m.context,
        "batch": t.batch_size,
        "ms_per_step": 1000 * dt,
        "tokens_per_s": tokens / dt,
        "bytes_per_s": tokens / dt * (1.0 if is_bytes else bytes_per_token),
        "flops_per_token": flops,
        "mfu": flops * tokens / dt / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "warmup_s": warm_s,
        "gpu_time_breakdown": breakdown,
    }


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "matmul", "nvjet", "cublas")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in n for k in ("nccl", "allreduce")):
        return "communication"
    if "triton" in n:
        return "fused elementwise/norm/loss (triton)"
    return "other elementwise/copies"


def profile_steps(step, device, n: int = 3) -> dict:
    """GPU kernel time per category over n steps, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", 0.0)
        if t:
            c = kernel_category(evt.key)
            cats[c] = cats.get(c, 0.0) + t / 1000 / n
    return dict(sorted(cats.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="h200" if torch.cuda.is_available() else "cpu", choices=sorted(PRESETS))
    ap.add_argument("--only", default="", help="comma-separated names from the preset")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bytes-per-token", type=float, default=3.0, help="BPE bytes per token for the token arm's bytes/s")
    ap.add_argument("--profile", default="", help="comma-separated names to profile (GPU time per kernel category)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    names = args.only.split(",") if args.only else list(PRESETS[args.preset])
    rows = []
    for name in names:
        rows.append(bench(name, PRESETS[args.preset][name], args.steps, args.warmup, device, args.bytes_per_token,
                          profile=name in args.profile.split(",") and device.type == "cuda"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    # step-time ratio against n=1 of the same arm (same loss mode); head types with no n=1
    # row of their own (sequential heads need n >= 2) against the n=1 row of the context
    base = {(r["head_type"], r["context"]): r for r in rows if r["n_future"] == 1}
    any_n1 = {r["context"]: r for r in rows if r["n_future"] == 1}
    for r in rows:
        b = base.get((r["head_type"], r["context"])) or any_n1.get(r["context"])
        r["step_time_vs_n1"] = r["ms_per_step"] / b["ms_per_step"] if b else None
        r["mfu_vs_n1"] = r["mfu"] / b["mfu"] if b and r["mfu"] and b["mfu"] else None
    from tabulate import tabulate

    cols = ["name", "params", "ms_per_step", "tokens_per_s", "bytes_per_s", "mfu", "mfu_vs_n1", "step_time_vs_n1", "peak_mem_gb"]
    print(tabulate([[r[c] for c in cols] for r in rows], headers=cols, floatfmt=".3g"))
    hw = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    out = {"date": str(date.today()), "hardware": hw, "torch": torch.__version__, "args": vars(args), "rows": rows}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
