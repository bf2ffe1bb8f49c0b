"""The corpus stage: read sources → filter → decontaminate → dedupe → split → `DIR/corpus/` + manifest.

It runs on datatrove (data_prep/pipeline.py). The read stage is a datatrove pipeline of
N tasks over contiguous blocks of the input files, run by datatrove's local executor on
every core (`--workers`); each task writes a part (its documents after filtering,
decontamination and in-task exact dedup). datatrove's exact dedup then finds the
duplicates between parts (first copy kept) by a merge of per-part sorted signature files
on disk, optionally datatrove's MinHash stages the near-duplicates; the merge walks the
parts in order, splits train/validation, applies the source weights, and streams the
result into the corpus shards. Memory does not grow with the corpus: a read task holds one
document (a batch of 1,000 rows for parquet) and a few hundred bytes per document of its
part (the in-task dedup set and datatrove's list of its signatures), and the default task
count grows with the input so that a task reads about TASK_INPUT_BYTES of files at most
(a larger single file is one task); the cross-part merge holds one
signature per part; the corpus write holds one part's index. MinHash adds datatrove's own
bounded buffers and, in its clustering step, the duplicate pairs found.

Rules:
- dedupe: exact, by BLAKE2b-128 of the document's bytes inside a task, by xxhash64 of
  that digest across tasks (data_prep/pipeline.py `exact_merge`); the first copy
  (in source order) is kept, whatever the number of tasks;
- near-duplicates (`--minhash`): datatrove's MinHash over whitespace-separated words
  (shingles of `minhash_ngram` words, lower-cased, whitespace and diacritics normalised,
  numbers and punctuation kept), `minhash_bands`
  bands of `minhash_rows` hashes; a pair is a candidate when all hashes of one band agree,
  which happens with probability 1 - (1 - s^rows)^bands for Jaccard similarity s, so the
  threshold is about (1/bands)^(1/rows) (0.72 with the defaults 14 and 8). One document
  per cluster is kept (datatrove's union-find root);
- non-UTF-8 documents are kept (the byte arm trains on them; the BPE arm skips them);
- decontamination: see data_prep/decontaminate.py; a copy of a contaminated document
  counts as contaminated (not as a duplicate);
- split: a document is validation when the first 8 bytes of its hash, read as a
  big-endian integer, are below val_share * 2**64. The split depends only on the
  document's content, so it is the same whatever the order or the other documents;
- weights (`SPEC@W`): a source of weight W < 1 keeps a document when bytes 8..16 of its
  hash, as a fraction of 2**64, are below W; W >= 1 writes each train document
  floor(W) times, plus once more when that fraction is below W - floor(W). Validation
  documents are written once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.fileio import atomic_path, write_json
from bytelm.shards import CORPUS_FORMAT, DEFAULT_SHARD_TOKENS, ShardWriter, sha256_file
from data_prep.decontaminate import DEFAULT_NGRAM, RULE_VERSION, NgramIndex, load_benchmarks
from data_prep.outputs import MANIFEST_FORMAT, check_output
from data_prep.pipeline import MAX_TASKS
from data_prep.sources import PYTHON_GLOBS, Source

# The options that say which documents a corpus is made of: an output folder whose manifest
# records other values holds a different corpus, which is replaced only when the user says
# so (--overwrite).
CORPUS_IDENTITY = ("sources", "globs", "text_field")
TASKS_PER_WORKER = 4  # read tasks per worker by default: finer resume, balanced blocks
TASK_INPUT_BYTES = 32 << 20  # by default, a task per this many bytes of input files at least: a task's memory is bounded by its share
WORK = ".work"  # DIR/.work/<key>/: datatrove logs, completions and parts; removed on success


@dataclass
class CorpusOptions:
    sources: list[str] = field(default_factory=lambda: ["python-env"])
    globs: list[str] = field(default_factory=lambda: list(PYTHON_GLOBS))
    text_field: str = "text"
    val_share: float = 0.01
    ngram: int = DEFAULT_NGRAM
    max_bytes: int = 0  # stop once this many bytes of documents are kept (0: no limit)
    data_dir: str | None = None  # benchmark data (bytelm.paths.data_dir)
    apps: str | None = None
    shard_bytes: int = DEFAULT_SHARD_TOKENS
    follow_symlinks: bool = False  # follow links in folder sources outside the folder
    where: list[str] = field(default_factory=list)  # COLUMN=V1,V2 filters on record columns
    min_doc_bytes: int = 1
    max_doc_bytes: int = 0  # 0: no limit
    on_corrupt: str = "error"  # a parquet/arrow file that cannot be read: error | skip
    minhash: bool = False
    minhash_ngram: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    minhash_seed: int = 1
    tasks: int = 0  # read tasks (0: TASKS_PER_WORKER per worker, at most one per file)
    executor: str = "local"  # local | slurm (each stage a job array; the merge runs here)
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"

    def check(self) -> None:
        if not 0 < self.val_share < 1:
            raise UserError(f"--val-share must be strictly between 0 and 1, got {self.val_share}")
        if self.max_bytes < 0:
            raise UserError(f"--max-bytes must be >= 0, got {self.max_bytes}")
        if not self.sources:
            raise UserError("no --source given")
        if self.on_corrupt not in ("error", "skip"):
            raise UserError(f"--on-corrupt must be error or skip, got {self.on_corrupt!r}")
        for name in ("minhash_ngram", "minhash_bands", "minhash_rows", "min_doc_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_doc_bytes < 0 or self.tasks < 0:
            raise UserError("--max-doc-bytes and --tasks must be >= 0")
        if self.tasks > MAX_TASKS:
            raise UserError(f"--tasks must be at most {MAX_TASKS}, got {self.tasks}")
        if self.executor not in ("local", "slurm"):
            raise UserError(f"--executor must be local or slurm, got {self.executor!r}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise UserError("--executor slurm needs --slurm-partition NAME")
        self.where_filters()

    def where_filters(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for w in self.where:
            col, eq, values = w.partition("=")
            if not eq or not col or not values:
                raise UserError(f"--where takes COLUMN=VALUE[,VALUE...], got {w!r}")
            out.setdefault(col, []).extend(v.strip() for v in values.split(","))
        return out


def is_val(digest: bytes, val_share: float) -> bool:
    return int.from_bytes(digest[:8], "big") < int(val_share * 2**64)


def copies(digest: bytes, weight: float, val: bool) -> int:
    """How many times a document of a source of this weight is written (module docstring)."""
    if weight == 1:
        return 1
    frac = int.from_bytes(digest[8:16], "big") / 2**64
    whole = int(weight)
    n = whole + (frac < weight - whole)
    return min(n, 1) if val else n


def corpus_key(opts: CorpusOptions, sources: list[Source], benchmarks: list) -> str:
    """A hash of everything the corpus depends on: options, input files, benchmark files."""
    # how the work is spread changes nothing in the result
    options = {k: v for k, v in asdict(opts).items() if k not in ("tasks", "executor", "slurm_partition", "slurm_time")}
    state = {
        "format": MANIFEST_FORMAT,
        "decontamination_rule": RULE_VERSION,
        "options": options,
        "sources": [s.fingerprint() for s in sources],
        "benchmarks": [b.describe() for b in benchmarks],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def corpus_is_current(out: Path, key: str) -> bool:
    path = out / "manifest.json"
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
        return manifest.get("key") == key and all(
            sha256_file(out / "corpus" / split / "meta.json") == manifest["corpus"][split]["meta_sha256"]
            for split in ("train", "val")
        )
    except (OSError, ValueError, KeyError):
        return False


def check_same_corpus(out: Path, opts: CorpusOptions) -> None:
    path = out / "manifest.json"
    if not path.is_file():
        return
    old, new = json.loads(path.read_text()).get("options", {}), asdict(opts)
    differ = [k for k in CORPUS_IDENTITY if k in old and old[k] != new[k]]
    if differ:
        raise UserError(
            f"--out {out} holds a corpus made from other inputs ({', '.join(f'{k} {old[k]!r}' for k in differ)}); "
            "choose another --out, or pass --overwrite to replace it"
        )


def _add(c: dict, n_bytes: int) -> None:
    c["docs"] += 1
    c["bytes"] += n_bytes


def _counter() -> dict:
    return {"docs": 0, "bytes": 0}


def _merge_counts(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict):
            _merge_counts(into.setdefault(k, {}), v)
        elif isinstance(v, list):
            into[k] = (into.get(k, []) + v)[:50]
        elif isinstance(v, bool):
            into[k] = into.get(k, False) or v
        else:
            into[k] = into.get(k, 0) + v


def _run_minhash(parts: Path, work: Path, tasks: int, workers: int, opts: CorpusOptions) -> Path:
    """datatrove's MinHash stages over the parts; returns the folder of `.remove` files."""
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    from data_prep.pipeline import CodeWords, ReadParts

    config = MinhashConfig(
        n_grams=opts.minhash_ngram,
        num_buckets=opts.minhash_bands,
        hashes_per_bucket=opts.minhash_rows,
        seed=opts.minhash_seed,
        # Code differs in its numbers and punctuation: datatrove's defaults for prose would
        # map `x[0] = 1` and `x[5] = 7` to the same words.
        norm_config=TextNormConfig(norm_numbers=False, remove_punctuation=False),
        # sha1: datatrove's xxhash path hands str to xxhash 4, which takes only bytes
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )
    sigs, buckets, remove = work / "minhash" / "sigs", work / "minhash" / "buckets", work / "minhash" / "remove"
    stages = [
        ([ReadParts(str(parts)), MinhashDedupSignature(str(sigs), config=config, language=CodeWords())], tasks),
        ([MinhashDedupBuckets(str(sigs), str(buckets), config=config)], opts.minhash_bands),
        ([MinhashDedupCluster(str(buckets), str(remove), config=config)], 1),
    ]
    for i, (pipeline, n) in enumerate(stages):
        run_stage(pipeline, n, workers, work / "logs" / f"minhash{i + 1}", opts)
    return remove


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # read (and reported) by the read stage
        return 0


