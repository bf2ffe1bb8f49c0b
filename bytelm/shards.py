"""Flat token shards on disk: the writer `bytelm prepare` uses and the reader training uses.

A split folder (e.g. `DIR/bytes/train/`) holds `meta.json` and, per shard k,
`tokens_{k:05d}.bin` (a flat little-endian array of `meta["dtype"]`) and `docs_{k:05d}.npy`
(int64 start offset, inside that shard, of each document that starts there). The shards
concatenated are one token stream; every shard but the last holds exactly
`meta["shard_tokens"]` tokens, so a document may continue into the next shard. Every
document is followed by the tokenizer's EOS id (see docs/architecture.md).

The same writer stores the split corpus of raw documents (`DIR/corpus/{train,val}`, dtype
uint8, no separator, format `bytelm-corpus/1`), read back with `iter_documents`.

`ShardDataset.batch` cuts the stream into windows of T + n_future tokens that start every
T tokens (so each token is an input exactly once per epoch), visits them in a fresh
permutation each epoch, and derives everything from (seed, step, global row index): a run
resumes exactly from its step, and the rank takes its slice of the global batch, so the
data order does not depend on the number of GPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from bytelm.errors import UserError
from bytelm.fileio import atomic_path
from bytelm.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer

TOKEN_FORMAT = "bytelm-shards/1"
CORPUS_FORMAT = "bytelm-corpus/1"
SYNTH_FORMAT = "bytelm-synth/1"  # the manifest.json of a `bytelm synth` data set
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB of uint16 per shard
IGNORE_INDEX = -100  # the target value that cross-entropy skips


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


# Bytes at each end of a token file whose sha256 (`edge_sha256`) is checked every time a
# split is opened: garbled or swapped shards of the right size are caught in milliseconds,
# where the full sha256 (`verify=True`) reads every byte.
EDGE_BYTES = 1 << 20


def edge_sha256(path: Path) -> str:
    """sha256 of the first and the last EDGE_BYTES of a file (the whole of a small one)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        h.update(f.read(min(size, EDGE_BYTES)))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read())
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing


