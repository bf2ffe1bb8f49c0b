"""Is compiled FlexAttention right on this GPU? The decoding step's attention (a query block
of T positions per row over a cache, each row at its own position: the block mask of
`MTPTransformer.attention_spec(..., flex=True)`) under torch.compile, against scaled_dot_product_attention
with the same rule as a boolean mask computed in float64. CPU tests cannot cover this: the
compiled kernel exists on CUDA only.

    python benchmarks/flex_check.py --json out.json [--dtypes float32,bfloat16] [--queries 1,8,9]
        [--cache 393,1033] [--batch 4] [--options none,split4] [--no-kernels]
        [--decoder [--decoder-batches 1,4] [--decoder-layers N] [--decoder-variants V,...] [--steps S]
                   [--runs R] [--checkpoint DIR]]

Prints one row per case with the largest absolute error against the float64 reference and
the rounding error the same attention has in that dtype through SDPA (`sdpa_err`): a
correct kernel's error is of the order of SDPA's. The JSON is rewritten after every case, so
a case that crashes the process (a CUDA error is fatal to it) leaves the earlier ones.
Options: none (PyTorch's choices), splitN (SPLIT_KV=N, the decoding kernel's cache split),
force_flex (FORCE_USE_FLEX_ATTENTION: FlexAttention's main kernel instead of the decoding
one; the decoder's steps never use it, their queries being short. On an H200 with torch
2.11 it is wrong here by 0.3-0.7 and can crash the process: docs/decoding.md).

`--decoder` then audits whole decoders the same way decode-bench does, on random weights
of the main study's byte shape (a random model's greedy tokens must also be exact): each
variant (VARIANTS: attention kernel, torch.compile, CUDA graphs), plain and with 8 heads,
against plain greedy decoding with SDPA run eagerly, token for token, per dtype and batch
size. A row gives the sequences whose tokens differ, the first differing position of each,
and how often head 2's draft was accepted; `--runs 2` runs each decoder twice, as
decode-bench does (a warm-up, then the timed run), and compares both runs; `--checkpoint
DIR` audits a trained model on held-out code prompts instead. `--steps S` first audits S plain steps one at a
time from the same state as the eager reference: whether each step's tokens agree, and how
far the KV cache it leaves is from the reference's, at the positions it wrote and before
them (a write that did not land, or landed elsewhere, shows there).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
from datetime import date

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bytelm.config import ModelConfig
from bytelm.fileio import write_json
from bytelm.model import MTPTransformer, cache_block_mask


def create_mask(positions, L, sees=None):
    """The rule through create_block_mask (evaluated on the whole padded block grid), the
    reference `cache_block_mask` replaces."""
    return create_block_mask(sees or (lambda b, h, q, kv: kv <= positions[b, q]), positions.shape[0], None,
                             positions.shape[1], L, device=positions.device)


MASKS = {"cache": cache_block_mask, "create": create_mask}


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
    ap.add_argument("--masks", default="cache", help=f"block masks of the kernel cases: {', '.join(MASKS)}")
    ap.add_argument("--q-layouts", default="contiguous",
                    help="query layouts of the kernel cases: contiguous, bthd (the model's: a transposed (B, T, H, hd))")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="check the kernel alone (the cases above; --no-kernels skips them)")
    ap.add_argument("--decoder", action="store_true", help="also audit whole decoders (above)")
    ap.add_argument("--decoder-batches", default="1,4")
    ap.add_argument("--decoder-layers", type=int, default=0, help="layers of the audited model (0: the preset's 16)")
    ap.add_argument("--decoder-variants", default="flex+compile+graphs", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=0,
                    help="with --decoder: also audit this many plain steps one by one (tokens and KV-cache writes)")
    ap.add_argument("--runs", type=int, default=1, help="with --decoder: runs of each decoder, compared one by one")
    ap.add_argument("--checkpoint", help="with --decoder: audit this trained model on 8 held-out code prompts of "
                    "256 bytes (its run's validation split) instead of random weights and prompts")
    a = ap.parse_args()
    variants = a.decoder_variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"flex_check: unknown decoder variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
    if not torch.cuda.is_available():
        raise SystemExit("flex_check: needs a CUDA device (compiled FlexAttention runs on CUDA only)")
    dev = torch.device("cuda")
    setup = dict(date=str(date.today()), hardware=torch.cuda.get_device_name(), torch=torch.__version__,
                 python=platform.python_version(), batch=a.batch, heads=a.heads, head_dim=a.head_dim)
    B, H, hd = a.batch, a.heads, a.head_dim
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    rows, decoders, steps = [], [], []

    def save():
        write_json(a.json, dict(setup=setup, rows=rows, decoders=decoders, steps=steps))

    for L in ints(a.cache) if a.kernels else []:
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
                for oname, mname, layout in itertools.product(a.options.split(","), a.masks.split(","), a.q_layouts.split(",")):
                    opts, build = kernel_options(oname), MASKS[mname]
                    # "bthd", the model's layout: (B, T, H, hd) memory seen as (B, H, T, hd)
                    qq = q.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bthd" else q

                    def attend(q, k, v, positions, opts=opts, build=build, L=L):
                        return flex_attention(q, k, v, block_mask=build(positions, L), kernel_options=opts)

                    torch._dynamo.reset()
                    out = torch.compile(attend, dynamic=False)(qq, k, v, positions)
                    err = (out.double() - ref).abs().max().item()
                    rows.append(dict(dtype=dname, queries=T, cache=L, options=oname, mask=mname, q_layout=layout,
                                     flex_err=err, sdpa_err=sdpa_err, ratio=err / max(sdpa_err, 1e-12)))
                    print(tabulate([rows[-1]], headers="keys", floatfmt=".3g"), flush=True)
                    save()
    if rows:
        print(tabulate(rows, headers="keys", floatfmt=".3g"))
    if a.decoder:
        if a.checkpoint:
            base, prompts = checkpoint_model(a.checkpoint, dev)
            setup.update(checkpoint=a.checkpoint, prompts="code: the run's validation split, 256 bytes each")
        else:
            base = decoder_model(dev, a.decoder_layers)
            prompts = random_prompts(1, (256, 200, 231, 256, 180, 243, 256, 219))
            setup.update(decoder_layers=a.decoder_layers or "preset", prompts="random bytes")
        if a.steps:
            audit_steps(base, prompts, a.dtypes.split(","), 4, variants, steps, save, a.steps)
            print(tabulate(steps, headers="keys", floatfmt=".3g"))
        if a.decoder_batches:  # "": the step audit alone
            audit_decoders(base, prompts, a.dtypes.split(","), ints(a.decoder_batches), variants, decoders, save, a.runs)
            print(tabulate(decoders, headers="keys"))


VARIANTS = {  # name -> Decoder options; the reference is eager SDPA without graphs
    "flex": dict(attention="flex"),  # FlexAttention's unfused reference, eagerly (runs on a CPU too)
    "flex+compile+graphs": dict(attention="flex", compile=True, cuda_graphs=True),
    # the same with the decoder's block mask through create_block_mask (patched into
    # bytelm.model for the variant's runs)
    "flex+compile+graphs+create_mask": dict(attention="flex", compile=True, cuda_graphs=True),
    "flex+compile": dict(attention="flex", compile=True),
    "flex+graphs": dict(attention="flex", cuda_graphs=True),
    "auto+compile+graphs": dict(attention="auto", compile=True, cuda_graphs=True),
    "auto+compile": dict(attention="auto", compile=True),
}


@contextlib.contextmanager
def patched(variant: str):
    """bytelm.model as the variant has it (VARIANTS: +create_mask); dynamo reads the
    patched global when it compiles the variant's steps."""
    import bytelm.model as m

    saved = m.cache_block_mask
    if variant.endswith("+create_mask"):
        m.cache_block_mask = create_mask
    try:
        yield
    finally:
        m.cache_block_mask = saved


