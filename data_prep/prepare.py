"""`bytelm prepare`: sources → corpus → BPE → token shards, under one output folder.

    bytelm prepare --source python-env --out data/pyenv
    bytelm prepare --source ~/code --glob '*.py' --source stack.jsonl.gz --text-field content --out data/mix
    bytelm prepare --preset smoke            # a few MB of the stdlib, both tokenizers, data/smoke/

Each stage records a hash of what it was made from, and is skipped when that hash has not
changed, so re-running the same command is cheap and leaves every file byte-identical.
Layout: docs/architecture.md "Prepared data layout"; formats and choices: docs/data.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from tabulate import tabulate

from bytelm.errors import UserError
from bytelm.shards import DEFAULT_SHARD_TOKENS, sha256_file
from bytelm.tokenizers import BPETokenizer, ByteTokenizer
from data_prep.bpe import DEFAULT_TRAIN_BYTES, DEFAULT_VOCAB, BPEOptions, train_bpe
from data_prep.corpus import CorpusOptions, build_corpus
from data_prep.decontaminate import DEFAULT_NGRAM
from data_prep.outputs import remove_stale_temporaries
from data_prep.sharding import encode_split

# Below this, a shard is mostly file-system overhead (`--shard-tokens 1` would write one
# file per token); 65,536 tokens is 128 KiB of uint16.
MIN_SHARD_TOKENS = 1 << 16

# The smoke preset: the first 4 MB (in path order) of the standard library, a 2,048-token
# BPE (a 32k vocabulary would be mostly unused on 4 MB), 5% validation so that the
# validation split holds enough windows to evaluate on.
PRESETS: dict[str, dict] = {
    "smoke": {
        "sources": ["python-stdlib"],
        "out": "data/smoke",
        "max_bytes": 4_000_000,
        "val_share": 0.05,
        "bpe_vocab": 2048,
        "tokenizer": "both",
    },
}


@dataclass
class PrepareOptions:
    out: Path
    corpus: CorpusOptions = field(default_factory=CorpusOptions)
    bpe: BPEOptions = field(default_factory=BPEOptions)
    tokenizer: str = "both"  # bytes | bpe | both
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 0  # 0: every core
    overwrite: bool = False  # replace a corpus of other sources in --out


def build_options(s: dict) -> PrepareOptions:
    """PrepareOptions from flat settings named like the command's flags (None: default)."""
    s = {k: v for k, v in s.items() if v is not None}
    if not s.get("sources"):
        raise UserError("give at least one --source SPEC (or --preset smoke)")
    if not s.get("out"):
        raise UserError("give --out DIR (the folder to prepare into)")
    corpus = CorpusOptions(**{f.name: s[f.name] for f in fields(CorpusOptions) if f.name in s})
    bpe = BPEOptions(**{name: s[flag] for flag, name in (("bpe_vocab", "vocab_size"), ("bpe_train_bytes", "max_bytes")) if flag in s})
    opts = PrepareOptions(out=Path(s["out"]), corpus=corpus, bpe=bpe)
    for name in ("tokenizer", "shard_tokens", "workers", "overwrite"):
        if name in s:
            setattr(opts, name, s[name])
    corpus.shard_bytes = opts.shard_tokens  # corpus shards are bounded like token shards
    return opts


