"""The same documents and tokens before and after the bounded exact dedup and the encoding tasks.

Runs `bytelm prepare` from three source trees on the smoke preset (both arms) and on
`--source python-env` (byte arm), each in a fresh process whose whole process tree is
sampled (benchmarks/corpus_bench.py `run_measured`: wall, CPU seconds summed over the tree,
peak tree RSS, load average), then compares every file of the outputs byte for byte:

    v0: the hand-written corpus stage (main at 634b68e)
    v1: the datatrove stage with the in-memory hash set and in-process encoding (main at 71efe5a)
    v2: this tree

    git archive 634b68e | tar -x -C /tmp/corpus_v0; git archive 71efe5a | tar -x -C /tmp/corpus_v1
    BYTELM_DATA_DIR=/work/shared/data python records/2026-12-07_corpus-bounded/compare_before_after.py \
        > records/2026-12-07_corpus-bounded/compare_before_after.out
"""

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.corpus_bench import run_measured  # noqa: E402

TREES = {"v0": "/tmp/corpus_v0", "v1": "/tmp/corpus_v1", "v2": str(REPO)}
RUNS = {"smoke": ["--preset", "smoke"], "env": ["--source", "python-env", "--tokenizer", "bytes"]}
CODE = """
import json, os, sys, time
os.chdir({tree!r}); sys.path.insert(0, {tree!r})
from bytelm.cli import run_command
w = time.perf_counter()
rc = run_command(["prepare", *{args!r}, "--out", {out!r}, "--workers", "2"])
print(json.dumps({{"rc": rc, "wall_s": time.perf_counter() - w}}))
"""


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


results = {}
for run, args in RUNS.items():
    outs = {}
    for v, tree in TREES.items():
        out = Path(f"/tmp/cmp_{v}_{run}")
        shutil.rmtree(out, ignore_errors=True)
        results[f"{v}/{run}"] = run_measured(CODE.format(tree=tree, args=args, out=str(out)))
        print(v, run, json.dumps(results[f"{v}/{run}"]), flush=True)
        outs[v] = files(out)
    for v in ("v0", "v1"):
        names = sorted(set(outs[v]) | set(outs["v2"]))
        same = [n for n in names if outs[v].get(n) == outs["v2"].get(n)]
        differ = [n for n in names if n not in same]
        print(f"{run}: {v} vs v2: {len(same)} files identical, differing: {differ}", flush=True)
    for v in TREES:
        shutil.rmtree(f"/tmp/cmp_{v}_{run}", ignore_errors=True)
(HERE / "compare_before_after.json").write_text(json.dumps(results, indent=2) + "\n")
