"""The corpus stage's datatrove pieces: steps, the part files between stages, executors.

The read stage is one datatrove pipeline run as N tasks; task r takes a contiguous block
of the input files (in source order, blocks of about equal input bytes) and runs

    ReadFiles -> FilterDocuments (--where, size) -> Decontaminate -> WritePart -> exact_signatures

`WritePart` removes exact duplicates inside the task (first copy kept) and writes the
survivors as one *part*: `parts/{r:05d}/docs.bin` (the documents' bytes, concatenated),
`index.npy` (per document: BLAKE2b-128 digest, length, source, UTF-8 flag) and
`counts.json` (what each step read, skipped and dropped). A part is built under a
temporary name and renamed into place before datatrove marks the task completed, so a
killed run restarted with the same inputs skips the finished tasks and never reads a
half-written part.

The read stage ends with datatrove's `ExactDedupSignature` (`exact_signatures`): the
part's signatures, sorted, on disk. Its exact duplicates of earlier parts are then found by
datatrove's `ExactFindDedups` (`exact_merge`): one k-way heap merge over those files, which
holds one signature per part, whatever the number of documents.
MinHash signatures are computed by datatrove's own steps over `ReadParts` (the parts'
documents that survive exact deduplication).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.data import Document as DTDocument
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from data_prep.decontaminate import NgramIndex
from data_prep.sources import Source

INDEX_DTYPE = np.dtype([("digest", "V16"), ("length", "<i8"), ("source", "<i4"), ("utf8", "?")])
INDEX_ROW = struct.Struct("<16sqi?")  # one row of INDEX_DTYPE, packed the same way
MAX_LISTED_DROPS = 50  # names of contaminated documents listed per benchmark


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _count(c: dict, key: str, n_bytes: int) -> None:
    e = c.setdefault(key, {"docs": 0, "bytes": 0})
    e["docs"] += 1
    e["bytes"] += n_bytes


def block_bounds(sizes: list[int], tasks: int) -> list[int]:
    """Where each task's contiguous block of input files starts (and the end): blocks of
    about total/tasks input bytes each, so that no task holds more than its share (a file
    larger than the share is one task's alone)."""
    ends = np.cumsum(sizes, dtype=np.int64)
    total = int(ends[-1]) if len(sizes) else 0
    starts = [int(np.searchsorted(ends, r * total / tasks, side="right")) for r in range(tasks)] + [len(sizes)]
    starts[0] = 0
    return starts


class ReadFiles(PipelineStep):
    """Reads this task's block of input files; each document's bytes travel in metadata["data"]."""

    name = "bytelm sources"
    type = "📖 - READER"

    def __init__(self, sources: list[Source], units: list[tuple[int, str, str]], bounds: list[int], counts: dict):
        super().__init__()
        self.sources, self.units, self.bounds, self.counts = sources, units, bounds, counts

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        per_source = self.counts.setdefault("sources", {})
        for u in range(self.bounds[rank], self.bounds[rank + 1]):
            si, name, path = self.units[u]
            c = per_source.setdefault(str(si), {"read": {"docs": 0, "bytes": 0}, "skipped": {}})
            for d in self.sources[si].read_file(si, name, Path(path), c["skipped"]):
                _count(c, "read", len(d.data))
                self.stat_update("documents")
                meta = {"source": si, "data": d.data, "columns": d.columns}
                yield DTDocument(text=d.data.decode("utf-8", errors="replace"), id=d.name, metadata=meta)


class FilterDocuments(BaseFilter):
    """`--where COLUMN=V1,V2` on record columns (a list-valued column matches when any
    element does; values compare as strings, case-insensitively) and document size bounds."""

    name = "bytelm filters"

    def __init__(self, where: dict[str, list[str]], min_bytes: int, max_bytes: int, counts: dict):
        super().__init__()
        self.where = {k: {v.lower() for v in vs} for k, vs in where.items()}
        self.min_bytes, self.max_bytes, self.counts = min_bytes, max_bytes, counts

    def filter(self, doc: DTDocument) -> bool | tuple[bool, str]:
        from bytelm.errors import UserError

        n = len(doc.metadata["data"])
        for col, allowed in self.where.items():
            columns = doc.metadata["columns"]
            if col not in columns:
                raise UserError(f"{doc.id}: no column {col!r} for --where (columns: {', '.join(sorted(columns)) or 'none'})")
            value = columns[col]
            values = value if isinstance(value, (list, tuple)) else [value]
            if not any(str(v).lower() in allowed for v in values):
                _count(self.counts.setdefault("dropped", {}), f"filtered/{col}", n)
                return False, col
        if n < self.min_bytes or (self.max_bytes and n > self.max_bytes):
            _count(self.counts.setdefault("dropped", {}), "filtered/size", n)
            return False, "size"
        return True


class Decontaminate(BaseFilter):
    """Drops a document sharing an n-gram with a benchmark (data_prep/decontaminate.py)."""

    name = "bytelm decontamination"

    def __init__(self, index: NgramIndex, counts: dict):
        super().__init__()
        self.index, self.counts = index, counts

    def filter(self, doc: DTDocument) -> bool | tuple[bool, str]:
        hit = self.index.match(doc.text)
        if hit < 0:
            return True
        bench = self.index.names[hit]
        _count(self.counts.setdefault("dropped", {}), f"contaminated/{bench}", len(doc.metadata["data"]))
        names = self.counts.setdefault("contaminated_names", {}).setdefault(bench, [])
        if len(names) < MAX_LISTED_DROPS:
            names.append(doc.id)
        return False, f"contaminated/{bench}"


class WritePart(PipelineStep):
    """Exact dedup inside the task (first copy kept), then the task's part, written atomically.
    Passes on each kept document's digest (for `exact_signatures`).

    `max_bytes` > 0 (only with a single task) stops once that many bytes are kept.
    """

    name = "bytelm part writer"
    type = "💽 - WRITER"

    def __init__(self, folder: str, counts: dict, max_bytes: int = 0):
        super().__init__()
        self.folder, self.counts, self.max_bytes = folder, counts, max_bytes

    def run(self, data, rank: int = 0, world_size: int = 1):
        final = Path(self.folder) / f"{rank:05d}"
        tmp = Path(self.folder) / f".{rank:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed task
        tmp.mkdir(parents=True)
        seen: set[bytes] = set()
        n, kept = 0, 0
        dropped = self.counts.setdefault("dropped", {})
        # The index rows go to disk as they come (a list of them would cost ~130 bytes a document).
        with open(tmp / "docs.bin", "wb") as f, open(tmp / "index.bin", "wb") as rows:
            for doc in data:
                raw = doc.metadata["data"]
                h = digest(raw)
                if h in seen:
                    _count(dropped, "duplicate", len(raw))
                    continue
                seen.add(h)
                try:
                    raw.decode("utf-8")
                    utf8 = True
                except UnicodeDecodeError:
                    utf8 = False
                f.write(raw)
                rows.write(INDEX_ROW.pack(h, len(raw), doc.metadata["source"], utf8))
                yield DTDocument(text="", id=str(n), metadata={"digest": h, "part": rank})
                n += 1
                kept += len(raw)
                self.stat_update("kept")
                if self.max_bytes and kept >= self.max_bytes:
                    self.counts["stopped_at_max_bytes"] = True
                    break
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / "index.npy", np.fromfile(tmp / "index.bin", dtype=INDEX_DTYPE))
        (tmp / "index.bin").unlink()
        (tmp / "counts.json").write_text(json.dumps(self.counts, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def read_part(folder: Path) -> tuple[np.ndarray, Iterator[bytes]]:
    """(index, documents' bytes in order) of one part."""
    index = np.load(folder / "index.npy", allow_pickle=False)

    def docs() -> Iterator[bytes]:
        with open(folder / "docs.bin", "rb") as f:
            for n in index["length"].tolist():
                yield f.read(n)

    return index, docs()


class ReadParts(PipelineStep):
    """The documents of part `rank` that survive exact dedup (keep mask), for MinHash."""

    name = "bytelm parts"
    type = "📖 - READER"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        part = Path(self.folder) / f"{rank:05d}"
        keep = np.load(part / "keep.npy")
        index, docs = read_part(part)
        for i, raw in enumerate(docs):
            if keep[i]:
                yield DTDocument(text=raw.decode("utf-8", errors="replace"), id=str(i), metadata={"i": i})


# datatrove's exact dedup keeps, of the documents sharing a hash, the one of highest
# priority (1..65535): part r has priority MAX_TASKS + 1 - r, so the copy of the earliest part
# is kept; inside a part there is none left to choose (WritePart kept the first).
MAX_TASKS = 65534


def part_digest(doc: DTDocument) -> bytes:
    return doc.metadata["digest"]


def earlier_part_first(doc: DTDocument) -> int:
    return MAX_TASKS + 1 - doc.metadata["part"]


def _exact_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=part_digest, document_priority=earlier_part_first)


def exact_signatures(work: Path) -> ExactDedupSignature:
    """The read stage's last step: the part's signatures, sorted, to `work/sigs/`. The hash
    is xxhash64 of the BLAKE2b-128 digest: two different documents are taken for copies
    with probability about n^2 / 2^65 for n documents (1e-5 at 20 million)."""
    return ExactDedupSignature(str(work / "sigs"), config=_exact_config())


def exact_merge(work: Path) -> ExactFindDedups:
    """One task: the heap merge of every part's sorted signature file, which writes, for part
    r, the numbers of its documents that repeat one of an earlier part to
    `work/dups/00000/{r:05d}.c4_dup` (read back by `duplicate_ids`)."""
    return ExactFindDedups(str(work / "sigs"), str(work / "dups"), config=_exact_config())


def duplicate_ids(work: Path, rank: int) -> np.ndarray:
    """Numbers (in part `rank`) of the documents that `exact_merge` found to repeat an earlier one."""
    found = [np.fromfile(f, dtype="<u4") for f in sorted((work / "dups").glob(f"*/{rank:05d}.c4_dup"))]
    return np.concatenate(found) if found else np.zeros(0, dtype="<u4")


class CodeWords(WordTokenizer):
    """MinHash shingles over whitespace-separated words (code has no sentences to find)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def quiet_datatrove() -> None:
    """datatrove logs through loguru to stderr: keep its messages off prepare's terminal
    (each task still writes its full log to logging_dir/logs/task_NNNNN.log)."""
    from loguru import logger

    logger.remove()
    logger.add(_Discard(), level="WARNING")


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, its tasks' logs only in their log files."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with contextlib.redirect_stderr(_Discard()):
            try:
                return super()._run_for_rank(rank, local_rank, node_rank)
            finally:
                quiet_datatrove()

    def run(self):
        quiet_datatrove()
        return super().run()


def run_on_slurm(pipeline: list, tasks: int, logging_dir: Path, partition: str, time_limit: str, poll_s: float = 2.0) -> None:
    """Submit the stage as a Slurm job array (datatrove's SlurmPipelineExecutor) and wait
    until every task has completed; a job that ends with tasks left undone is an error
    naming the logs. The jobs run this Python (its folder first on PATH) with this
    process's environment (sbatch exports it)."""
    import subprocess
    import sys
    import time

    from datatrove.executor.slurm import SlurmPipelineExecutor

    from bytelm.errors import UserError

    quiet_datatrove()
    ex = SlurmPipelineExecutor(
        pipeline,
        tasks=tasks,
        time=time_limit,
        partition=partition,
        cpus_per_task=1,
        mem_per_cpu_gb=2,
        job_name=f"bytelm-{logging_dir.name}",
        logging_dir=str(logging_dir),
        slurm_logs_folder=str(logging_dir / "slurm_logs"),
        env_command=f"export PATH={Path(sys.executable).parent}:$PATH",
        requeue_signals=None,
    )
    if not ex.get_incomplete_ranks():
        return
    try:
        ex.run()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise UserError(f"sbatch failed for {logging_dir.name}: {e}") from None
    while ex.get_incomplete_ranks():
        alive = subprocess.run(["squeue", "-h", "-j", str(ex.job_id)], capture_output=True, text=True).stdout.strip()
        if not alive and ex.get_incomplete_ranks():
            raise UserError(
                f"Slurm job {ex.job_id} ({logging_dir.name}) ended with tasks {ex.get_incomplete_ranks()[:10]} "
                f"not completed; see {logging_dir}/logs and {logging_dir}/slurm_logs; the same command resumes"
            )
        time.sleep(poll_s)
