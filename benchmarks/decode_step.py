"""What one decoding step costs: a plain decode step (1 position) against a speculative
verify step (k positions), with the engine's own step (bytelm.step_engine.StepEngine).

    python benchmarks/decode_step.py --json out.json [--preset bytes-100m|bytes-30m|tokens-135m|cpu]
        [--batch-sizes 1,16] [--heads 1,2,4,8] [--cache 1024] [--dtype bfloat16]
        [--modes eager,graphs,compile] [--attention auto,flex] [--flex-split-kv 0,2,4] [--fill 0.5] [--profile]

A randomly initialised model of the preset's shape (a step's cost does not depend on the
weights); every slot's cache is filled to --fill of its length (half by default) by a
prefill, then the step is
timed with CUDA events over chunks of 16 steps (positions reset between chunks): `gpu_ms`
is the step alone, `with_readback_ms` adds reading its (b, k+1) outputs back to the host,
as `Decoder.run` does after every step. `ratio` is the verify step's cost over the plain
decode step's (same mode and batch): a speculative decoder with t tokens per forward
reaches at most t / ratio times plain decoding's speed, i.e. its efficiency is at most
1 / ratio. Modes: eager, graphs (one CUDA graph per step), compile (torch.compile, then a
CUDA graph). --attention chooses the step's attention (bytelm.generate.ATTENTION_BACKENDS);
--flex-split-kv tries split counts of FlexAttention's decoding kernel (0: PyTorch's choice).
--profile prints the top kernels of one step per (mode, attention, split, batch, k): under
graphs and compile, the kernels the replayed graph ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch
from tabulate import tabulate

from bytelm.config import ModelConfig
from bytelm.generate import cast_for_inference
from bytelm.speculative import Sampling
from bytelm.step_engine import StepEngine
from bytelm.model import MTPTransformer

PRESETS = {
    "bytes-100m": dict(n_layers=14, d_model=768, n_heads=12, vocab_size=258, head_type="unembed", n_future=8),
    # the main study's byte model (experiments/sweeps/main_h200x2.yaml)
    "bytes-30m": dict(n_layers=16, d_model=384, n_heads=6, vocab_size=258, head_type="unembed", n_future=8),
    "tokens-135m": dict(n_layers=12, d_model=768, n_heads=12, vocab_size=32768, head_type="transformer", n_future=8),
    "cpu": dict(n_layers=4, d_model=128, n_heads=4, vocab_size=258, head_type="unembed", n_future=8),
}
CHUNK = 16


def build(preset: str, cache: int, dtype: torch.dtype, device: str) -> MTPTransformer:
    cfg = ModelConfig(context=cache, **PRESETS[preset])
    return cast_for_inference(MTPTransformer(cfg).eval().to(device), dtype)


def time_steps(dec: StepEngine, b: int, start: int, chunks: int, readback: bool) -> float:
    """Mean ms per step over `chunks` chunks of CHUNK steps."""
    cuda = dec.device.type == "cuda"
    total = 0.0
    for _ in range(chunks):
        dec.pos[:b] = start
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(CHUNK):
            dec.step(b)
            if readback:
                dec.out[:b].tolist()
        if cuda:
            torch.cuda.synchronize()
        total += time.perf_counter() - t
    return 1e3 * total / (chunks * CHUNK)


def profile_step(dec: StepEngine, b: int, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dec.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        dec.step(b)
        if dec.device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dec.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bytes-100m", choices=sorted(PRESETS))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--heads", default="1,2,4,8")
    ap.add_argument("--cache", type=int, default=1024, help="cache positions (the model's context)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default="eager,graphs,compile")
    ap.add_argument("--attention", default="auto",
                    help="attention of the step, comma-separated (bytelm.generate.ATTENTION_BACKENDS)")
    ap.add_argument("--flex-split-kv", default="0",
                    help="with flex: FlexAttention decoding-kernel split counts to try, comma-separated (0: PyTorch's choice)")
    ap.add_argument("--fill", type=float, default=0.5,
                    help="where each row's position starts, as a share of the cache (FlexAttention skips the key "
                         "blocks past a row's position, so its step costs more the fuller the cache; a boolean-mask "
                         "step reads the whole cache whatever the fill)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build(args.preset, args.cache, getattr(torch, args.dtype), args.device)
    batches = [int(x) for x in args.batch_sizes.split(",")]
    heads = [int(x) for x in args.heads.split(",")]
    modes = args.modes.split(",")
    start = int(args.cache * args.fill)
    if not 0 < start or start + CHUNK * max(heads) + max(heads) > args.cache:
        raise SystemExit(f"decode_step: --fill {args.fill} leaves no room for {CHUNK} steps of {max(heads)} positions "
                         f"in a {args.cache}-position cache")
    rows, profiles = [], {}
    with torch.inference_mode():
        splits = [int(x) for x in args.flex_split_kv.split(",")]
        kernels = [(a, n) for a in args.attention.split(",") for n in (splits if a == "flex" else [0])]
        for mode, (attention, split) in [(m, a) for m in modes for a in kernels]:
            for b in batches:
                base = None
                for k in heads:
                    dec = StepEngine(model, heads=k, batch_size=b, max_len=args.cache, sampling=Sampling(),
                                     cuda_graphs=mode != "eager", compile=mode == "compile", attention=attention, flex_split_kv=split)
                    prompt = torch.randint(0, model.cfg.vocab_size, (start,)).tolist()
                    dec.prefill(list(range(b)), [prompt] * b)
                    for _ in range(3):
                        dec.step(b)  # warm-up
                    gpu = time_steps(dec, b, start, args.chunks, readback=False)
                    full = time_steps(dec, b, start, args.chunks, readback=True)
                    base = base or gpu
                    rows.append({"mode": mode, "attention": attention, "flex_split_kv": split, "batch_size": b, "heads": k,
                                 "gpu_ms": gpu, "with_readback_ms": full, "ratio": gpu / base})
                    print(f"{mode:8s} {attention:5s} split={split:2d} b={b:3d} k={k:2d}  {gpu:.3f} ms  (+readback {full:.3f} ms)"
                          f"  ratio {gpu / base:.2f}", flush=True)
                    if args.profile:
                        profiles[f"{mode}_{attention}_split{split}_b{b}_k{k}"] = profile_step(dec, b)
                    del dec
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
    print(tabulate([[r["mode"], r["attention"], r["flex_split_kv"], r["batch_size"], r["heads"], f"{r['gpu_ms']:.3f}", f"{r['with_readback_ms']:.3f}",
                     f"{r['ratio']:.2f}"] for r in rows],
                   headers=["mode", "attention", "flex split", "batch", "heads (positions)", "ms/step", "ms/step + readback", "ratio to 1 head"]))
    for name, table in profiles.items():
        print(f"\n== step {name}: top kernels ==\n{table}")
    hw = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": {**vars(args), "model": PRESETS[args.preset], "params": model.param_counts(),
                                 "hardware": hw, "torch": torch.__version__, "date": date.today().isoformat()},
                       "rows": rows, "profiles": profiles}, f, indent=2)


if __name__ == "__main__":
    main()
