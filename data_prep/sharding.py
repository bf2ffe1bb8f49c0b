"""Encoding a corpus split into token shards (`DIR/{bytes,bpe}/{train,val}/`).

A split is encoded as a datatrove stage of one task per corpus shard, run like the corpus
stage's (local processes, or a Slurm job array with `--executor slurm`): task k encodes the
documents that start in corpus shard k into `DIR/.work/encode/<arm>-<split>-<key>/k/`
(`tokens.bin`: their ids, without EOS; `docs.npy`: per document, its token count and text
bytes; `skipped.json`), built under a temporary name and renamed into place before
datatrove marks the task done. The merge then streams those files, in shard order, through
the one `ShardWriter`, which swaps the split folder in whole: the shards are the same
whatever the executor and the number of tasks, a killed run restarted resumes from the
finished tasks, and no half-written split is ever left where training looks.

Bytes need no work beyond a copy into uint16 (with the EOS id 256 after each document).
BPE documents are encoded in batches of about 2 MB with `encode_batch` (multi-threaded on
the Rust side of `tokenizers`). Documents that are not valid UTF-8 are skipped by the BPE
arm (the byte arm keeps them); meta.json counts them. A task holds one batch and a corpus
shard's document offsets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.pipeline.base import PipelineStep
from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.shards import (CORPUS_FORMAT, DEFAULT_SHARD_TOKENS, SYNTH_FORMAT, ShardWriter, read_meta, sha256_file,
                           token_dtype)
from bytelm.tokenizers import BPETokenizer, Tokenizer, load_tokenizer

BATCH_BYTES = 2 << 20  # HF Encoding objects cost ~150 bytes per token: keep batches small
# Local processes: one per this many bytes of the split, at most --workers. A process pool
# costs seconds to start, and the BPE's encode_batch already runs on every core.
BYTES_PER_PROCESS = 256 << 20
WORK = ".work"  # DIR/.work/encode/...: the tasks' token files; removed once the split is written
DOCS_DTYPE = np.dtype([("tokens", "<i8"), ("bytes", "<i8")])


def shards_key(corpus_split: Path, tokenizer_sha256: str | None, shard_tokens: int) -> str:
    state = {
        "corpus_meta": sha256_file(corpus_split / "meta.json"),
        "tokenizer": tokenizer_sha256,
        "shard_tokens": shard_tokens,
        "format": "bytelm-shards/1",
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _utf8_batches(docs: Iterator[bytes], skipped: dict) -> Iterator[list[tuple[bytes, str]]]:
    batch, size = [], 0
    for data in docs:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped["non_utf8_docs"] += 1
            skipped["non_utf8_bytes"] += len(data)
            continue
        batch.append((data, text))
        size += len(data)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def shard_documents(split_dir: Path, k: int) -> Iterator[bytes]:
    """The documents of a corpus split that start in shard k (the last may end in a later
    shard). The split's meta.json was checked by the caller (`read_meta`)."""
    meta = json.loads((split_dir / "meta.json").read_text())
    shards = meta["shards"]
    base = sum(s["n_tokens"] for s in shards[:k])
    starts = np.load(split_dir / shards[k]["docs"]) + base
    # The last document ends where the next shard that starts one starts it.
    end, b = meta["n_tokens"], base + shards[k]["n_tokens"]
    for s in shards[k + 1 :]:
        if s["n_docs"]:
            end = b + int(np.load(split_dir / s["docs"], mmap_mode="r")[0])
            break
        b += s["n_tokens"]
    if not len(starts):
        return
    nxt = k + 1
    f = open(split_dir / shards[k]["tokens"], "rb")
    try:
        f.seek(int(starts[0]) - base)
        for need in np.diff(np.append(starts, end)).tolist():
            parts = []
            while need:
                part = f.read(need)
                if not part:  # the document goes on in the next shard
                    f.close()
                    f = open(split_dir / shards[nxt]["tokens"], "rb")
                    nxt += 1
                    continue
                parts.append(part)
                need -= len(part)
            yield b"".join(parts)
    finally:
        f.close()


