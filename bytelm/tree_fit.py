"""`bytelm tree-fit`: the best trees of draft candidates for a checkpoint, from held-out text.

    bytelm tree-fit --checkpoint RUN_DIR [--nodes N] [--prompts code|stories|FILE]
        [--n-prompts P] [--prompt-len L] [--max-new M] [--batch-size B]
        [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16]

Decodes the prompts greedily (plain decoding), then reads the model once over each prompt
and its completion: at every position of the completion, the rank of each following token
in the list of the head that drafts it (bytelm/tree.py says why that is the acceptance of a
path under greedy verification). Writes `trees.json` into the checkpoint folder: the paths
ranked by how often they would be accepted, enough for a tree of N nodes (`--tree N` takes
the first N-1), each with its count and rate, and the sha256 of the weights they were
measured on (`--tree` refuses the file for other weights); and, per tree size and for the
chain, the tokens per forward that greedy decoding of these prompts makes, replayed from
the ranks (what decode-bench measures on the same prompts, up to ties). The same
checkpoint, prompts and options give the same file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tabulate import tabulate

from bytelm.errors import UserError
from bytelm.tree import MAX_RANK, TREE_FILE, Tree, best_tree, count_paths, replay, tree_paths, weights_fingerprint


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory (latest checkpoint) or checkpoint folder")
    p.add_argument("--nodes", type=int, default=64, help="the largest tree the file serves, root included (default 64)")
    p.add_argument("--prompts", default="code", help="code (held-out validation documents), stories, or a JSONL FILE")
    p.add_argument("--n-prompts", type=int, default=64, help="number of prompts (default 64)")
    p.add_argument("--prompt-len", type=int, help="prompt length in bytes (default: 256 or a quarter of the context)")
    p.add_argument("--max-new", type=int, default=256, help="greedy tokens per prompt (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", help="benchmark data folder for --prompts stories (default: $BYTELM_DATA_DIR or ../shared/data)")


@torch.inference_mode()
def draft_ranks(model, sequences: list[tuple[list[int], list[int]]]) -> list[list[list[int]]]:
    """For each (prompt, completion), the rank rows of its drafting positions: at each
    position t whose next token is in the completion, the rank of token t+1+d in head
    d+1's list at t (d = 1..n-1; ranks from 0, MAX_RANK for any rank beyond, -1 past the
    completion's end)."""
    n, context, device = model.n_future, model.cfg.context, model.tok_emb.weight.device
    rows = []
    for prompt, completion in sequences:
        seq = (prompt + completion)[-context:]
        first = len(seq) - len(completion) - 1  # the position whose next token is the completion's first
        if not completion or first < 0:
            continue
        logits = model(torch.tensor([seq], device=device))[0].float()  # (T, n, V)
        ids = torch.tensor(seq, device=device)
        T = len(seq)
        out = torch.full((T - 1 - first, n - 1), -1, dtype=torch.long)
        for d in range(1, n):
            ts = torch.arange(first, T - 1 - d, device=device)  # positions whose token t+1+d exists
            if len(ts) == 0:
                continue
            target = ids[ts + 1 + d]
            scores = logits[ts, d]
            rank = (scores > scores.gather(1, target[:, None])).sum(-1).clamp_max(MAX_RANK)
            out[: len(ts), d - 1] = rank.cpu()
        rows.append(out.tolist())
    return rows