class ShardWriter:
    """Append documents; shards are streamed to disk, so memory stays at one document.

    Use as a context manager: the split folder is built under a temporary name and
    renamed into place only when the block ends without an exception.

        with ShardWriter(out, dtype="uint16", eos_id=256, meta={"tokenizer": ...}) as w:
            w.add(ids, n_text_bytes)
    """

    def __init__(
        self,
        out_dir: str | Path,
        dtype: str,
        eos_id: int | None,
        meta: dict,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        format: str = TOKEN_FORMAT,
    ):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be >= 1")
        self.out_dir = Path(out_dir)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eos = None if eos_id is None else np.array([eos_id], dtype=self.dtype)
        self.extra_meta = meta
        self.shard_tokens = shard_tokens
        self.format = format
        self.n_tokens = self.n_docs = self.n_text_bytes = 0
        self._shards: list[dict] = []
        self._file = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardWriter:
        self._dir = self._stack.enter_context(atomic_path(self.out_dir, marker="meta.json"))
        self._dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
            elif self._file is not None:
                self._file.close()
        except BaseException as e:
            exc_type, exc, tb = type(e), e, e.__traceback__
            raise
        finally:
            # atomic_path: rename into place on success, delete the temporary on error.
            self._stack.__exit__(exc_type, exc, tb)

    def _open_shard(self) -> None:
        k = len(self._shards)
        self._shard = {"tokens": f"tokens_{k:05d}.bin", "docs": f"docs_{k:05d}.npy", "n_tokens": 0}
        self._file = open(self._dir / self._shard["tokens"], "wb")
        self._hash = hashlib.sha256()
        self._starts: list[int] = []

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        docs = np.asarray(self._starts, dtype=np.int64)
        np.save(self._dir / self._shard["docs"], docs)
        self._shard.update(
            n_docs=len(docs), sha256=self._hash.hexdigest(), docs_sha256=sha256_file(self._dir / self._shard["docs"]),
            edge_sha256=edge_sha256(self._dir / self._shard["tokens"]),
        )
        self._shards.append(self._shard)

    def _write(self, arr: np.ndarray) -> None:
        """Write tokens, starting a new shard whenever the current one is full."""
        while len(arr):
            if self._file is None:
                self._open_shard()
            room = self.shard_tokens - self._shard["n_tokens"]
            part, arr = arr[:room], arr[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._shard["n_tokens"] += len(part)
            if self._shard["n_tokens"] == self.shard_tokens:
                self._close_shard()

    def add(self, ids: np.ndarray | bytes, n_text_bytes: int) -> None:
        """One document: its ids (then EOS, when the writer has one) and its text's byte count."""
        arr = np.frombuffer(ids, dtype=np.uint8) if isinstance(ids, bytes) else np.asarray(ids)
        if arr.size and arr.dtype != self.dtype and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of the range of {self.dtype.name}")
        arr = arr.astype(self.dtype, copy=False)
        if self._file is None:
            self._open_shard()
        self._starts.append(self._shard["n_tokens"])
        self._write(arr)
        if self.eos is not None:
            self._write(self.eos)
        self.n_docs += 1
        self.n_tokens += len(arr) + (self.eos is not None)
        self.n_text_bytes += n_text_bytes

    def _finish(self) -> None:
        if self._file is not None:
            self._close_shard()
        meta = {
            "format": self.format,
            "dtype": self.dtype.name,
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "n_text_bytes": self.n_text_bytes,
            "shard_tokens": self.shard_tokens,
            "shards": self._shards,
            **self.extra_meta,
        }
        (self._dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.meta = meta


# ----------------------------------------------------------------------------- reading


def read_meta(split_dir: str | Path, format: str = TOKEN_FORMAT, verify: bool = False) -> dict:
    """meta.json of a split folder, checked against the files beside it.

    Sizes, document offsets and the sha256 of each token file's ends (`edge_sha256`,
    where the shards record it) are always checked (cheap); `verify=True` also compares
    every file's sha256 with the one recorded at write time.
    """
    split_dir = Path(split_dir)
    path = split_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"{split_dir} is not a prepared split: {path.name} not found (run `bytelm prepare`)")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != format:
            raise UserError(f"{path}: format {meta.get('format')!r}, expected {format!r}")
        _check_shards(split_dir, meta, verify)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a valid meta.json ({type(e).__name__}: {e})") from None
    return meta


def _check_shards(split_dir: Path, meta: dict, verify: bool) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"{split_dir}: {msg}; meta.json does not match its shards (re-run `bytelm prepare`)")

    itemsize = np.dtype(meta["dtype"]).itemsize
    shards = meta["shards"]
    if sum(s["n_tokens"] for s in shards) != meta["n_tokens"] or sum(s["n_docs"] for s in shards) != meta["n_docs"]:
        raise bad("the shard counts do not add up to the totals")
    for k, s in enumerate(shards):
        tok, docs = split_dir / s["tokens"], split_dir / s["docs"]
        if not tok.is_file() or not docs.is_file():
            raise bad(f"shard {k} file {tok.name if not tok.is_file() else docs.name} is missing")
        if tok.stat().st_size != s["n_tokens"] * itemsize:
            raise bad(f"{tok.name} has {tok.stat().st_size} bytes, expected {s['n_tokens'] * itemsize} (truncated?)")
        if k < len(shards) - 1 and s["n_tokens"] != meta["shard_tokens"]:
            raise bad(f"{tok.name} holds {s['n_tokens']} tokens, not the shard size {meta['shard_tokens']}")
        if "edge_sha256" in s and edge_sha256(tok) != s["edge_sha256"]:
            raise bad(f"{tok.name} fails its checksum (its content changed since it was written: corrupt?)")
        if verify:
            for file, key in ((tok, "sha256"), (docs, "docs_sha256")):
                if sha256_file(file) != s[key]:
                    raise bad(f"{file.name} fails its sha256 check (corrupt)")