def decoder_model(dev, layers: int | None):
    """Random weights of the byte n = 8 shape (benchmarks/decode_step.py's bytes-30m preset),
    optionally with fewer layers (faster to compile; the attention shape is the same)."""
    from decode_step import PRESETS

    torch.manual_seed(0)
    shape = dict(PRESETS["bytes-30m"], **({"n_layers": layers} if layers else {}))
    return MTPTransformer(ModelConfig(context=1024, **shape)).to(dev).eval()


def checkpoint_model(path: str, dev):
    """A trained model and 8 code prompts of 256 bytes from its run's validation split, as
    decode-bench --prompts code chooses them."""
    from bytelm.checkpoint import load_model
    from bytelm.decode_bench import documents, select_prompts
    from bytelm.generate import encode_prompt

    model, tokenizer, cfg = load_model(path, dev)
    _, docs, _ = documents("code", cfg, None)
    return model, [encode_prompt(tokenizer, t) for t in select_prompts(docs, 8, 256, False)]


def random_prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def audit_decoders(base, prompts, dtypes, batches, variants, out, save, runs: int = 1) -> None:
    """Whole decoders (plain and 8 heads) against eager SDPA plain greedy decoding, token for
    token: a row per (dtype, batch, variant, heads, run) with the sequences that differ, the
    first differing position of each, and the drafts' acceptance (a correct decoder's
    drafts agree with its verification as often in float32 as in bf16). Each decoder runs
    the prompts `runs` times in a row, as decode-bench's warm-up and timed runs do."""
    from bytelm.decode_bench import first_difference
    from bytelm.generate import Decoder, cast_for_inference

    for dname in dtypes:
        model = cast_for_inference(base, getattr(torch, dname))
        for batch in batches:
            def decoder(heads, **kw):
                return Decoder(model, heads=heads, batch_size=batch, max_len=400, cache_block=2048, **kw)

            with torch.inference_mode():
                ref = decoder(1).run(prompts, 128).tokens
                for name in variants:
                    for heads in (1, model.n_future):
                        dec = decoder(heads, **VARIANTS[name])
                        for run in range(runs):
                            with patched(name):
                                gen = dec.run(prompts, 128)
                            first = [first_difference(a, b) for a, b in zip(ref, gen.tokens) if a != b]
                            st = gen.stats
                            step_rows = st.row_forwards - st.sequences  # each prompt's prefill is one row forward
                            out.append(dict(dtype=dname, batch=batch, variant=name, heads=heads, run=run,
                                            sequences=len(prompts), mismatched=len(first), first_differences=first,
                                            head2_acceptance=round(st.accepted[0] / step_rows, 3) if heads > 1 else None))
                            print(tabulate([out[-1]], headers="keys"), flush=True)
                            save()
                        del dec


