"""The corpus stage: read sources → dedupe → decontaminate → split → `DIR/corpus/` + manifest.

It streams. Documents are read in batches of about 32 MB; a pool of worker processes
(every core by default) hashes each document, checks it is UTF-8 and looks for benchmark
n-grams; the main process then keeps or drops it, in the original order, and appends it
to the train or validation shard writer, which streams to disk. What stays in memory is
one batch and the set of 16-byte content hashes seen so far (about 100 bytes per
document: some 250 MB for 2.5 million documents).

Rules:
- dedupe: exact, by BLAKE2b-128 of the document's bytes; the first copy is kept;
- non-UTF-8 documents are kept (the byte arm trains on them; the BPE arm skips them);
- decontamination: see data_prep/decontaminate.py;
- split: a document is validation when the first 8 bytes of its hash, read as a
  big-endian integer, are below val_share * 2**64. The split depends only on the
  document's content, so it is the same whatever the order or the other documents.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.fileio import atomic_path, write_json
from bytelm.shards import CORPUS_FORMAT, DEFAULT_SHARD_TOKENS, ShardWriter, sha256_file
from data_prep.outputs import MANIFEST_FORMAT, check_output
from data_prep.decontaminate import DEFAULT_NGRAM, RULE_VERSION, NgramIndex, load_benchmarks
from data_prep.sources import PYTHON_GLOBS, Document, Source

# The options that say which documents a corpus is made of: an output folder whose manifest
# records other values holds a different corpus, which is replaced only when the user says
# so (--overwrite).
CORPUS_IDENTITY = ("sources", "globs", "text_field")
BATCH_BYTES = 32 << 20
MAX_LISTED_DROPS = 50  # names of contaminated documents listed per benchmark


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

    def check(self) -> None:
        if not 0 < self.val_share < 1:
            raise UserError(f"--val-share must be strictly between 0 and 1, got {self.val_share}")
        if self.max_bytes < 0:
            raise UserError(f"--max-bytes must be >= 0, got {self.max_bytes}")
        if not self.sources:
            raise UserError("no --source given")


# ----------------------------------------------------------------------------- workers

_INDEX: NgramIndex | None = None


def _init_worker(index: NgramIndex) -> None:
    global _INDEX
    _INDEX = index


def _analyze(data: bytes) -> tuple[bytes, bool, int]:
    """(content hash, is UTF-8, index of a benchmark it shares an n-gram with or -1)."""
    digest = hashlib.blake2b(data, digest_size=16).digest()
    try:
        text, utf8 = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = data.decode("utf-8", errors="replace"), False
    return digest, utf8, _INDEX.match(text)


def _batches(docs: Iterable[Document], max_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d.data)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def is_val(digest: bytes, val_share: float) -> bool:
    return int.from_bytes(digest[:8], "big") < int(val_share * 2**64)


# ----------------------------------------------------------------------------- the stage


def _counter() -> dict:
    return {"docs": 0, "bytes": 0}


def _add(c: dict, n_bytes: int) -> None:
    c["docs"] += 1
    c["bytes"] += n_bytes


def corpus_key(opts: CorpusOptions, sources: list[Source], benchmarks: list) -> str:
    """A hash of everything the corpus depends on: options, input files, benchmark files."""
    state = {
        "format": MANIFEST_FORMAT,
        "decontamination_rule": RULE_VERSION,
        "options": asdict(opts),
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


def build_corpus(out: Path, opts: CorpusOptions, workers: int = 0, overwrite: bool = False) -> dict:
    """Write DIR/corpus/{train,val} and DIR/manifest.json; return the manifest.

    Skips the work when DIR/manifest.json already records the same inputs and options.
    Refuses (UserError) an output folder that overlaps a source or holds what prepare did
    not make (data_prep/outputs.py), and one holding a corpus of other inputs unless
    `overwrite`.
    """
    opts.check()
    sources = [Source(spec, tuple(opts.globs), opts.text_field, opts.follow_symlinks) for spec in opts.sources]
    check_output(out, [root for s in sources for _, root in s.roots])
    if not overwrite:
        check_same_corpus(out, opts)
    benchmarks = load_benchmarks(opts.data_dir, opts.apps)
    key = corpus_key(opts, sources, benchmarks)
    if corpus_is_current(out, key):
        print(f"corpus: up to date ({out / 'manifest.json'})")
        return json.loads((out / "manifest.json").read_text())

    index = NgramIndex.build(benchmarks, opts.ngram)
    per_source = [{"read": _counter(), "kept": _counter(), "skipped": {}} for _ in sources]
    dropped = {"duplicate": _counter(), **{f"contaminated/{b.name}": _counter() for b in benchmarks}}
    contaminated_names: dict[str, list[str]] = {b.name: [] for b in benchmarks}
    kept, non_utf8 = _counter(), _counter()
    split_counts = {"train": {**_counter(), "non_utf8_docs": 0}, "val": {**_counter(), "non_utf8_docs": 0}}
    content_hash = hashlib.sha256()
    seen: set[bytes] = set()
    truncated = False

    def documents() -> Iterator[Document]:
        for i, src in enumerate(sources):
            for d in src.documents(i, per_source[i]["skipped"]):
                _add(per_source[i]["read"], len(d.data))
                yield d

    workers = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("forkserver").Pool(workers, _init_worker, (index,)) if workers > 1 else None
    if pool is None:
        _init_worker(index)
    progress = tqdm(desc="corpus", unit="B", unit_scale=True, disable=None)
    try:
        with atomic_path(out / "corpus", marker="train/meta.json") as tmp:
            tmp.mkdir()
            writer_meta = {"source": "bytelm prepare (corpus)"}
            with (
                ShardWriter(tmp / "train", "uint8", None, writer_meta, opts.shard_bytes, CORPUS_FORMAT) as train,
                ShardWriter(tmp / "val", "uint8", None, writer_meta, opts.shard_bytes, CORPUS_FORMAT) as val,
            ):
                for batch in _batches(documents(), BATCH_BYTES):
                    data = [d.data for d in batch]
                    results = pool.map(_analyze, data, chunksize=8) if pool else map(_analyze, data)
                    for doc, (digest, utf8, hit) in zip(batch, results):
                        progress.update(len(doc.data))
                        if digest in seen:
                            _add(dropped["duplicate"], len(doc.data))
                            continue
                        seen.add(digest)
                        if hit >= 0:
                            name = benchmarks[hit].name
                            _add(dropped[f"contaminated/{name}"], len(doc.data))
                            if len(contaminated_names[name]) < MAX_LISTED_DROPS:
                                contaminated_names[name].append(doc.name)
                            continue
                        split = "val" if is_val(digest, opts.val_share) else "train"
                        (val if split == "val" else train).add(doc.data, len(doc.data))
                        _add(split_counts[split], len(doc.data))
                        split_counts[split]["non_utf8_docs"] += not utf8
                        _add(kept, len(doc.data))
                        _add(per_source[doc.source]["kept"], len(doc.data))
                        if not utf8:
                            _add(non_utf8, len(doc.data))
                        content_hash.update(digest)
                        if opts.max_bytes and kept["bytes"] >= opts.max_bytes:
                            truncated = True
                            break
                    if truncated:
                        break
                if kept["docs"] == 0:
                    raise UserError(
                        f"the corpus is empty after filtering: {sum(s['read']['docs'] for s in per_source)} documents read "
                        f"from {', '.join(opts.sources)}, none kept (check --source, --glob and --text-field)"
                    )
                for split in ("train", "val"):
                    if split_counts[split]["docs"] == 0:
                        raise UserError(
                            f"the {split} split is empty ({kept['docs']} documents kept, --val-share {opts.val_share}); "
                            "give more documents or change --val-share"
                        )
    finally:
        progress.close()
        if pool is not None:
            pool.close()
            pool.join()

    manifest = {
        "format": MANIFEST_FORMAT,
        "key": key,
        "options": asdict(opts),
        "sources": [{**s.describe(), **per_source[i]} for i, s in enumerate(sources)],
        "counts": {
            "read": {k: sum(s["read"][k] for s in per_source) for k in ("docs", "bytes")},
            "kept": kept,
            "non_utf8_kept": non_utf8,
            "stopped_at_max_bytes": truncated,
        },
        "dropped": dropped,
        "decontamination": {
            "rule": f"drop a document sharing any {opts.ngram} consecutive whitespace tokens with a benchmark text",
            "ngram": opts.ngram,
            "benchmarks": {
                b.name: {**b.describe(), "ngrams": index.ngrams_per_benchmark[i], "dropped_examples": contaminated_names[b.name]}
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
    write_json(out / "manifest.json", manifest)
    return manifest