def _doc_starts(split_dir: Path, meta: dict) -> np.ndarray:
    """Global start offset of every document in the split's token stream."""
    parts, base = [], 0
    for s in meta["shards"]:
        try:
            docs = np.load(split_dir / s["docs"], allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{split_dir / s['docs']} is not a valid .npy file ({e}); re-run `bytelm prepare`") from None
        if docs.ndim != 1 or len(docs) != s["n_docs"] or (len(docs) and (docs.min() < 0 or docs.max() >= s["n_tokens"])):
            raise UserError(f"{split_dir / s['docs']} does not match meta.json; re-run `bytelm prepare`")
        parts.append(docs.astype(np.int64) + base)
        base += s["n_tokens"]
    starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(starts) and (starts[0] != 0 or np.any(np.diff(starts) <= 0)):
        raise UserError(f"{split_dir}: document offsets are not increasing from 0; re-run `bytelm prepare`")
    return starts


class _TokenStream:
    """The shards of a split as one read-only token array (memory-mapped)."""

    def __init__(self, split_dir: Path, meta: dict):
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.maps = [np.memmap(split_dir / s["tokens"], dtype=dtype, mode="r") if s["n_tokens"] else None for s in meta["shards"]]
        self.ends = np.cumsum([s["n_tokens"] for s in meta["shards"]], dtype=np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) across shard boundaries, as int64."""
        out = []
        k = int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            base = int(self.ends[k - 1]) if k else 0
            end = min(stop, int(self.ends[k]))
            out.append(self.maps[k][start - base : end - base])
            start, k = end, k + 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def iter_documents(split_dir: str | Path, verify: bool = False) -> Iterator[bytes]:
    """The raw documents of a corpus split (`DIR/corpus/train`), in order.

    Plain sequential reads, not a memory map: a pass over a large corpus should not leave
    every page of it mapped into this process (its resident size would grow to the
    corpus size).
    """
    split_dir = Path(split_dir)
    meta = read_meta(split_dir, format=CORPUS_FORMAT, verify=verify)
    starts = _doc_starts(split_dir, meta)
    lengths = np.diff(np.append(starts, meta["n_tokens"])) * np.dtype(meta["dtype"]).itemsize
    files = iter([split_dir / s["tokens"] for s in meta["shards"]])
    f = None
    try:
        for need in lengths.tolist():
            parts = []
            while need:
                f = f or open(next(files), "rb")
                part = f.read(need)
                if not part:  # end of this shard: the document goes on in the next one
                    f.close()
                    f = None
                    continue
                parts.append(part)
                need -= len(part)
            yield b"".join(parts)
    finally:
        if f is not None:
            f.close()


class ShardDataset:
    """A prepared split (`DIR/bytes/train`, `DIR/bpe/val`, ...), memory-mapped.

    Attributes: `meta`, `tokenizer`, `n_tokens`, `n_docs`, `n_text_bytes`.
    """

    def __init__(self, split_dir: str | Path, verify: bool = False):
        self.split_dir = Path(split_dir)
        self.meta = read_meta(self.split_dir, verify=verify)
        manifest = self.split_dir.parent.parent / "manifest.json"
        if "manifest_sha256" in self.meta and not manifest.is_file():
            raise UserError(f"{self.split_dir} was encoded from the corpus that {manifest} describes, and that file is "
                            "missing: copy the prepared folder whole, or re-run `bytelm prepare`")
        if "manifest_sha256" in self.meta and sha256_file(manifest) != self.meta["manifest_sha256"]:
            raise UserError(
                f"{self.split_dir} was encoded from another corpus than {manifest} describes; "
                "re-run `bytelm prepare` with this tokenizer"
            )
        self.tokenizer = self._load_tokenizer()
        expected = token_dtype(self.tokenizer.vocab_size)
        if self.meta["dtype"] != expected:
            raise UserError(f"{self.split_dir}: dtype {self.meta['dtype']} does not fit the tokenizer (expected {expected})")
        self.n_tokens = int(self.meta["n_tokens"])
        self.n_docs = int(self.meta["n_docs"])
        self.n_text_bytes = int(self.meta["n_text_bytes"])
        self.doc_starts = _doc_starts(self.split_dir, self.meta)
        self._stream = _TokenStream(self.split_dir, self.meta)
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}
        if self.n_tokens and self._stream.read(self.n_tokens - 1, self.n_tokens)[0] != self.tokenizer.eos_id:
            raise UserError(f"{self.split_dir}: the last token is not EOS; the shards are damaged (re-run `bytelm prepare`)")

    def _load_tokenizer(self) -> Tokenizer:
        spec = self.meta.get("tokenizer") or {}
        kind, rel = spec.get("kind"), spec.get("path")
        # The BPE path is relative to the prepared folder (DIR/bpe/train -> DIR), so the
        # folder can be moved or copied whole.
        tok = load_tokenizer(kind, self.split_dir.parent.parent / rel if rel else None)
        for key in ("vocab_size", "eos_id", "pad_id"):
            if spec.get(key) != getattr(tok, key):
                raise UserError(
                    f"{self.split_dir}/meta.json says the tokenizer's {key} is {spec.get(key)}, "
                    f"but the {kind} tokenizer{' at ' + str(rel) if rel else ''} has {getattr(tok, key)}"
                )
        if isinstance(tok, ByteTokenizer) and rel:
            raise UserError(f"{self.split_dir}/meta.json: a bytes tokenizer takes no path")
        return tok

    # ------------------------------------------------------------------ windows

    def n_windows(self, seq_len: int, n_future: int) -> int:
        """Windows of seq_len + n_future tokens, starting every seq_len tokens."""
        if seq_len < 1 or n_future < 1:
            raise ValueError("seq_len and n_future must be >= 1")
        return max(0, (self.n_tokens - n_future) // seq_len)

    def _windows(self, idx: np.ndarray, seq_len: int, n_future: int) -> tuple[np.ndarray, np.ndarray]:
        """Window numbers -> (x (B, T), y (B, T, n)) as int64 numpy arrays."""
        length = seq_len + n_future
        starts = idx.astype(np.int64) * seq_len
        tok = np.stack([self._stream.read(s, s + length) for s in starts.tolist()])
        if tok.size and tok.max() >= self.tokenizer.vocab_size:
            w = int(np.argmax(tok.max(axis=1)))
            raise UserError(f"{self.split_dir}: token id {int(tok.max())} near token {int(starts[w])} is outside the "
                            f"{self.tokenizer.kind} vocabulary of {self.tokenizer.vocab_size}: the shards are corrupt "
                            "(re-run `bytelm prepare`)")
        pos = starts[:, None] + np.arange(length)
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
        x = tok[:, :seq_len]
        y = np.empty((len(idx), seq_len, n_future), dtype=np.int64)
        for i in range(n_future):
            tgt = tok[:, i + 1 : i + 1 + seq_len]
            same_doc = doc[:, i + 1 : i + 1 + seq_len] == doc[:, :seq_len]
            y[:, :, i] = np.where(same_doc, tgt, IGNORE_INDEX)
        return x, y

    def _permutation(self, seed: int, epoch: int, n: int) -> np.ndarray:
        # A batch touches at most two epochs; keep the latest two permutations.
        key = (seed, epoch, n)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}
            self._perms[key] = np.random.default_rng([seed, epoch]).permutation(n)
        return self._perms[key]

    def batch(self, step: int, seq_len: int, n_future: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        """Rows [rank*B/world, (rank+1)*B/world) of global batch `step` -> torch (x, y).

        Row b of step s is global window number g = s*B + b of an endless sequence of
        epochs, each a fresh permutation (seeded by (seed, epoch)) of all windows.
        Gradient accumulation can ask for micro-batch m of rank r as rank r*A + m of
        world*A.
        """
        import torch

        if batch_size % world or not 0 <= rank < world:
            raise ValueError(f"batch_size {batch_size} must split evenly over world {world} (rank {rank})")
        n = self.n_windows(seq_len, n_future)
        if n == 0:
            raise UserError(
                f"{self.split_dir} holds {self.n_tokens} tokens: fewer than one window of "
                f"seq_len + n_future = {seq_len + n_future}; use a larger corpus or a shorter context"
            )
        per = batch_size // world
        g = step * batch_size + rank * per + np.arange(per, dtype=np.int64)
        epoch, i = np.divmod(g, n)
        idx = np.array([self._permutation(seed, int(e), n)[j] for e, j in zip(epoch.tolist(), i.tolist())], dtype=np.int64)
        x, y = self._windows(idx, seq_len, n_future)
        return torch.from_numpy(x), torch.from_numpy(y)

    def iter_eval_batches(self, seq_len: int, n_future: int, batch_size: int, max_batches: int | None = None):
        """The split in order, as (x, y) batches of consecutive windows (the last may be
        smaller); at most `max_batches` batches (None or 0: all)."""
        import torch

        n = self.n_windows(seq_len, n_future)
        if max_batches:
            n = min(n, max_batches * batch_size)
        for a in range(0, n, batch_size):
            x, y = self._windows(np.arange(a, min(a + batch_size, n)), seq_len, n_future)
            yield torch.from_numpy(x), torch.from_numpy(y)
