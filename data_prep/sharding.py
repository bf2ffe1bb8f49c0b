"""Encoding a corpus split into token shards (`DIR/{bytes,bpe}/{train,val}/`).

Bytes need no work beyond a copy into uint16 (with the EOS id 256 after each document).
BPE documents are encoded in batches of about 2 MB with `encode_batch`, which runs on
every core (the Rust side of `tokenizers` is multi-threaded). Documents that are not valid
UTF-8 are skipped by the BPE arm (the byte arm keeps them); meta.json counts them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.shards import (DEFAULT_SHARD_TOKENS, SYNTH_FORMAT, ShardWriter, iter_documents, read_meta, sha256_file,
                           token_dtype)
from bytelm.tokenizers import BPETokenizer, Tokenizer

BATCH_BYTES = 2 << 20  # HF Encoding objects cost ~150 bytes per token: keep batches small


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


def encode_split(
    corpus_split: Path,
    out_split: Path,
    tokenizer: Tokenizer,
    manifest_sha256: str,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Write one token split; skip it when its meta.json already records the same inputs."""
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
    dtype = token_dtype(tokenizer.vocab_size)
    progress = tqdm(desc=f"{tokenizer.kind}/{out_split.name}", unit="B", unit_scale=True, disable=None)
    with ShardWriter(out_split, dtype, tokenizer.eos_id, meta, shard_tokens) as writer:
        docs = iter_documents(corpus_split)
        if isinstance(tokenizer, BPETokenizer):
            for batch in _utf8_batches(docs, skipped):
                for (data, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
                    writer.add(np.asarray(ids, dtype=np.int64), len(data))
                progress.update(sum(len(d) for d, _ in batch))
        else:
            for data in docs:
                writer.add(np.frombuffer(data, dtype=np.uint8), len(data))
                progress.update(len(data))
    progress.close()
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
