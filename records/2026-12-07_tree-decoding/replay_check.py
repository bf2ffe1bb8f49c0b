"""Replay the recorded trees (trees_smoke_cpu.json) over the 8 prompts decode-bench used,
and compare with the bench's measured tokens per forward at batch 1. From the folder the
smoke run was trained in:  python replay_check.py run <this record folder>"""
import json
import sys

from bytelm.checkpoint import load_model, resolve_checkpoint
from bytelm.decode_bench import documents, select_prompts
from bytelm.generate import Decoder, cache_length, encode_prompt
from bytelm.tree import Tree, replay
from bytelm.tree_fit import draft_ranks

run, record = sys.argv[1], sys.argv[2]  # the smoke run folder, this record folder
ckpt = resolve_checkpoint(run)
model, tok, cfg = load_model(ckpt, "cpu")
model = model.float().eval()
name, docs, keep_short = documents("code", cfg, None)
prompts = [encode_prompt(tok, t) for t in select_prompts(docs, 8, 64, keep_short)]
with Decoder(model, heads=1, batch_size=8, max_len=cache_length(model, max(map(len, prompts)), 128, 1)) as d:
    gen = d.run(prompts, 128, tokenizer=tok)
seqs = draft_ranks(model, list(zip(prompts, gen.tokens)))
L = sum(map(len, seqs))
trees = json.load(open(f"{record}/trees_smoke_cpu.json"))["paths"]
bench = json.load(open(f"{record}/decode_tree_smoke_cpu.json"))["rows"]
for label, tree in [("chain 8", Tree.chain(8))] + [(f"tree {n}", Tree(tuple(tuple(p["path"]) for p in trees[: n - 1]))) for n in (16, 32, 64)]:
    pred = L / sum(1 + replay(s, tree) for s in seqs)
    meas = [r["tokens_per_forward"] for r in bench if r["batch_size"] == 1 and r["heads_used"] == 8
            and (r["decoder"], r["nodes"]) == tuple([label.split()[0], int(label.split()[1])])]
    print(f"{label:8s} replayed {pred:.3f}  measured {meas}")