def _exact_dedup(parts: Path, work: Path, tasks: int, workers: int, opts: CorpusOptions, duplicate: dict) -> None:
    """The duplicates between parts (datatrove's merge of the read tasks' sorted signature
    files) -> each part's keep.npy, counted into `duplicate`. Holds one part's index at a time."""
    from data_prep.pipeline import duplicate_ids, exact_merge

    run_stage([exact_merge(work)], 1, workers, work.parent / "logs" / "exact", opts)
    for r in range(tasks):
        part = parts / f"{r:05d}"
        lengths = np.load(part / "index.npy", mmap_mode="r")["length"]
        keep = np.ones(len(lengths), dtype=bool)
        keep[duplicate_ids(work, r)] = False
        duplicate["docs"] += int((~keep).sum())
        duplicate["bytes"] += int(lengths[~keep].sum())
        np.save(part / "keep.npy", keep)


def run_stage(pipeline: list, tasks: int, workers: int, logging_dir: Path, opts: CorpusOptions) -> None:
    """Run one datatrove stage to completion: locally, or as a Slurm job array that this
    process waits for (finished tasks are skipped either way)."""
    from data_prep.pipeline import QuietLocalExecutor, run_on_slurm

    if opts.executor == "slurm":
        run_on_slurm(pipeline, tasks, logging_dir, opts.slurm_partition, opts.slurm_time)
        return
    try:
        QuietLocalExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logging_dir)).run()
    except UserError:
        raise
    except Exception as e:  # a task's UserError comes back wrapped by the process pool
        cause = e
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UserError(str(cause)) from None
        raise