class EncodeShard(PipelineStep):
    """Task k: the documents starting in corpus shard k -> `work/{k:05d}/` (module docstring)."""

    name = "bytelm encode"
    type = "🔢 - TOKENIZER"

    def __init__(self, corpus_split: str, work: str, kind: str, tokenizer_path: str | None):
        super().__init__()
        self.corpus_split, self.work, self.kind, self.tokenizer_path = corpus_split, work, kind, tokenizer_path

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        tokenizer = load_tokenizer(self.kind, self.tokenizer_path)
        dtype = np.dtype(token_dtype(tokenizer.vocab_size)).newbyteorder("<")
        final, tmp = Path(self.work) / f"{rank:05d}", Path(self.work) / f".{rank:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed task
        tmp.mkdir(parents=True)
        skipped = {"non_utf8_docs": 0, "non_utf8_bytes": 0}
        docs = []
        with open(tmp / "tokens.bin", "wb") as f:
            texts = shard_documents(Path(self.corpus_split), rank)
            if isinstance(tokenizer, BPETokenizer):
                for batch in _utf8_batches(texts, skipped):
                    for (raw, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
                        f.write(np.asarray(ids, dtype=dtype).tobytes())
                        docs.append((len(ids), len(raw)))
            else:
                for raw in texts:
                    f.write(np.frombuffer(raw, dtype=np.uint8).astype(dtype).tobytes())
                    docs.append((len(raw), len(raw)))
            self.stat_update("documents", value=len(docs))
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / "docs.npy", np.array(docs, dtype=DOCS_DTYPE))
        (tmp / "skipped.json").write_text(json.dumps(skipped))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return iter(())


def encode_split(
    corpus_split: Path,
    out_split: Path,
    tokenizer: Tokenizer,
    manifest_sha256: str,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int = 0,
    executor=None,
) -> dict:
    """Write one token split; skip it when its meta.json already records the same inputs.

    `workers`: at most this many local processes (0: every core); `executor`: the CorpusOptions whose
    executor, Slurm partition and time limit run the tasks (None: local)."""
    from data_prep.corpus import CorpusOptions, run_stage

    tok_sha = sha256_file(tokenizer.path) if isinstance(tokenizer, BPETokenizer) else None
    key = shards_key(corpus_split, tok_sha, shard_tokens)
    if (out_split / "meta.json").is_file():
        try:
            meta = read_meta(out_split)
            if meta.get("key") == key and meta.get("manifest_sha256") == manifest_sha256:
                print(f"{tokenizer.kind}: {out_split.name} up to date")
                return meta
        except UserError:  # a damaged folder is simply rebuilt
            pass

    desc = tokenizer.describe()
    if isinstance(tokenizer, BPETokenizer):
        # Relative to the prepared folder, so the folder can be moved whole.
        desc["path"] = "bpe/tokenizer.json"
    skipped = {"non_utf8_docs": 0, "non_utf8_bytes": 0}
    meta = {"tokenizer": desc, "manifest_sha256": manifest_sha256, "key": key, "skipped": skipped}
    if tok_sha:
        meta["tokenizer_sha256"] = tok_sha
    dtype = np.dtype(token_dtype(tokenizer.vocab_size)).newbyteorder("<")

    root = out_split.parent.parent / WORK / "encode"
    work = root / f"{out_split.parent.name}-{out_split.name}-{key[:16]}"
    corpus = read_meta(corpus_split, format=CORPUS_FORMAT)
    tasks = len(corpus["shards"])
    path = str(tokenizer.path) if isinstance(tokenizer, BPETokenizer) else None
    pipeline = [EncodeShard(str(corpus_split), str(work / "tasks"), tokenizer.kind, path)]
    processes = max(1, min(workers or os.cpu_count() or 1, -(-corpus["n_tokens"] // BYTES_PER_PROCESS)))
    run_stage(pipeline, tasks, processes, work / "logs", executor or CorpusOptions())

    progress = tqdm(desc=f"{tokenizer.kind}/{out_split.name}", unit="B", unit_scale=True, disable=None)
    with ShardWriter(out_split, dtype.name, tokenizer.eos_id, meta, shard_tokens) as writer:
        for k in range(tasks):
            task = work / "tasks" / f"{k:05d}"
            for name, n in json.loads((task / "skipped.json").read_text()).items():
                skipped[name] += n
            with open(task / "tokens.bin", "rb") as f:
                for n_tokens, n_bytes in np.load(task / "docs.npy").tolist():
                    writer.add(np.frombuffer(f.read(n_tokens * dtype.itemsize), dtype=dtype), n_bytes)
                    progress.update(n_bytes)
    progress.close()
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):  # removed once no other split's work is left
        root.rmdir()
        root.parent.rmdir()
    return writer.meta


def check_synth_out(out: Path, task: str) -> None:
    """`bytelm synth TASK --out` writes only into a new or empty folder, or over an earlier
    data set of the same task."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("format") != SYNTH_FORMAT or manifest.get("task") != task:
        raise UserError(f"--out {out} exists and is not a `bytelm synth {task}` folder; choose a new or empty folder")
