"""Corpus-stage benchmark: a synthetic code corpus in parquet, through `build_corpus` and the shards.

    python benchmarks/corpus_bench.py --sizes-mb 250 2048 --minhash-mb 250 --bpe-mb 64 \
        --tmp /tmp/corpus_bench --json records/<date>_corpus-bench/corpus_bench.json

For each size, it writes parquet files of synthetic Python (functions from templates with
random names and constants; 8% of the documents are exact copies of an earlier one and 4%
near copies: one line changed), then, each in a fresh subprocess whose whole process tree
is sampled for resident memory every 0.2 s:
- the corpus stage (read, filter, decontaminate, dedup, split, write), with `--minhash` on
  the size given by `--minhash-mb`;
- the byte arm's shards of both splits;
- on `--bpe-mb` of the train split: BPE training (32,768) and BPE encoding.
It prints a table and writes JSON: sizes, wall seconds per step, MB/s and MB/s per core
(input MB / wall / workers: the machine's other load counts against it, so the JSON also
records os.getloadavg() before and after each run), peak tree RSS, and the exact and
MinHash removal rates. Nothing is written outside `--tmp` and `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROWS_PER_FILE = 20_000


def synth_doc(rng: random.Random, i: int) -> str:
    names = ["values", "items", "table", "buffer", "count", "scale", "offset", "weights", "index", "result"]
    lines = [f'"""Module {i}: generated helpers."""', "import math", ""]
    for f in range(rng.randint(3, 12)):
        a, b = rng.sample(names, 2)
        fn = f"{rng.choice(['compute', 'update', 'merge', 'scan', 'reduce'])}_{i}_{f}"
        lines += [f"def {fn}({a}, {b}={rng.randint(0, 99)}):", f'    """Return the {rng.choice(["sum", "mean", "max"])} of {a} scaled by {b}."""', "    total = 0"]
        for k in range(rng.randint(2, 10)):
            lines.append(f"    total += {a}[{k}] * {b} + {rng.randint(0, 10_000)}")
        lines += [f"    return math.{rng.choice(['sqrt', 'fabs', 'floor'])}(total)", ""]
    return "\n".join(lines) + "\n"


def make_corpus(folder: Path, size_bytes: int, seed: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total = n = exact = near = 0
    recent: list[str] = []
    file_i = 0
    while total < size_bytes:
        rows = []
        for _ in range(ROWS_PER_FILE):
            r = rng.random()
            if r < 0.08 and recent:
                text = rng.choice(recent)
                exact += 1
            elif r < 0.12 and recent:
                lines = rng.choice(recent).split("\n")
                j = rng.randrange(3, len(lines) - 1)
                lines[j] = lines[j] + "  # changed"
                text = "\n".join(lines)
                near += 1
            else:
                text = synth_doc(rng, n)
                recent.append(text)
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            rows.append(text)
            total += len(text.encode())
            n += 1
            if total >= size_bytes:
                break
        table = pa.table({"content": rows, "lang": ["Python"] * len(rows)})
        pq.write_table(table, folder / f"part-{file_i:05d}.parquet")
        file_i += 1
    return {"bytes": total, "docs": n, "planted_exact_copies": exact, "planted_near_copies": near, "files": file_i}


def tree_rss(pid: int) -> tuple[int, set[int]]:
    """Resident bytes of a process and all its descendants, and their pids."""
    total, stack, seen = 0, [pid], set()
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack += children.get(p, [])
    return total, seen


def run_measured(code: str) -> dict:
    """Run `code` in a fresh Python; return its JSON result plus peak tree RSS, the tree's
    CPU seconds (summed over every process seen, as last sampled: a process's final
    0.2 s may be missed) and the load average."""
    load_before = os.getloadavg()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    peak = 0
    cpu: dict[int, float] = {}
    done = threading.Event()
    tick = os.sysconf("SC_CLK_TCK")

    def sample():
        nonlocal peak
        while not done.is_set():
            rss, pids = tree_rss(proc.pid)
            peak = max(peak, rss)
            for p in pids:
                try:
                    with open(f"/proc/{p}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    cpu[p] = (int(fields[11]) + int(fields[12])) / tick
                except (OSError, IndexError, ValueError):
                    pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"benchmark step failed ({proc.returncode}):\n{code}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_tree_rss_mb=peak / 2**20, loadavg_before=load_before, loadavg_after=os.getloadavg(), cpu_seconds=sum(cpu.values()))
    return result


CORPUS = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from data_prep.corpus import CorpusOptions, build_corpus
t = {{}}
w = time.perf_counter()
m = build_corpus(Path({out!r}), CorpusOptions(sources=[{src!r}], text_field="content", minhash={minhash}, shard_bytes=1 << 27), workers={workers}, timings=t)
t["total"] = time.perf_counter() - w
print(json.dumps({{"timings": t, "read": m["counts"]["read"], "kept": m["counts"]["kept"], "dropped": m["dropped"]}}))
"""

