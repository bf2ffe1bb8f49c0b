"""`bytelm decode-bench`: how much faster self-speculative decoding makes a checkpoint.

    bytelm decode-bench --checkpoint RUN_DIR [--prompts code|stories|FILE] [--heads 1,2,4,8]
        [--batch-sizes 1,16] [--max-new N] [--n-prompts P] [--prompt-len L]
        [--dtype auto|float32|bfloat16] [--device auto|cpu|cuda] [--cuda-graphs] [--compile]
        [--attention auto,flex] [--cache-block C] [--tree N,...] [--repeats R] [--json OUT]

The paper's Tables S2/S3 protocol: greedy completions of held-out prompts, once with plain
decoding and once per number of heads used. For each batch size the baseline is plain
greedy decoding (heads_used = 1) of the same prompts, in the same process, with the same
model, dtype, cache length, batch size and kernels (CUDA graphs / torch.compile or
neither), so a speedup is never a comparison with a slower baseline. With several
--attention kernels, every decoder runs with each, and the baseline of a batch size is the
fastest plain decoder among them (a verify step may prefer another kernel than a decode
step; the speedup is against the best plain decoding). Each (heads used, batch size,
attention) row reports wall-clock throughput (tokens/s and bytes/s), tokens and bytes
per forward, acceptance per draft depth, the speedup, the implementation efficiency
(speedup ÷ tokens per forward: 1.0 would mean a verify step costs no more than a decode
step), the cost of a step relative to a plain decoding step, and an equality audit: the
number of sequences whose completion differs from plain greedy decoding, each mismatch
with head 1's logit gap at the first differing token (a near-tie in bf16 explains one).

With --tree, trees of draft candidates (bytelm/tree.py; node counts name the trees of
those sizes that `bytelm tree-fit` wrote beside the checkpoint) decode with every head
beside the chains: their rows say `decoder: tree` and `nodes`, the positions verified per
row and step (a chain of k heads verifies k), and the JSON's `tree_choice` names, per batch
size, the decoder whose measured bytes per forward ÷ step cost is largest.

Prompts: `code` takes the first L bytes of held-out documents (the run's validation
corpus, `<data.root>/corpus/val`); `stories` the first L bytes of TinyStories stories
from the data folder (the paper's code vs natural-language comparison); a FILE is a JSONL
of prompts (strings, or objects with a "prompt" field), each cut to L bytes when
--prompt-len is given.

Results: a table like Table S3 on stdout, a JSON file (default
RUN_DIR/bench/decode_<prompts>_<device>_<dtype>.json), and the metrics
`spec/<prompts>/b<batch>/k<heads>/...` plus the JSON as an artifact in the run's MLflow run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tabulate import tabulate
from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.fileio import check_output, iter_jsonl, write_json
from bytelm.generate import (ATTENTION_BACKENDS, CACHE_BLOCK, Decoder, Generation, cache_length, cast_for_inference,
                             encode_prompt, inference_device)
from bytelm.model import MTPTransformer
from bytelm.paths import STORIES, STORY_SEPARATOR, data_file
from bytelm.speculative import Sampling
from bytelm.tokenizers import Tokenizer
from bytelm.tree import Tree


def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = LEGEND
    p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint folder")
    p.add_argument("--prompts", default="code", help="code (held-out validation documents), stories, or a JSONL FILE")
    p.add_argument("--heads", help="heads used, comma-separated (default: 1, 2, 4, ... up to the model's n, and n)")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated (default 1,16)")
    p.add_argument("--max-new", type=int, help="new tokens per prompt (default: 1024, less where the context ends)")
    p.add_argument("--n-prompts", type=int, default=64,
                   help="number of prompts (default 64); beyond one per document, later windows of each")
    p.add_argument("--prompt-len", type=int, help="prompt length in bytes (default: 1024 or half the context)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cuda-graphs", action="store_true", help="capture the decoding step in CUDA graphs (baseline too)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (baseline too)")
    p.add_argument("--attention", default="auto",
                   help=f"the decoding step's attention, comma-separated ({', '.join(ATTENTION_BACKENDS)}; default auto: "
                        "PyTorch's choice); each decoder runs with each, the fastest plain one is the baseline")
    p.add_argument("--flex-split-kv", type=int, default=0,
                   help="with --attention flex: the parts FlexAttention's decoding kernel splits the cache into "
                        "(default 0: PyTorch's choice, a single part once batch x heads exceeds the GPU's SMs)")
    p.add_argument("--refill-min", type=int, default=0,
                   help="with more prompts than the batch: refill finished slots only once this many are free, "
                        "one prefill for the group (default 0: the decoder's, an eighth of the batch on a GPU, 1 on a CPU)")
    p.add_argument("--cache-block", type=int, default=CACHE_BLOCK,
                   help=f"a step reads the cache in blocks of this many positions (default {CACHE_BLOCK}); "
                        "with --compile a coarser block means fewer compilations")
    p.add_argument("--tree", default="",
                   help="also decode with trees of draft candidates, all heads: comma-separated node counts (the "
                        "trees of those sizes in the checkpoint's trees.json, from `bytelm tree-fit`) or tree files")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the run of median wall time counts (default 1)")
    p.add_argument("--data-dir", help="benchmark data folder for --prompts stories (default: $BYTELM_DATA_DIR or ../shared/data)")
    p.add_argument("--json", help="output JSON (default: RUN_DIR/bench/decode_<prompts>_<device>_<dtype>.json)")


# ----------------------------------------------------------------------------- inputs


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} takes integers >= 1, got {text!r}")
    return sorted(set(values))


def heads_to_run(requested: str | None, n: int) -> list[int]:
    """Heads used per row; 1 (the baseline) always runs first."""
    if requested is None:
        if n == 1:
            raise UserError("the checkpoint has no extra heads (model.n_future=1): there is nothing to speculate with")
        heads = sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})
    else:
        heads = int_list(requested, "--heads")
        if n == 1 and max(heads) > 1:
            raise UserError("the checkpoint has no extra heads (model.n_future=1): it cannot decode speculatively")
        if max(heads) > n:
            raise UserError(f"--heads asks for {max(heads)} heads, but the checkpoint has {n} (model.n_future={n})")
    return sorted(set(heads) | {1})


def cut_utf8(data: bytes, length: int) -> bytes:
    """The first `length` bytes, minus a UTF-8 character cut in half at either end."""
    return data[:length].decode("utf-8", errors="ignore").encode("utf-8")


def documents(source: str, cfg, data_dir: str | None) -> tuple[str, list[bytes], bool]:
    """(name, documents, whether they are prompt files whose short entries stay whole)."""
    if source == "code":
        from bytelm.shards import iter_documents

        split = Path(cfg.data.root) / "corpus" / "val"
        if not (split / "meta.json").is_file():
            raise UserError(
                f"the run's validation corpus {split} is not here (data.root={cfg.data.root!r} is relative to "
                "the folder the run was trained from): run from there, or pass --prompts FILE"
            )
        return "code", list(iter_documents(split)), False
    if source == "stories":
        text = data_file(STORIES, data_dir).read_bytes()
        return "stories", [d.strip() for d in text.split(STORY_SEPARATOR.encode())], False
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--prompts {source!r} is neither code, stories nor an existing JSONL file")
    docs = []
    for n, item in iter_jsonl(path):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise UserError(f"{path} line {n} holds no prompt (a non-empty string, or an object with a \"prompt\" string)")
        docs.append(prompt.encode("utf-8"))
    return path.stem, docs, True


def select_prompts(docs: list[bytes], n: int, length: int | None, keep_short: bool) -> list[bytes]:
    """The first n prompts of `length` bytes: the first window of every document at least
    that long, then, while more are asked for than there are documents (the paper streams
    4,096 prompts), the second window of every document with one, and so on; whole UTF-8
    characters only. Prompt files (keep_short): each entry once, cut to `length`."""
    if length is None:
        return docs[:n]
    if keep_short:
        return [p for p in (cut_utf8(d, length) for d in docs) if p][:n]
    out: list[bytes] = []
    for w in range(max(map(len, docs), default=0) // length):
        out += [p for d in docs if len(d) >= (w + 1) * length and (p := cut_utf8(d[w * length:], length))]
        if len(out) >= n:
            break
    return out[:n]


# ----------------------------------------------------------------------------- measuring


def first_difference(a: list[int], b: list[int]) -> int:
    """The first index where two token lists differ (the shorter's length if one is a
    prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def explain_mismatch(model: MTPTransformer, prompt: list[int], plain: list[int], spec: list[int]) -> dict:
    """Where a speculative completion first leaves the plain one, and head 1's logits
    there (computed without a cache): a gap near the dtype's rounding is a tie."""
    j = first_difference(plain, spec)
    out = {"first_difference": j, "plain_length": len(plain), "speculative_length": len(spec)}
    if j < len(plain) and j < len(spec):
        x = torch.tensor([prompt + plain[:j]], device=model.tok_emb.weight.device)
        logits = model(x[:, -model.cfg.context :], n_heads=1)[0, -1, 0].float()
        top = logits.topk(2)
        out.update(
            plain_token=plain[j], speculative_token=spec[j],
            top2_logit_gap=float(top.values[0] - top.values[1]),
            speculative_token_gap=float(logits[plain[j]] - logits[spec[j]]),
        )
    return out


@dataclass
class Timed:
    """The median run of a configuration, every repeat's wall time, and the machine's
    1-minute load average when the repeats ended."""

    gen: Generation
    walls: list[float]
    load_avg: float


def timed_runs(decoder: Decoder, prompts: list[list[int]], max_new: int, tokenizer: Tokenizer, repeats: int) -> Timed:
    """The run of median wall time (the lower middle of an even number) of `repeats` runs
    after a warm-up run of the same work: a row's wall time and its step, prefill and host
    times all come from that one run (the statistics of another run beside the median's
    wall time would mix runs that differ by several percent).
    Greedy decoding is deterministic, so the warm-up meets every (row bucket, length
    bucket) step the timed runs meet and captures (compiles) them all: the timed runs
    replay (their `capture_s`, kept in the row, is 0). A shorter warm-up left captures
    inside the timed run (rows finishing at different times reach smaller row buckets):
    with --compile, each one a compilation of many seconds."""
    decoder.run(prompts, max_new, tokenizer=tokenizer)
    gens = sorted((decoder.run(prompts, max_new, tokenizer=tokenizer) for _ in range(repeats)), key=lambda g: g.stats.wall_s)
    # every repeat's wall time, and the machine's load: what a reader needs to judge the timing
    return Timed(gens[(repeats - 1) // 2], [g.stats.wall_s for g in gens], os.getloadavg()[0])


# A row's timing is not a result when its repeats (or its baseline's) differ by more than
# this share of the median, or when the machine's load exceeded its cores while it ran
# (the demo's bytes n = 8 bench once gave 0.07x on a busy machine, and 1.25x on a rerun).
MAX_SPREAD = 0.10
# A speedup above tokens per forward means a verify step cost less than a plain step:
# beyond timing noise, impossible. The margin allows for the noise.
IMPOSSIBLE_MARGIN = 1.10


def spread(walls: list[float]) -> float:
    """(max - min) / median of the repeats' wall times; 0 for one repeat."""
    return (max(walls) - min(walls)) / sorted(walls)[(len(walls) - 1) // 2] if len(walls) > 1 else 0.0


def row_flags(row: dict, cores: int) -> list[str]:
    """Why a row's speedup should not be read as a result (empty: none known)."""
    flags = []
    worst = max(row["wall_spread"], row["baseline_wall_spread"])
    if worst > MAX_SPREAD:
        flags.append(f"repeats disagree: wall times spread {100 * worst:.0f}% (over {100 * MAX_SPREAD:.0f}%)")
    if max(row["load_avg"], row["baseline_load_avg"]) > cores:
        flags.append(f"busy machine: load average {max(row['load_avg'], row['baseline_load_avg']):.1f} on {cores} cores")
    if row["speedup"] > IMPOSSIBLE_MARGIN * row["tokens_per_forward"]:
        flags.append(f"impossible: speedup {row['speedup']:.2f} above {row['tokens_per_forward']:.2f} tokens per forward")
    return flags


def bench_row(k: int, batch: int, timed: Timed, base_timed: Timed, model: MTPTransformer,
              prompts: list[list[int]], baseline: str) -> dict:
    gen, base = timed.gen, base_timed.gen
    s, b = gen.stats, base.stats
    wall, base_wall = s.wall_s, b.wall_s
    mismatched = [i for i in range(len(prompts)) if gen.tokens[i] != base.tokens[i] or gen.finish[i] != base.finish[i]]
    explained = [{"sequence": i, **explain_mismatch(model, prompts[i], base.tokens[i], gen.tokens[i])} for i in mismatched]
    gaps = [m["top2_logit_gap"] for m in explained if "top2_logit_gap" in m]
    speedup = base_wall / wall
    return {
        "heads_used": k,
        "batch_size": batch,
        "sequences": len(prompts),
        "mismatched_sequences": len(mismatched),
        "mismatches": explained,
        # the widest top-2 gap at a first difference: one or two of the dtype's rounding
        # steps means every mismatch is a tie
        "largest_mismatch_gap": max(gaps, default=None),
        "speedup": speedup,
        "tokens_per_forward": s.tokens_per_forward,
        "bytes_per_forward": s.bytes_per_forward,
        "efficiency": speedup / s.tokens_per_forward,
        "acceptance_by_depth": s.acceptance_by_depth,
        "conditional_acceptance_by_depth": s.conditional_acceptance_by_depth,
        "tokens": s.tokens,
        "bytes": s.bytes,
        "wall_s": wall,
        "tokens_per_s": s.tokens / wall,
        "bytes_per_s": s.bytes / wall,
        "forwards": s.forwards,
        "ms_per_step": 1e3 * s.step_s / max(s.steps, 1),
        "step_cost_vs_plain": (s.step_s / max(s.steps, 1)) / (b.step_s / max(b.steps, 1)),
        "prefill_fraction": s.prefill_s / wall,
        "host_fraction": max(0.0, wall - s.step_s - s.prefill_s - s.capture_s) / wall,
        "capture_s": s.capture_s,
        "idle_row_fraction": s.idle_row_steps / max(s.idle_row_steps + s.row_steps, 1),
        "occupancy": s.occupancy,
        "baseline_occupancy": b.occupancy,
        "baseline": baseline,
        "baseline_wall_s": base_wall,
        "baseline_tokens_per_s": b.tokens / base_wall,
        "baseline_bytes_per_s": b.bytes / base_wall,
        "repeat_wall_s": timed.walls,
        "wall_spread": spread(timed.walls),
        "baseline_wall_spread": spread(base_timed.walls),
        "load_avg": timed.load_avg,
        "baseline_load_avg": base_timed.load_avg,
    }


def run_benchmark(
    model: MTPTransformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    heads: list[int],
    batch_sizes: list[int],
    max_new: int,
    cuda_graphs: bool = False,
    compile: bool = False,
    attention: tuple[str, ...] = ("auto",),
    repeats: int = 1,
    cache_block: int = CACHE_BLOCK,
    flex_split_kv: int = 0,
    refill_min: int | None = None,
    trees: Sequence[Tree] = (),
) -> list[dict]:
    """One row per (decoder, batch size, attention), a decoder being a chain of k heads
    (`heads` starts with 1, `heads_to_run`) or one of the `trees` (with every head its
    depth needs, the largest of `heads`): each batch size's baseline is its fastest plain
    decoder over the attention kernels."""
    # One cache length for every decoder: attention over the same number of slots.
    max_len = cache_length(model, max(map(len, prompts)), max_new, max(heads))
    kernels = "CUDA graphs" if cuda_graphs else "eager"
    kernels += " + torch.compile" if compile else ""
    kernels += f", cache read in blocks of {cache_block} positions"
    rows = []
    runs = {}
    decoders = [(k, None) for k in heads] + [(max(heads), t) for t in trees]
    configs = [(b, k, t, a) for b in batch_sizes for k, t in decoders for a in attention]
    for batch, k, tree, att in tqdm(configs, desc="decode-bench", unit="config", file=sys.stderr):
        decoder = Decoder(model, heads=k, batch_size=batch, max_len=max_len, sampling=Sampling(),
                          cuda_graphs=cuda_graphs, compile=compile, attention=att, cache_block=cache_block,
                          flex_split_kv=flex_split_kv, refill_min=refill_min, tree=tree)
        with decoder:
            runs[batch, k, tree, att] = timed_runs(decoder, prompts, max_new, tokenizer, repeats)
        del decoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for batch in batch_sizes:
        best = min(attention, key=lambda a: runs[batch, 1, None, a].gen.stats.wall_s)
        base = runs[batch, 1, None, best]
        baseline = (f"plain greedy decoding (heads_used=1), same prompts, batch size {batch}, "
                    f"{max_len}-position cache, {kernels}, attention {best} (the fastest plain decoder of "
                    f"{', '.join(attention)}), median of {repeats} run(s)")
        for k, tree in decoders:
            for att in attention:
                row = bench_row(k, batch, runs[batch, k, tree, att], base, model, prompts, baseline)
                row["flags"] = row_flags(row, os.cpu_count() or 1)
                rows.append({"attention": att, "decoder": "chain" if tree is None else "tree",
                             "nodes": k if tree is None else tree.nodes,
                             "tree": None if tree is None else tree.to_json(), **row})
    return rows


def tree_choice(rows: list[dict]) -> dict[str, dict]:
    """Per batch size, the decoder with all heads (the chain or a tree) whose measured step
    costs promise the most: bytes per forward ÷ step cost, the speedup a run would have
    without its prefills and host time. A wider tree accepts more per step but costs more
    per step, and more so at a larger batch, so the best size depends on the batch."""
    out = {}
    k = max(r["heads_used"] for r in rows)
    for batch in sorted({r["batch_size"] for r in rows}):
        cands = [r for r in rows if r["batch_size"] == batch and r["heads_used"] == k and k > 1]
        if not cands:
            continue
        score = {f"{r['decoder']} {r['nodes']} ({r['attention']})": r["bytes_per_forward"] / r["step_cost_vs_plain"]
                 for r in cands}
        best = max(cands, key=lambda r: r["bytes_per_forward"] / r["step_cost_vs_plain"])
        out[str(batch)] = {"decoder": best["decoder"], "nodes": best["nodes"], "attention": best["attention"],
                           "rule": "largest bytes per forward / step cost (measured)", "scores": score}
    return out


def metrics_of(rows: list[dict], name: str) -> dict[str, float]:
    """Per (batch, decoder): the fastest row (over the attention kernels); a chain of k
    heads is `k<k>`, a tree of N nodes `tree<N>`."""
    best: dict[tuple[int, str], dict] = {}
    for r in rows:
        key = (r["batch_size"], f"k{r['heads_used']}" if r.get("decoder", "chain") == "chain" else f"tree{r['nodes']}")
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    out = {}
    for (batch, decoder), r in best.items():
        p = f"spec/{name}/b{batch}/{decoder}/"
        out.update({
            p + "speedup": r["speedup"], p + "bytes_per_forward": r["bytes_per_forward"],
            p + "tokens_per_forward": r["tokens_per_forward"], p + "bytes_per_s": r["bytes_per_s"],
            p + "tokens_per_s": r["tokens_per_s"], p + "mismatched": r["mismatched_sequences"],
            p + "efficiency": r["efficiency"], p + "step_cost": r["step_cost_vs_plain"],
            p + "wall_spread": max(r["wall_spread"], r["baseline_wall_spread"]), p + "flagged": float(bool(r["flags"])),
        })
    return out


def summary_metrics(rows: list[dict], name: str) -> dict[str, float]:
    """A run's headline speedups: per batch size, the best chain speedup among rows not
    flagged (`summary/speedup_b<B>`, `_<prompts>` added for prompts other than code)."""
    out = {}
    for batch in sorted({r["batch_size"] for r in rows}):
        good = [r["speedup"] for r in rows if r["batch_size"] == batch and r["decoder"] == "chain" and r["heads_used"] > 1
                and not r["flags"]]
        if good:
            out[f"summary/speedup_b{batch}" + ("" if name == "code" else f"_{name}")] = max(good)
    return out


def speedup_curves(rows: list[dict], name: str) -> list[dict]:
    """`speedup/<prompts>/b<B>` logged once per heads used with step = heads, so that
    MLflow draws speedup against heads as a curve (the fastest attention kernel's row)."""
    best: dict[tuple[int, int], float] = {}
    for r in rows:
        if r["decoder"] == "chain":
            key = (r["batch_size"], r["heads_used"])
            best[key] = max(best.get(key, 0.0), r["speedup"])
    return [{"step": k, f"speedup/{name}/b{b}": v} for (b, k), v in sorted(best.items(), key=lambda x: (x[0][1], x[0][0]))]


def mismatch_cell(r: dict) -> str:
    cell = f"{r['mismatched_sequences']}/{r['sequences']}"
    return cell + (f", gap <= {r['largest_mismatch_gap']:.3f}" if r["largest_mismatch_gap"] is not None else "")


LEGEND = """\
columns:
  heads      heads used: 1 is plain greedy decoding (the baseline); k > 1 drafts k-1 tokens per step with heads 2..k
  nodes      the draft positions a step verifies: k for a chain of heads, N for a tree of N candidates
  speedup    the baseline's wall time / this row's, same prompts, batch size and cache (>1: faster)
  tok/fwd    tokens each sequence gains per forward (prefill and steps); bytes/fwd the same in UTF-8 bytes
  efficiency speedup / tok/fwd: 1.0 if a verify step cost no more than a plain step
  step cost  time of a step / time of a plain decoding step
  occupancy  mean share of the batch's slots doing live work in a step (rows finish at different times)
  P(drafts 1..j accepted)
             per step, the share in which drafts 1..j were all accepted, j = 1..k-1; tok/fwd is about 1 + their
             sum. Equal values at every j mean that whenever draft 1 was accepted all were (a barely trained
             model that repeats one byte does this: its heads agree)
  tok/s, bytes/s  throughput of this row
  mismatched sequences whose completion differs from plain greedy decoding (gap: head 1's widest top-2 logit
             gap at a first difference; near the dtype's rounding means a tie)
  flags      why a row's timing is not a result: repeats (or the baseline's) spread more than 10%, a load average
             above the machine's cores, or a speedup above tok/fwd (a verify step cheaper than a plain one)"""


def table(rows: list[dict]) -> str:
    return tabulate(
        [
            [r["heads_used"], r.get("nodes", r["heads_used"]), r["batch_size"], r["attention"], f"{r['speedup']:.2f}", f"{r['tokens_per_forward']:.2f}",
             f"{r['bytes_per_forward']:.2f}", f"{r['efficiency']:.2f}", f"{r['step_cost_vs_plain']:.2f}",
             f"{r['occupancy']:.2f}",
             " ".join(f"{a:.2f}" for a in r["acceptance_by_depth"]) or "-",
             f"{r['tokens_per_s']:.0f}", f"{r['bytes_per_s']:.0f}", mismatch_cell(r),
             "; ".join(r["flags"]) or "-"]
            for r in rows
        ],
        headers=["heads", "nodes", "batch", "attention", "speedup", "tok/fwd", "bytes/fwd", "efficiency", "step cost", "occupancy",
                 "P(drafts 1..j accepted)", "tok/s", "bytes/s", "mismatched", "flags"],
    )


# ----------------------------------------------------------------------------- command


def main(args) -> int:
    from bytelm.checkpoint import checkpoint_step, load_model, resolve_checkpoint, run_dir_of
    from bytelm.tree import tree_from_spec
    from bytelm.tracking import hardware, log_to_run

    device = inference_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    for flag, value in (("--n-prompts", args.n_prompts), ("--repeats", args.repeats), ("--cache-block", args.cache_block),
                        ("--max-new", args.max_new), ("--prompt-len", args.prompt_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.refill_min < 0:
        raise UserError(f"--refill-min must be >= 0 (0: the decoder's default), got {args.refill_min}")
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
    attention = tuple(dict.fromkeys(a.strip() for a in args.attention.split(",")))
    unknown = [a for a in attention if a not in ATTENTION_BACKENDS]
    if unknown or not attention:
        raise UserError(f"--attention takes a comma-separated list of {', '.join(ATTENTION_BACKENDS)}; got {args.attention!r}")

    inputs = [args.checkpoint] + ([args.prompts] if args.prompts and Path(args.prompts).exists() else [])
    if args.json:  # refused before the benchmark, not after it
        check_output(args.json, inputs=inputs)
    model, tokenizer, cfg = load_model(args.checkpoint, device)
    step = checkpoint_step(args.checkpoint)  # the training step benchmarked
    context = cfg.model.context
    heads = heads_to_run(args.heads, model.n_future)
    if args.cuda_graphs and device != "cuda":
        raise UserError("--cuda-graphs needs --device cuda")
    model = cast_for_inference(model, getattr(torch, dtype_name))

    prompt_len = args.prompt_len or min(1024, context // 2)
    if prompt_len >= context - 1:
        raise UserError(f"--prompt-len {prompt_len} does not fit the model's context of {context} tokens "
                        f"(with the leading EOS and room for a new token)")
    name, docs, keep_short = documents(args.prompts, cfg, args.data_dir)
    texts = select_prompts(docs, args.n_prompts, args.prompt_len if keep_short else prompt_len, keep_short)
    if not texts:
        raise UserError(f"no prompt of {prompt_len} bytes found in --prompts {args.prompts} (try a smaller --prompt-len)")
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    longest = max(map(len, prompts))
    if longest >= context:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise UserError(f"prompt {i} has {longest} tokens (EOS included); the model's context is {context}: "
                        "use a smaller --prompt-len")
    max_new = args.max_new or min(1024, context - longest)

    specs = [t.strip() for t in args.tree.split(",") if t.strip()]
    trees = [tree_from_spec(t, resolve_checkpoint(args.checkpoint), max(heads)) for t in specs]
    load_before = os.getloadavg()[0]
    rows = run_benchmark(model, tokenizer, prompts, heads=heads, batch_sizes=batch_sizes, max_new=max_new,
                         cuda_graphs=args.cuda_graphs, compile=args.compile, attention=attention,
                         repeats=args.repeats, cache_block=args.cache_block, flex_split_kv=args.flex_split_kv,
                         refill_min=args.refill_min or None, trees=trees)
    print(table(rows))
    print(f"\n{LEGEND}")
    flagged = sum(bool(r["flags"]) for r in rows)
    if flagged:
        print(f"\n{flagged} of {len(rows)} rows are flagged: their timings are kept in the JSON but the report does not "
              "plot them as results" + ("" if args.repeats > 1 else "; --repeats 3 measures the spread"))

    run_dir = run_dir_of(args.checkpoint)
    out = Path(args.json) if args.json else run_dir / "bench" / f"decode_{name}_{device}_{dtype_name}.json"
    setup = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "step": step, "prompts": name, "n_prompts": len(prompts),
        "prompt_len_bytes": prompt_len if not keep_short else args.prompt_len, "prompt_tokens_max": longest,
        "max_new_tokens": max_new, "heads": heads, "batch_sizes": batch_sizes, "dtype": dtype_name, "device": device,
        "cuda_graphs": args.cuda_graphs, "compile": args.compile, "attention": list(attention),
        "cache_block": args.cache_block, "flex_split_kv": args.flex_split_kv, "refill_min": args.refill_min,  # 0: the decoder's default
        "trees": specs, "repeats": args.repeats, "hardware": hardware(), "cores": os.cpu_count(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "model": {"n_future": model.n_future, "head_type": cfg.model.head_type, "tokenizer": tokenizer.kind,
                  "context": context, **model.param_counts()},
    }
    result = {"setup": setup, "rows": rows}
    if trees:
        result["tree_choice"] = tree_choice(rows)
    write_json(out, result, inputs=inputs)
    print(f"wrote {out}")
    from bytelm.run_plots import speedup_by_heads

    plot = speedup_by_heads(rows, name, out.with_suffix(".png"))
    log_to_run(run_dir, metrics_of(rows, name) | summary_metrics(rows, name), [out, plot], step=step,
               rows=speedup_curves(rows, name))
    return 0