def preset_options(name: str, out: str | Path | None = None, **overrides) -> PrepareOptions:
    """PrepareOptions of a preset, e.g. preset_options("smoke", tmp / "smoke", workers=1)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return build_options({**PRESETS[name], **given, "out": out or PRESETS[name]["out"]})


def prepare(opts: PrepareOptions) -> dict:
    """Run every stage (each skipped when its output is up to date); return {stage: (wall, cpu) seconds}.

    When the output folder did not exist and a stage fails, the folder is removed, so a
    failed run leaves nothing behind; in an existing folder, each stage's output is
    swapped in atomically, so earlier complete results stay intact.
    """
    out = opts.out
    if opts.tokenizer not in ("bytes", "bpe", "both"):
        raise UserError(f"--tokenizer must be bytes, bpe or both, got {opts.tokenizer!r}")
    if opts.shard_tokens < MIN_SHARD_TOKENS:
        raise UserError(f"--shard-tokens must be >= {MIN_SHARD_TOKENS}, got {opts.shard_tokens}")
    opts.corpus.check()
    if opts.tokenizer != "bytes":
        opts.bpe.check()
    created = not out.exists()
    times: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def timed(stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        times[stage] = (time.perf_counter() - wall, time.process_time() - cpu)

    for tmp in remove_stale_temporaries(out):
        print(f"removed {tmp}, left by an interrupted run")
    try:
        with timed("corpus"):
            manifest = build_corpus(out, opts.corpus, opts.workers, opts.overwrite)
        manifest_sha = sha256_file(out / "manifest.json")
        arms = []
        if opts.tokenizer in ("bytes", "both"):
            arms.append(("bytes", ByteTokenizer()))
        if opts.tokenizer in ("bpe", "both"):
            with timed("bpe_train"):
                train_bpe(out / "corpus" / "train", out / "bpe", opts.bpe)
            arms.append(("bpe", BPETokenizer(out / "bpe" / "tokenizer.json")))
        rows = []
        for name, tok in arms:
            with timed(f"{name}_shards"):
                for split in ("train", "val"):
                    m = encode_split(out / "corpus" / split, out / name / split, tok, manifest_sha, opts.shard_tokens, opts.workers, opts.corpus)
                    rows.append([name, split, m["n_docs"], m["n_text_bytes"], m["n_tokens"], m["n_text_bytes"] / max(1, m["n_tokens"] - m["n_docs"])])
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(tabulate(stage_rows(manifest), headers=["corpus stage", "docs", "bytes"], intfmt=","))
    print(tabulate(rows, headers=["arm", "split", "docs", "text bytes", "tokens (incl. EOS)", "bytes/token (excl. EOS)"], floatfmt=".3f"))
    # CPU time of this process and its threads (the BPE's Rust threads count; the corpus
    # stage's worker processes do not).
    print("seconds (wall / cpu): " + ", ".join(f"{k} {w:.1f} / {c:.1f}" for k, (w, c) in times.items()))
    print(f"prepared {out}")
    return times


def stage_rows(manifest: dict) -> list[list]:
    """What each corpus stage read, skipped and removed (from the manifest)."""
    rows = [["read", manifest["counts"]["read"]["docs"], manifest["counts"]["read"]["bytes"]]]
    skipped: dict[str, int] = {}
    for s in manifest["sources"]:
        for k, v in s.get("skipped", {}).items():
            skipped[k] = skipped.get(k, 0) + v
    rows += [[f"skipped: {k} (files or rows)", v, ""] for k, v in sorted(skipped.items())]
    rows += [[f"removed: {k}", v["docs"], v["bytes"]] for k, v in manifest["dropped"].items()]
    rows.append(["kept", manifest["counts"]["kept"]["docs"], manifest["counts"]["kept"]["bytes"]])
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every flag defaults to None, so that a preset's value shows through unless it is given.
    p.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made recipe (smoke: 4 MB of the stdlib, both tokenizers, data/smoke)")
    p.add_argument("--source", dest="sources", action="append", metavar="SPEC", help="python-env, python-stdlib, a folder, a saved Hugging Face dataset, or .jsonl/.jsonl.gz/.jsonl.zst/.parquet files or a glob of them; SPEC@W weights it in the mix (repeatable)")
    p.add_argument("--out", help="output folder (the smoke preset: data/smoke)")
    p.add_argument("--tokenizer", choices=["bytes", "bpe", "both"], help="which arms to encode (default: both)")
    p.add_argument("--text-field", help="JSONL field or parquet/dataset column holding the document (default: text; The Stack: content)")
    p.add_argument("--glob", dest="globs", action="append", metavar="PAT", help="files of a folder source to take, fnmatch on the relative path (repeatable; default: *.py)")
    p.add_argument("--val-share", type=float, help="share of documents in the validation split (default: 0.01)")
    p.add_argument("--bpe-vocab", type=int, help=f"BPE vocabulary size incl. the 2 special tokens (default: {DEFAULT_VOCAB})")
    p.add_argument("--bpe-train-bytes", type=int, help=f"train the BPE on at most this many bytes of the train split (default: {DEFAULT_TRAIN_BYTES})")
    p.add_argument("--max-bytes", type=int, help="stop once this many bytes of documents are kept (default: 0, no limit)")
    p.add_argument("--ngram", type=int, help=f"decontamination n-gram length in whitespace tokens (default: {DEFAULT_NGRAM})")
    p.add_argument("--data-dir", help="benchmark data folder (default: $BYTELM_DATA_DIR or ../shared/data)")
    p.add_argument("--apps", metavar="PATH", help="also decontaminate against this APPS .jsonl file")
    p.add_argument("--shard-tokens", type=int, help=f"tokens (corpus: bytes) per shard, at least {MIN_SHARD_TOKENS} (default: {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--where", action="append", metavar="COLUMN=V1,V2", help="keep only records whose COLUMN (of a parquet, JSONL or HF dataset source) is one of the values, e.g. lang=Python, ext=py,pyi, license=mit (repeatable; case-insensitive; a list column matches when any element does)")
    p.add_argument("--min-doc-bytes", type=int, help="drop documents shorter than this many bytes (default: 1)")
    p.add_argument("--max-doc-bytes", type=int, help="drop documents longer than this many bytes (default: 0, no limit)")
    p.add_argument("--on-corrupt", choices=["error", "skip"], help="a parquet or arrow file that cannot be read: stop with an error (default) or skip it and count it")
    p.add_argument("--minhash", action="store_true", default=None, help="also remove near-duplicates (datatrove MinHash; docs/data.md)")
    p.add_argument("--minhash-ngram", type=int, help="MinHash shingle size in words (default: 5)")
    p.add_argument("--minhash-bands", type=int, help="MinHash bands (default: 14)")
    p.add_argument("--minhash-rows", type=int, help="MinHash hashes per band (default: 8; threshold about (1/bands)^(1/rows) = 0.72)")
    p.add_argument("--minhash-seed", type=int, help="MinHash hash-function seed (default: 1)")
    p.add_argument("--executor", choices=["local", "slurm"], help="where the corpus and encoding stages' tasks run: local processes (default) or Slurm job arrays (sbatch; this command waits for them)")
    p.add_argument("--slurm-partition", help="Slurm partition for --executor slurm")
    p.add_argument("--slurm-time", help="Slurm time limit per job (default: 24:00:00)")
    p.add_argument("--tasks", type=int, help="read tasks of the corpus stage (default: 4 per worker, at most one per input file)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a corpus of other sources that --out already holds (never a folder prepare did not make)")
    p.add_argument("--follow-symlinks", action="store_true", default=None, help="follow links in folder sources wherever they point (default: only links that stay inside the folder)")
    p.add_argument("--workers", type=int, help="worker processes for the corpus stage (default: 0, every core)")


def main(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0: every core), got {args.workers}")
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "preset")}
    if args.preset:
        opts = preset_options(args.preset, **settings)
    else:
        opts = build_options(settings)
    prepare(opts)
    return 0