def main(args) -> int:
    from bytelm.checkpoint import load_model, resolve_checkpoint
    from bytelm.decode_bench import documents, select_prompts
    from bytelm.fileio import write_json
    from bytelm.generate import Decoder, cache_length, cast_for_inference, encode_prompt, inference_device

    device = inference_device(args.device)
    for flag, value in (("--nodes", args.nodes - 1), ("--n-prompts", args.n_prompts), ("--max-new", args.max_new),
                        ("--batch-size", args.batch_size), ("--prompt-len", args.prompt_len)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= {2 if flag == '--nodes' else 1}, got {value + (flag == '--nodes')}")
    ckpt = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg = load_model(ckpt, device)
    if model.n_future == 1:
        raise UserError("the checkpoint has no extra heads (model.n_future=1): there is nothing to draft a tree with")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    model = cast_for_inference(model, getattr(torch, dtype_name))
    context = cfg.model.context
    prompt_len = args.prompt_len or min(256, context // 4)
    name, docs, keep_short = documents(args.prompts, cfg, args.data_dir)
    texts = select_prompts(docs, args.n_prompts, args.prompt_len if keep_short else prompt_len, keep_short)
    if not texts:
        raise UserError(f"no prompt of {prompt_len} bytes found in --prompts {args.prompts} (try a smaller --prompt-len)")
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    if max(map(len, prompts)) >= context - 1:
        raise UserError(f"prompts of {prompt_len} bytes leave no room in the model's context of {context} tokens: "
                        "use a smaller --prompt-len")
    max_new = min(args.max_new, context - max(map(len, prompts)))
    with Decoder(model, heads=1, batch_size=min(args.batch_size, len(prompts)),
                 max_len=cache_length(model, max(map(len, prompts)), max_new, 1),
                 cuda_graphs=device == "cuda") as decoder:
        gen = decoder.run(prompts, max_new, tokenizer=tokenizer)
    per_sequence = draft_ranks(model, list(zip(prompts, gen.tokens)))
    rows = [r for seq in per_sequence for r in seq]
    if not rows:
        raise UserError("the greedy completions are empty: nothing to measure (try other --prompts)")
    counts = count_paths(rows)
    ranked = tree_paths(counts, args.nodes, model.n_future - 1)
    positions = len(rows)
    sizes = sorted({s for s in (4, 8, 16, 32, 64, 128) if s <= args.nodes and s - 1 <= len(ranked)} | {len(ranked) + 1})

    def per_forward(tree: Tree) -> float:
        """Tokens per row forward (prefill included), as decode-bench counts them."""
        return positions / sum(1 + replay(seq, tree) for seq in per_sequence if seq)

    at_random = {s: 1 + sum(c for _, c in ranked[: s - 1]) / positions for s in sizes}
    predicted = {s: per_forward(Tree(tuple(p for p, _ in ranked[: s - 1]))) for s in sizes}
    chain = per_forward(Tree.chain(model.n_future))
    chain_at_random = 1 + sum(counts.get((0,) * d, 0) for d in range(1, model.n_future)) / positions
    out = ckpt / TREE_FILE
    write_json(out, {
        "fingerprint": weights_fingerprint(ckpt), "nodes": len(ranked) + 1, "heads": model.n_future,
        "positions": positions, "max_rank": MAX_RANK,
        "tokens_per_forward": {str(s): e for s, e in predicted.items()}, "chain_tokens_per_forward": chain,
        "tokens_per_step_at_random_positions": {str(s): e for s, e in at_random.items()},
        "chain_tokens_per_step_at_random_positions": chain_at_random,
        "paths": [{"path": list(p), "count": c, "rate": c / positions} for p, c in ranked],
        "measured_on": {"prompts": name, "n_prompts": len(prompts), "prompt_len_bytes": prompt_len,
                        "max_new_tokens": max_new, "dtype": dtype_name, "device": device,
                        "command": " ".join(["bytelm", "tree-fit", *sys.argv[2:]])},
    })
    print(tabulate([["chain", model.n_future, f"{chain:.3f}", f"{chain_at_random:.3f}"]]
                   + [["tree", s, f"{predicted[s]:.3f}", f"{at_random[s]:.3f}"] for s in sizes],
                   headers=["decoder", "nodes", "tokens per forward (greedy, replayed)",
                            "tokens per step at a random position"]))
    print(f"{positions} positions of {len(prompts)} greedy completions; tree of {args.nodes} nodes: "
          f"{best_tree(counts, args.nodes, model.n_future - 1).paths[:8]}...")
    print(f"wrote {out}")
    return 0