def build_corpus(out: Path, opts: CorpusOptions, workers: int = 0, overwrite: bool = False, timings: dict | None = None) -> dict:
    """Write DIR/corpus/{train,val} and DIR/manifest.json; return the manifest.

    `timings`, when given, receives the wall seconds of each step (read, exact_dedup,
    minhash, write): the benchmark reads them; the manifest records no times.

    Skips the work when DIR/manifest.json already records the same inputs and options.
    Refuses (UserError) an output folder that overlaps a source or holds what prepare did
    not make (data_prep/outputs.py), and one holding a corpus of other inputs unless
    `overwrite`.
    """
    from data_prep.pipeline import Decontaminate, FilterDocuments, ReadFiles, WritePart, block_bounds, exact_signatures

    opts.check()
    sources = [Source(spec, tuple(opts.globs), opts.text_field, opts.follow_symlinks, opts.on_corrupt) for spec in opts.sources]
    check_output(out, [root for s in sources for _, root in s.roots])
    if not overwrite:
        check_same_corpus(out, opts)
    benchmarks = load_benchmarks(opts.data_dir, opts.apps)
    key = corpus_key(opts, sources, benchmarks)
    if corpus_is_current(out, key):
        print(f"corpus: up to date ({out / 'manifest.json'})")
        return json.loads((out / "manifest.json").read_text())

    walk_skipped: list[dict] = [{} for _ in sources]
    units = [(si, name, str(path)) for si, s in enumerate(sources) for name, path in s.files(walk_skipped[si])]
    workers = workers or os.cpu_count() or 1
    sizes = [_size(path) for _, _, path in units]
    # A byte budget is a prefix of the sources in order: one task reads until it is met.
    default_tasks = max(TASKS_PER_WORKER * workers, -(-sum(sizes) // TASK_INPUT_BYTES))
    tasks = 1 if opts.max_bytes else max(1, min(len(units), opts.tasks or default_tasks, MAX_TASKS))
    work = out / WORK / key[:16]
    parts = work / "parts"
    index = NgramIndex.build(benchmarks, opts.ngram)
    counts: dict = {}
    read = [
        ReadFiles(sources, units, block_bounds(sizes, tasks), counts),
        FilterDocuments(opts.where_filters(), opts.min_doc_bytes, opts.max_doc_bytes, counts),
        Decontaminate(index, counts),
        WritePart(str(parts), counts, opts.max_bytes),
        exact_signatures(work / "exact"),
    ]
    timings = {} if timings is None else timings
    clock = time.perf_counter()
    run_stage(read, tasks, workers, work / "logs" / "read", opts)

    timings["read"], clock = time.perf_counter() - clock, time.perf_counter()
    # Counts of every task, then exact dedup across the parts (first copy kept).
    totals: dict = {}
    for r in range(tasks):
        _merge_counts(totals, json.loads((parts / f"{r:05d}" / "counts.json").read_text()))
    dropped = {"duplicate": _counter(), **{f"contaminated/{b.name}": _counter() for b in benchmarks}}
    for k, v in totals.get("dropped", {}).items():
        dropped[k] = v
    _exact_dedup(parts, work / "exact", tasks, workers, opts, dropped["duplicate"])
    timings["exact_dedup"], clock = time.perf_counter() - clock, time.perf_counter()

    remove_dir = None
    if opts.minhash:
        remove_dir = _run_minhash(parts, work, tasks, workers, opts)
        dropped["near_duplicate"] = _counter()
        timings["minhash"], clock = time.perf_counter() - clock, time.perf_counter()
    weights = [s.weight for s in sources]
    if any(w != 1 for w in weights):
        dropped["weight"] = _counter()

    per_source = [
        {"read": totals.get("sources", {}).get(str(i), {}).get("read", _counter()), "kept": _counter(),
         "skipped": {**walk_skipped[i], **totals.get("sources", {}).get(str(i), {}).get("skipped", {})}}
        for i in range(len(sources))
    ]
    kept, non_utf8 = _counter(), _counter()
    split_counts = {"train": {**_counter(), "non_utf8_docs": 0}, "val": {**_counter(), "non_utf8_docs": 0}}
    content_hash = hashlib.sha256()
    progress = tqdm(desc="corpus", unit="B", unit_scale=True, disable=None)
    with atomic_path(out / "corpus", marker="train/meta.json") as tmp:
        tmp.mkdir()
        writer_meta = {"source": "bytelm prepare (corpus)"}
        with (
            ShardWriter(tmp / "train", "uint8", None, writer_meta, opts.shard_bytes, CORPUS_FORMAT) as train,
            ShardWriter(tmp / "val", "uint8", None, writer_meta, opts.shard_bytes, CORPUS_FORMAT) as val,
        ):
            for r in range(tasks):
                for row, raw in _surviving(parts / f"{r:05d}", r, remove_dir, dropped):
                    h, n, si, utf8 = bytes(row["digest"]), int(row["length"]), int(row["source"]), bool(row["utf8"])
                    progress.update(n)
                    split = "val" if is_val(h, opts.val_share) else "train"
                    times = copies(h, weights[si], split == "val")
                    if times == 0:
                        _add(dropped["weight"], n)
                        continue
                    for _ in range(times):
                        (val if split == "val" else train).add(raw, n)
                    _add(split_counts[split], n)
                    split_counts[split]["non_utf8_docs"] += not utf8
                    _add(kept, n)
                    _add(per_source[si]["kept"], n)
                    if not utf8:
                        _add(non_utf8, n)
                    content_hash.update(h)
            progress.close()
            read_docs = sum(s["read"]["docs"] for s in per_source)
            if kept["docs"] == 0:
                raise UserError(
                    f"the corpus is empty after filtering: {read_docs} documents read "
                    f"from {', '.join(opts.sources)}, none kept (check --source, --glob, --text-field and --where)"
                )
            for split in ("train", "val"):
                if split_counts[split]["docs"] == 0:
                    raise UserError(
                        f"the {split} split is empty ({kept['docs']} documents kept, --val-share {opts.val_share}); "
                        "give more documents or change --val-share"
                    )
    timings["write"] = time.perf_counter() - clock
    written = {s: {"docs": w.n_docs, "bytes": w.n_text_bytes} for s, w in (("train", train), ("val", val))}

    manifest = {
        "format": MANIFEST_FORMAT,
        "key": key,
        "options": asdict(opts),
        "sources": [{**s.describe(), **per_source[i]} for i, s in enumerate(sources)],
        "counts": {
            "read": {k: sum(s["read"][k] for s in per_source) for k in ("docs", "bytes")},
            "kept": kept,
            "non_utf8_kept": non_utf8,
            "stopped_at_max_bytes": bool(totals.get("stopped_at_max_bytes")),
            "written_with_weights": written,
        },
        "dropped": dropped,
        "decontamination": {
            "rule": f"drop a document sharing any {opts.ngram} consecutive whitespace tokens with a benchmark text",
            "ngram": opts.ngram,
            "benchmarks": {
                b.name: {
                    **b.describe(),
                    "ngrams": index.ngrams_per_benchmark[i],
                    "dropped_examples": totals.get("contaminated_names", {}).get(b.name, []),
                }
                for i, b in enumerate(benchmarks)
            },
        },
        "split": {
            "rule": "val when int.from_bytes(blake2b128(doc)[:8], 'big') < val_share * 2**64",
            "val_share": opts.val_share,
            **split_counts,
        },
        "corpus": {
            split: {"meta_sha256": sha256_file(out / "corpus" / split / "meta.json")} for split in ("train", "val")
        },
        "content_sha256": content_hash.hexdigest(),
    }
    if opts.minhash:
        manifest["near_dedup"] = {
            "method": "datatrove MinHash over whitespace words (lower case; numbers and punctuation kept), sha1 64-bit",
            "shingle_words": opts.minhash_ngram,
            "bands": opts.minhash_bands,
            "rows": opts.minhash_rows,
            "threshold": (1 / opts.minhash_bands) ** (1 / opts.minhash_rows),
            "seed": opts.minhash_seed,
        }
    write_json(out / "manifest.json", manifest)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


def _surviving(part: Path, rank: int, remove_dir: Path | None, dropped: dict) -> Iterator[tuple[np.void, bytes]]:
    """(index row, bytes) of the part's documents left after exact and near dedup, in order."""
    from data_prep.pipeline import read_part

    idx, docs = read_part(part)
    keep = np.load(part / "keep.npy")
    remove = set()
    if remove_dir is not None and (remove_dir / f"{rank:06d}.remove").is_file():
        # datatrove numbers a part's documents among those that reached MinHash (keep mask)
        remove = set(np.fromfile(remove_dir / f"{rank:06d}.remove", dtype="<u4").tolist())
    j = 0
    for i, raw in enumerate(docs):
        if not keep[i]:
            continue
        if j in remove:
            _add(dropped["near_duplicate"], len(raw))
            j += 1
            continue
        j += 1
        yield idx[i], raw