BYTES = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from bytelm.shards import sha256_file
from bytelm.tokenizers import ByteTokenizer
from data_prep.sharding import encode_split
out = Path({out!r})
sha = sha256_file(out / "manifest.json")
w = time.perf_counter()
n = 0
for split in ("train", "val"):
    n += encode_split(out / "corpus" / split, out / "bytes" / split, ByteTokenizer(), sha)["n_text_bytes"]
print(json.dumps({{"seconds": time.perf_counter() - w, "bytes": n}}))
"""

BPE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from bytelm.shards import ShardWriter, iter_documents, sha256_file
from bytelm.tokenizers import BPETokenizer
from data_prep.bpe import BPEOptions, train_bpe
from data_prep.sharding import encode_split
out = Path({out!r})
limit = {bpe_bytes}
# the first `limit` bytes of the train split as a corpus split of their own
sample = out / "bpe_sample"
n = 0
with ShardWriter(sample / "train", "uint8", None, {{"source": "bench"}}, 1 << 27, "bytelm-corpus/1") as wr:
    for d in iter_documents(out / "corpus" / "train"):
        wr.add(d, len(d)); n += len(d)
        if n >= limit: break
w = time.perf_counter()
train_bpe(sample / "train", sample / "bpe", BPEOptions())
t_train = time.perf_counter() - w
w = time.perf_counter()
m = encode_split(sample / "train", sample / "bpe" / "train_tokens", BPETokenizer(sample / "bpe" / "tokenizer.json"), "bench")
print(json.dumps({{"train_seconds": t_train, "encode_seconds": time.perf_counter() - w, "bytes": n, "tokens": m["n_tokens"]}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[250, 2048])
    p.add_argument("--minhash-mb", type=int, default=250, help="the size (one of --sizes-mb) also run with --minhash")
    p.add_argument("--bpe-mb", type=int, default=64, help="MB of the smallest size's train split the BPE is trained on and encodes (0: no BPE run)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--tmp", default="/tmp/corpus_bench")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    repo = str(Path(__file__).resolve().parent.parent)
    tmp = Path(args.tmp)
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "workers": args.workers,
        "runs": [],
    }
    for mb in args.sizes_mb:
        src = tmp / f"src_{mb}"
        shutil.rmtree(src, ignore_errors=True)
        gen = make_corpus(src, mb * 2**20)
        for minhash in ([False, True] if mb == args.minhash_mb else [False]):
            out = tmp / f"out_{mb}_{'minhash' if minhash else 'exact'}"
            shutil.rmtree(out, ignore_errors=True)
            run = {"size_mb": mb, "generated": gen, "minhash": minhash}
            run["corpus"] = run_measured(CORPUS.format(repo=repo, out=str(out), src=str(src / "*.parquet"), minhash=minhash, workers=args.workers))
            if not minhash:
                run["bytes_shards"] = run_measured(BYTES.format(repo=repo, out=str(out)))
                if mb == min(args.sizes_mb) and args.bpe_mb:
                    run["bpe"] = run_measured(BPE.format(repo=repo, out=str(out), bpe_bytes=args.bpe_mb * 2**20))
            results["runs"].append(run)
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(run)[:300], flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")  # so far, should a later size fail
        shutil.rmtree(src, ignore_errors=True)

    rows = []
    for r in results["runs"]:
        c = r["corpus"]
        mb_in = c["read"]["bytes"] / 1e6
        t = c["timings"]
        dropped = c["dropped"]
        row = {
            "size MB": round(mb_in),
            "minhash": r["minhash"],
            "corpus s": round(t["total"], 1),
            "read MB/s/core": round(mb_in / t["read"] / args.workers, 2),
            "corpus MB/CPU-s": round(mb_in / c["cpu_seconds"], 2),
            "exact removed %": round(100 * dropped["duplicate"]["docs"] / c["read"]["docs"], 2),
            "peak RSS MB (corpus)": round(c["peak_tree_rss_mb"]),
        }
        if r["minhash"]:
            row["minhash MB/s/core"] = round(mb_in / t["minhash"] / args.workers, 2)
            row["near removed %"] = round(100 * dropped["near_duplicate"]["docs"] / c["read"]["docs"], 2)
        if "bytes_shards" in r:
            b = r["bytes_shards"]
            row["bytes arm MB/s"] = round(b["bytes"] / 1e6 / b["seconds"], 1)
            row["bytes arm MB/CPU-s"] = round(b["bytes"] / 1e6 / b["cpu_seconds"], 1)
            row["peak RSS MB (bytes)"] = round(b["peak_tree_rss_mb"])
        if "bpe" in r:
            e = r["bpe"]
            row["BPE train MB/s"] = round(e["bytes"] / 1e6 / e["train_seconds"], 2)
            row["BPE encode MB/s/core"] = round(e["bytes"] / 1e6 / e["encode_seconds"] / args.workers, 2)
            row["BPE CPU-s (train+encode)"] = round(e["cpu_seconds"], 1)
            row["peak RSS MB (BPE)"] = round(e["peak_tree_rss_mb"])
        row["load before/after"] = f"{c['loadavg_before'][0]:.1f}/{c['loadavg_after'][0]:.1f}"
        rows.append(row)
    results["table"] = rows
    from tabulate import tabulate

    print(tabulate([list(r.values()) for r in rows], headers=list(rows[0].keys())))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