def audit_steps(base, prompts, dtypes, batch, variants, out, save, steps: int = 4) -> None:
    """Step by step, plain decoding: after a prefill of `batch` prompts, each variant's step
    against the eager SDPA step from the same state (every step is fed the reference's
    tokens). A row per (dtype, variant, step): whether the step's tokens agree, the largest
    logit-free check there is (the step's own KV cache writes: the largest difference of
    the positions it wrote, and of every position before them, which an earlier step wrote
    or the prefill did), all layers."""
    from bytelm.generate import cast_for_inference
    from bytelm.speculative import Sampling
    from bytelm.step_engine import StepEngine

    prompts = prompts[:batch]
    lens = torch.tensor([len(p) for p in prompts])
    for dname in dtypes:
        model = cast_for_inference(base, getattr(torch, dname))
        with torch.inference_mode():
            make = lambda **kw: StepEngine(model, heads=1, batch_size=batch, max_len=400, sampling=Sampling(),  # noqa: E731
                                           cache_block=2048, **kw)
            for name in variants:
                ref = make()  # a fresh reference per variant: both start from the prefill
                ref.prefill(list(range(batch)), prompts)
                dec = make(**VARIANTS[name])
                dec.prefill(list(range(batch)), prompts)
                dec.tokens.copy_(ref.tokens)
                for step in range(-1, steps):
                    if step >= 0:
                        length = int(lens.max()) + step + 1
                        ref.step(batch, length)
                        with patched(name):
                            dec.step(batch, length)
                    pos = (lens + step).tolist()  # the position each row wrote last
                    new = old = 0.0
                    for a, b in zip(ref._layers(), dec._layers()):
                        for x, y in ((a.k, b.k), (a.v, b.v)):
                            for r in range(batch):
                                p = pos[r] if step >= 0 else pos[r] + 1
                                d = (x[r, :, : pos[r] + 1].double() - y[r, :, : pos[r] + 1].double()).abs()
                                old = max(old, d[:, :p].max().item()) if p else old
                                new = max(new, d[:, p:].max().item()) if step >= 0 else new
                    same = bool((ref.out[:batch, 0] == dec.out[:batch, 0]).all()) if step >= 0 else None
                    out.append(dict(dtype=dname, variant=name, step=step if step >= 0 else "prefill", tokens_equal=same,
                                    cache_err_written_now=new, cache_err_before=old))
                    print(tabulate([out[-1]], headers="keys", floatfmt=".3g"), flush=True)
                    save()
                    if step >= 0:
                        dec.tokens.copy_(ref.tokens)


if __name__ == "__main__":
    main()
