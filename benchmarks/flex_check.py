"""Is compiled FlexAttention right on this GPU? The decoding step's attention (a query block
of T positions per row over a cache, each row at its own position: the block mask of
`MTPTransformer.rope(..., flex=True)`) under torch.compile, against scaled_dot_product_attention
with the same rule as a boolean mask computed in float64. CPU tests cannot cover this: the
compiled kernel exists on CUDA only.

    python benchmarks/flex_check.py --json out.json [--dtypes float32,bfloat16] [--queries 1,8,9]
        [--cache 393,1033] [--batch 4] [--options none,split4] [--decoder] [--decoder-batches 1,4]

Prints one row per case with the largest absolute error against the float64 reference and
the rounding error the same attention has in that dtype through SDPA (`sdpa_err`): a
correct kernel's error is of the order of SDPA's. The JSON is rewritten after every case, so
a case that crashes the process (a CUDA error is fatal to it) leaves the earlier ones.
Options: none (PyTorch's choices), splitN (SPLIT_KV=N, the decoding kernel's cache split),
force_flex (FORCE_USE_FLEX_ATTENTION: FlexAttention's main kernel instead of the decoding
one; the decoder's steps never use it, their queries being short. On an H200 with torch
2.11 it was wrong here by 0.3-0.7 and crashed once, 2026-11-30, docs/decoding.md).

`--decoder` then audits whole decoders the same way decode-bench does, on random weights
of the main study's byte shape (a random model's greedy tokens must also be exact): the
compiled, CUDA-graphed Decoder with flex attention, plain and with 8 heads, against plain
greedy decoding with SDPA run eagerly, token for token, per dtype and batch size. A row
gives the sequences whose tokens differ and the first differing position of each.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.nn.attention.flex_attention import flex_attention

from bytelm.config import ModelConfig
from bytelm.fileio import write_json
from bytelm.model import MTPTransformer


def kernel_options(name: str) -> dict | None:
    if name == "none":
        return None
    if name == "force_flex":
        return {"FORCE_USE_FLEX_ATTENTION": True}
    if name.startswith("split"):
        return {"SPLIT_KV": int(name[len("split"):])}
    raise SystemExit(f"flex_check: unknown option {name!r} (none, splitN, force_flex)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--queries", default="1,8,9")
    ap.add_argument("--cache", default="393,1033")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--options", default="none,split4")
    ap.add_argument("--decoder", action="store_true", help="also audit whole decoders (above)")
    ap.add_argument("--decoder-batches", default="1,4")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_check: needs a CUDA device (compiled FlexAttention runs on CUDA only)")
    dev = torch.device("cuda")
    setup = dict(date=str(date.today()), hardware=torch.cuda.get_device_name(), torch=torch.__version__,
                 python=platform.python_version(), batch=a.batch, heads=a.heads, head_dim=a.head_dim)
    B, H, hd = a.batch, a.heads, a.head_dim
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows = []
    for L in ints(a.cache):
        # the model only lends its rotary tables and its rule for the block mask
        model = MTPTransformer(ModelConfig(n_layers=1, d_model=H * hd, n_heads=H, vocab_size=258, context=L)).to(dev)
        for T in ints(a.queries):
            g = torch.Generator(device=dev).manual_seed(L * 100 + T)
            q64 = torch.randn(B, H, T, hd, device=dev, dtype=torch.float64, generator=g)
            k64 = torch.randn(B, H, L, hd, device=dev, dtype=torch.float64, generator=g)
            v64 = torch.randn(B, H, L, hd, device=dev, dtype=torch.float64, generator=g)
            # each row at its own position, the last query at most L - 1
            first = torch.randint(L // 3, L - T + 1, (B,), device=dev, generator=g)
            positions = first[:, None] + torch.arange(T, device=dev)
            mask = torch.arange(L, device=dev)[None, None, None, :] <= positions[:, None, :, None]
            ref = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask)
            for dname in a.dtypes.split(","):
                dtype = getattr(torch, dname)
                q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
                sdpa_err = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask).double() - ref).abs().max().item()
                for oname in a.options.split(","):
                    opts = kernel_options(oname)

                    def attend(q, k, v, positions, opts=opts, T=T, L=L):
                        bm = model.rope(T, positions, L, flex=True).block_mask
                        return flex_attention(q, k, v, block_mask=bm, kernel_options=opts)

                    torch._dynamo.reset()
                    out = torch.compile(attend, dynamic=False)(q, k, v, positions)
                    err = (out.double() - ref).abs().max().item()
                    rows.append(dict(dtype=dname, queries=T, cache=L, options=oname, flex_err=err, sdpa_err=sdpa_err,
                                     ratio=err / max(sdpa_err, 1e-12)))
                    print(tabulate([rows[-1]], headers="keys", floatfmt=".3g"), flush=True)
                    write_json(a.json, dict(setup=setup, rows=rows))
    print(tabulate(rows, headers="keys", floatfmt=".3g"))
    if a.decoder:
        decoders = audit_decoders(dev, a.dtypes.split(","), ints(a.decoder_batches), setup, rows, a.json)
        print(tabulate(decoders, headers="keys"))


def audit_decoders(dev, dtypes, batches, setup, rows, json_path) -> list[dict]:
    """Compiled, graphed flex decoders against eager SDPA plain greedy decoding, on random
    weights of the byte n = 8 shape (benchmarks/decode_step.py's bytes-30m preset)."""
    from decode_step import PRESETS

    from bytelm.generate import Decoder, cast_for_inference

    torch.manual_seed(0)
    base = MTPTransformer(ModelConfig(context=1024, **PRESETS["bytes-30m"])).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (256, 200, 231, 256, 180, 243, 256, 219)]
    out = []
    for dname in dtypes:
        model = cast_for_inference(base, getattr(torch, dname))
        for batch in batches:
            def decode(heads, **kw):
                return Decoder(model, heads=heads, batch_size=batch, max_len=400, cache_block=2048, **kw).run(prompts, 128).tokens

            with torch.inference_mode():
                ref = decode(1)
                for heads in (1, 8):
                    got = decode(heads, attention="flex", compile=True, cuda_graphs=True)
                    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                             for a, b in zip(ref, got) if a != b]
                    out.append(dict(dtype=dname, batch=batch, heads=heads, sequences=len(prompts),
                                    mismatched=len(first), first_differences=first))
                    print(tabulate([out[-1]], headers="keys"), flush=True)
                    write_json(json_path, dict(setup=setup, rows=rows, decoders=out))
    return out


if __name__ == "__main__":
    main()
