"""The datatrove corpus stage: parquet, JSONL (.zst) and saved HF datasets, filters, weights,
MinHash, the task count, resuming a killed run, and bad input as one line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bytelm.errors import UserError
from bytelm.shards import iter_documents
from data_prep.corpus import CorpusOptions, build_corpus, is_val


def doc(i: int) -> str:
    return f"def function_{i}(x):\n    return x * {i} + {i * i}\n"


def corpus_docs(out) -> dict[str, list[bytes]]:
    return {split: list(iter_documents(out / "corpus" / split)) for split in ("train", "val")}


def build(out, sources, workers=1, **kw):
    return build_corpus(out, CorpusOptions(sources=[str(s) for s in sources], **kw), workers=workers)


def stack_rows(start: int, n: int) -> dict[str, list]:
    """Rows shaped like The Stack: content, path, language, extension, licenses (a list), size."""
    ids = range(start, start + n)
    return {
        "content": [doc(i) for i in ids],
        "max_stars_repo_path": [f"repo/m{i}.{'py' if i % 3 else 'js'}" for i in ids],
        "lang": ["Python" if i % 3 else "JavaScript" for i in ids],
        "ext": ["py" if i % 3 else "js" for i in ids],
        "licenses": [["MIT"] if i % 2 else ["GPL-3.0", "Apache-2.0"] for i in ids],
        "size": [len(doc(i)) for i in ids],
    }


@pytest.fixture
def stack(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    for k in range(3):
        pq.write_table(pa.table(stack_rows(k * 20, 20)), folder / f"train-{k:05d}.parquet", row_group_size=7)
    return folder


def test_parquet_glob_text_field_and_filters(tmp_path, stack):
    out = tmp_path / "out"
    m = build(out, [stack / "*.parquet"], text_field="content", val_share=0.3, where=["lang=python", "licenses=MIT,Apache-2.0"])
    assert m["sources"][0]["kind"] == "parquet" and len(m["sources"][0]["roots"]) == 3
    assert m["counts"]["read"]["docs"] == 60
    python = [i for i in range(60) if i % 3]
    assert m["dropped"]["filtered/lang"]["docs"] == 60 - len(python)
    # Every row has MIT or Apache-2.0 in its license list: the second filter drops nothing.
    assert "filtered/licenses" not in m["dropped"]
    docs = corpus_docs(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(doc(i).encode() for i in python)
    # Size bounds and a column holding a list.
    m2 = build(tmp_path / "two", [stack / "*.parquet"], text_field="content", val_share=0.3, where=["licenses=gpl-3.0"], max_doc_bytes=44)
    kept = [i for i in range(60) if i % 2 == 0 and len(doc(i)) <= 44]
    assert m2["counts"]["kept"]["docs"] == len(kept) and m2["dropped"]["filtered/size"]["docs"] > 0


def test_parquet_bad_input(tmp_path, stack):
    with pytest.raises(UserError, match="has no column 'text'.*--text-field"):
        build(tmp_path / "a", [stack / "*.parquet"])
    with pytest.raises(UserError, match="no column 'language' for --where"):
        build(tmp_path / "b", [stack / "*.parquet"], text_field="content", where=["language=python"])
    with pytest.raises(UserError, match="matches no file"):
        build(tmp_path / "c", [stack / "*.parq"])
    # A corrupt file: an error by default, or skipped and counted.
    (stack / "train-00001.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(UserError, match="cannot read .*train-00001.parquet.*--on-corrupt skip"):
        build(tmp_path / "d", [stack / "*.parquet"], text_field="content", val_share=0.3)
    m = build(tmp_path / "e", [stack / "*.parquet"], text_field="content", val_share=0.3, on_corrupt="skip")
    assert m["sources"][0]["skipped"] == {"corrupt_files": 1} and m["counts"]["read"]["docs"] == 40
    for name in "abcd":
        assert not (tmp_path / name / "corpus").exists()


def test_non_utf8_parquet_bytes_are_kept_for_the_byte_arm(tmp_path):
    bad = b"# caf\xe9\nx = 1\n"
    rows = [doc(i).encode() for i in range(12)] + [bad]
    pq.write_table(pa.table({"content": pa.array(rows, type=pa.binary())}), tmp_path / "bin.parquet")
    out = tmp_path / "out"
    m = build(out, [tmp_path / "bin.parquet"], text_field="content", val_share=0.3)
    assert m["counts"]["non_utf8_kept"] == {"docs": 1, "bytes": len(bad)}
    docs = corpus_docs(out)
    assert bad in docs["train"] + docs["val"]


def test_jsonl_zst_and_saved_hf_dataset(tmp_path):
    import datasets
    import zstandard

    rows = [{"text": doc(i), "lang": "python"} for i in range(15)]
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    datasets.Dataset.from_list([{"content": doc(i)} for i in range(10, 25)]).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"content": doc(99)}])}).save_to_disk(str(tmp_path / "hfdict"))
    out = tmp_path / "out"
    m = build(out, [tmp_path / "a.jsonl.zst"], val_share=0.3, where=["lang=Python"])
    assert m["counts"]["kept"]["docs"] == 15
    m2 = build(tmp_path / "two", [tmp_path / "hf", tmp_path / "hfdict"], text_field="content", val_share=0.3)
    assert [s["kind"] for s in m2["sources"]] == ["hf-disk", "hf-disk"]
    docs = corpus_docs(tmp_path / "two")
    assert sorted(docs["train"] + docs["val"]) == sorted(doc(i).encode() for i in [*range(10, 25), 99])


def reference_corpus(texts: list[bytes], val_share: float) -> dict[str, list[bytes]]:
    """The rules by hand: first copy kept, split by the content hash, in source order."""
    seen, out = set(), {"train": [], "val": []}
    for t in texts:
        if t in seen:
            continue
        seen.add(t)
        out["val" if is_val(hashlib.blake2b(t, digest_size=16).digest(), val_share) else "train"].append(t)
    return out


def test_task_count_changes_nothing(tmp_path):
    src = tmp_path / "src"
    texts = []
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        text = doc(i % 25)  # 15 duplicates, spread over files that land in different tasks
        (src / f"d{i % 4}" / f"f{i:02d}.py").write_text(text)
    names = sorted((p.relative_to(src).as_posix(), p) for p in src.rglob("*.py"))
    texts = [p.read_bytes() for _, p in names]
    one = build(tmp_path / "one", [src], val_share=0.3, tasks=1)
    many = build(tmp_path / "many", [src], workers=2, val_share=0.3, tasks=7)
    assert corpus_docs(tmp_path / "one") == corpus_docs(tmp_path / "many") == reference_corpus(texts, 0.3)
    assert one["dropped"]["duplicate"]["docs"] == many["dropped"]["duplicate"]["docs"] == 15
    assert one["content_sha256"] == many["content_sha256"]
    assert not (tmp_path / "many" / ".work").exists()  # the parts go once the corpus is written


def test_source_weights(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(200)))
    b.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(1000, 1200)))
    m = build(tmp_path / "out", [f"{a}@2", f"{b}@0.25"], val_share=0.1)
    docs = corpus_docs(tmp_path / "out")
    from_a = [d for d in docs["train"] if d in {doc(i).encode() for i in range(200)}]
    from_b = [d for d in docs["train"] + docs["val"] if d in {doc(i).encode() for i in range(1000, 1200)}]
    assert len(from_a) == 2 * len(set(from_a))  # weight 2: each train document twice
    assert len(set(docs["val"])) == len(docs["val"])  # validation documents once
    assert 25 <= len(from_b) <= 75 and m["dropped"]["weight"]["docs"] == 200 - len(from_b)  # about a quarter kept
    with pytest.raises(UserError, match="weight must be a number >= 0"):
        build(tmp_path / "bad", [f"{a}@-1"])


def test_minhash_removes_near_duplicates(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = [
        "".join(f"def routine_{k}_{i}(values, scale):\n    total = values[{i}] * scale + {k * i}\n    return total - {i}\n" for i in range(12))
        for k in range(6)
    ]
    for k, text in enumerate(base):
        (src / f"orig{k}.py").write_text(text)
        # A near copy: one line edited out of 36.
        (src / f"copy{k}.py").write_text(text.replace(f"return total - 5\n", "return total - 500\n"))
    for k in range(30):  # unrelated documents
        (src / f"other{k:02d}.py").write_text(f"class Thing{k}:\n    size = {k}\n    name = 'thing number {k} of many {k * 7}'\n")
    out = tmp_path / "out"
    m = build(out, [src], val_share=0.2, minhash=True, tasks=3)
    assert m["dropped"]["near_duplicate"]["docs"] == 6
    assert m["dropped"]["duplicate"]["docs"] == 0 and m["counts"]["kept"]["docs"] == 36
    assert m["near_dedup"]["bands"] == 14 and m["near_dedup"]["rows"] == 8 and abs(m["near_dedup"]["threshold"] - 0.719) < 1e-3
    docs = corpus_docs(out)
    kept = set(docs["train"] + docs["val"])
    for k, text in enumerate(base):  # one of each pair remains
        assert (text.encode() in kept) != ((src / f"copy{k}.py").read_bytes() in kept)
    assert all((src / f"other{k:02d}.py").read_bytes() in kept for k in range(30))


def test_killed_run_resumes_from_finished_tasks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.py").write_text(doc(i))
    out = tmp_path / "out"
    opts = CorpusOptions(sources=[str(src)], val_share=0.3, tasks=3)
    pid = os.fork()
    if pid == 0:  # a run killed (as by kill -9) in the middle of task 2's part
        os.setsid()  # its own process group, so that its helpers die with it below
        try:
            import data_prep.pipeline as pipeline

            write = pipeline.WritePart.run

            def dies_in_task_2(self, data, rank=0, world_size=1):
                if rank == 2:
                    next(iter(data))
                    os._exit(9)
                return write(self, data, rank, world_size)

            pipeline.WritePart.run = dies_in_task_2
            build_corpus(out, opts, workers=1)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # datatrove's manager process outlives a killed run
    work = next((out / ".work").iterdir())
    assert sorted(p.name for p in (work / "parts").iterdir()) == ["00000", "00001"]
    assert sorted(p.name for p in (work / "logs" / "read" / "completions").iterdir()) == ["00000", "00001"]
    assert not (out / "corpus").exists() and not (out / "manifest.json").exists()
    import data_prep.pipeline as pipeline

    ran, write = [], pipeline.WritePart.run

    def recorded(self, data, rank=0, world_size=1):
        ran.append(rank)
        return write(self, data, rank, world_size)

    pipeline.WritePart.run = recorded  # one worker: the tasks run in this process
    try:
        build_corpus(out, opts, workers=1)
    finally:
        pipeline.WritePart.run = write
    assert ran == [2]  # tasks 0 and 1 were not run again: their parts were read as they were
    assert not (out / ".work").exists()
    # and the result is the same as a run that was never interrupted
    build_corpus(tmp_path / "fresh", opts, workers=1)
    assert corpus_docs(out) == corpus_docs(tmp_path / "fresh")


def run_prepare(*args):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "bytelm", "prepare", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--source", "{stack}/*.parquet"], "has no column 'text'"),
        (["--source", "{stack}/*.nothing"], "matches no file"),
        (["--source", "{stack}/*.parquet", "--text-field", "content", "--where", "language=python"], "no column 'language'"),
        (["--source", "{stack}/*.parquet", "--text-field", "content", "--where", "lang"], "--where takes COLUMN=VALUE"),
    ],
)
def test_bad_input_through_the_command_line(tmp_path, stack, args, message):
    out = tmp_path / "out"
    r = run_prepare(*[a.format(stack=stack) for a in args], "--out", out, "--workers", 2, "--tokenizer", "bytes")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_slurm_executor_gives_the_local_corpus(tmp_path, slurm_cluster, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.py").write_text(doc(i % 24))
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    slurm = dict(executor="slurm", slurm_partition="debug")
    # corpus shards of 300 bytes: the encoding's job array has one task per shard
    m = build(tmp_path / "slurm", [src], val_share=0.3, tasks=3, minhash=True, minhash_bands=2, shard_bytes=300, **slurm)
    local = build(tmp_path / "local", [src], val_share=0.3, tasks=3, minhash=True, minhash_bands=2, shard_bytes=300)
    assert corpus_docs(tmp_path / "slurm") == corpus_docs(tmp_path / "local")
    assert m["dropped"] == local["dropped"] and m["dropped"]["duplicate"]["docs"] == 6
    # Token shards: a job array over the corpus shards, merged here, equal to the local encoding.
    from bytelm.tokenizers import ByteTokenizer
    from data_prep.sharding import encode_split

    split = tmp_path / "slurm" / "corpus" / "train"
    assert len(json.loads((split / "meta.json").read_text())["shards"]) >= 3
    encode_split(split, tmp_path / "slurm" / "bytes" / "train", ByteTokenizer(), "m", 256, executor=CorpusOptions(**slurm))
    encode_split(split, tmp_path / "local" / "bytes" / "train", ByteTokenizer(), "m", 256, workers=1)
    assert _files(tmp_path / "slurm" / "bytes" / "train") == _files(tmp_path / "local" / "bytes" / "train")
    assert _meta(tmp_path / "slurm" / "bytes" / "train") == _meta(tmp_path / "local" / "bytes" / "train")
    with pytest.raises(UserError, match="needs --slurm-partition"):
        build(tmp_path / "x", [src], executor="slurm")



def _signatures_with_copies(work, n_parts: int, n: int, seed: int) -> list[list[int]]:
    """The read stage's signature files of n_parts parts of n random digests each, about a
    tenth of them copies of a digest of an earlier part; returns, per part, the numbers of
    its documents that repeat an earlier one."""
    import numpy as np
    from datatrove.data import Document

    from data_prep.pipeline import exact_signatures

    rng = np.random.default_rng(seed)
    earlier: list[bytes] = []
    repeats = []
    for r in range(n_parts):
        fresh, docs, repeat = rng.bytes(16 * n), [], []
        for i in range(n):
            if earlier and rng.random() < 0.1:
                h = earlier[int(rng.integers(len(earlier)))]
                repeat.append(i)
            else:
                h = fresh[16 * i : 16 * i + 16]
            docs.append(Document(text="", id=str(i), metadata={"digest": h, "part": r}))
        earlier += [d.metadata["digest"] for d in docs]
        exact_signatures(work).run(iter(docs), rank=r, world_size=n_parts)
        repeats.append(repeat)
    return repeats


def test_exact_dedup_merge_holds_one_signature_per_part(tmp_path):
    """The cross-part merge (datatrove's heap merge of the sorted signature files) finds every
    copy of an earlier part's document, and its Python memory peak does not grow with the
    number of documents: 10 times the documents, under 1.5 times the peak (a set of the
    hashes seen, as before, grows 10 times)."""
    import tracemalloc

    from data_prep.pipeline import duplicate_ids, exact_merge

    peaks = []
    for n in (2_000, 20_000):
        work = tmp_path / f"work{n}"
        repeats = _signatures_with_copies(work, 4, n, seed=n)
        tracemalloc.start()
        exact_merge(work).run(rank=0, world_size=1)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert [sorted(duplicate_ids(work, r).tolist()) for r in range(4)] == repeats
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_read_blocks_share_the_input_bytes():
    import random

    from data_prep.pipeline import block_bounds

    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([0, 1, 10, 1000, rng.randrange(5000)]) for _ in range(rng.randrange(1, 40))]
        tasks = rng.randrange(1, len(sizes) + 1)
        b = block_bounds(sizes, tasks)
        assert b[0] == 0 and b[-1] == len(sizes) and b == sorted(b) and len(b) == tasks + 1
        for r in range(tasks):  # a block holds its share, give or take one file
            assert sum(sizes[b[r] : b[r + 1]]) <= sum(sizes) / tasks + max(sizes)


def _corpus_split(split, docs: list[bytes], shard_bytes: int) -> None:
    from bytelm.shards import CORPUS_FORMAT, ShardWriter

    with ShardWriter(split, "uint8", None, {"source": "test"}, shard_bytes, CORPUS_FORMAT) as w:
        for d in docs:
            w.add(d, len(d))


def _reference_split(corpus_split, out_split, tokenizer, shard_tokens: int) -> None:
    """The split as one process writes it, document by document (the encoding before tasks)."""
    import numpy as np

    from bytelm.shards import ShardWriter, token_dtype

    desc = tokenizer.describe()
    skipped = {"non_utf8_docs": 0, "non_utf8_bytes": 0}
    if tokenizer.kind == "bpe":
        desc["path"] = "bpe/tokenizer.json"
    meta = {"tokenizer": desc, "manifest_sha256": "m", "skipped": skipped}
    with ShardWriter(out_split, token_dtype(tokenizer.vocab_size), tokenizer.eos_id, meta, shard_tokens) as w:
        for d in iter_documents(corpus_split):
            if tokenizer.kind == "bytes":
                w.add(np.frombuffer(d, dtype=np.uint8), len(d))
                continue
            try:
                text = d.decode("utf-8")
            except UnicodeDecodeError:
                skipped["non_utf8_docs"] += 1
                skipped["non_utf8_bytes"] += len(d)
                continue
            w.add(np.asarray(tokenizer.encode(text), dtype=np.int64), len(d))


def _files(split) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split.iterdir()) if p.name != "meta.json"}


def _meta(split) -> dict:
    m = json.loads((split / "meta.json").read_text())
    m.pop("key", None), m.pop("tokenizer_sha256", None)
    return m


@pytest.fixture
def multi_shard_corpus(tmp_path):
    """A corpus split of 6 shards of 65,536 bytes: small documents, one non-UTF-8, and one
    of 150 kB that spans three shards (so one shard starts no document)."""
    import random

    rng = random.Random(0)
    docs = [doc(i).encode() * rng.randrange(1, 60) for i in range(120)]
    docs.insert(40, "".join(doc(i) for i in range(3000)).encode()[:150_000])
    docs.insert(7, b"# caf\xe9\n" * 10)
    split = tmp_path / "d" / "corpus" / "train"
    _corpus_split(split, docs, 1 << 16)
    assert len(json.loads((split / "meta.json").read_text())["shards"]) >= 5
    return split


def test_encoding_tasks_give_the_one_process_shards(multi_shard_corpus, smoke_data, monkeypatch):
    """One task per corpus shard, in a process pool, merged: the same files as encoding the
    split document by document in one process, for bytes and for BPE."""
    from bytelm.tokenizers import BPETokenizer, ByteTokenizer
    from data_prep import sharding
    from data_prep.sharding import encode_split

    monkeypatch.setattr(sharding, "BYTES_PER_PROCESS", 1 << 16)  # the pool, on a small split

    d = multi_shard_corpus.parent.parent
    for tok in (ByteTokenizer(), BPETokenizer(smoke_data / "bpe" / "tokenizer.json")):
        out = d / tok.kind / "train"
        meta = encode_split(multi_shard_corpus, out, tok, "m", 1 << 16, workers=2)
        _reference_split(multi_shard_corpus, d / "ref" / tok.kind, tok, 1 << 16)
        assert _files(out) == _files(d / "ref" / tok.kind) and len(_files(out)) >= 6
        assert _meta(out) == _meta(d / "ref" / tok.kind)
        assert meta["skipped"]["non_utf8_docs"] == (tok.kind == "bpe")
    assert not (d / ".work").exists()


def test_killed_encoding_resumes_from_finished_tasks(multi_shard_corpus):
    from bytelm.tokenizers import ByteTokenizer
    from data_prep import sharding
    from data_prep.sharding import encode_split

    d = multi_shard_corpus.parent.parent
    out = d / "bytes" / "train"
    pid = os.fork()
    if pid == 0:  # a run killed (as by kill -9) in the middle of task 2
        os.setsid()
        try:
            run = sharding.EncodeShard.run

            def dies_in_task_2(self, data=None, rank=0, world_size=1):
                if rank == 2:
                    os._exit(9)
                return run(self, data, rank, world_size)

            sharding.EncodeShard.run = dies_in_task_2
            encode_split(multi_shard_corpus, out, ByteTokenizer(), "m", 1 << 16, workers=1)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    work = next((d / ".work" / "encode").iterdir())
    assert sorted(p.name for p in (work / "tasks").iterdir()) == ["00000", "00001"]
    assert not out.exists()  # nothing training would open
    ran = []
    run = sharding.EncodeShard.run

    def records(self, data=None, rank=0, world_size=1):
        ran.append(rank)
        return run(self, data, rank, world_size)

    sharding.EncodeShard.run = records
    try:
        encode_split(multi_shard_corpus, out, ByteTokenizer(), "m", 1 << 16, workers=1)
    finally:
        sharding.EncodeShard.run = run
    n_tasks = len(json.loads((multi_shard_corpus / "meta.json").read_text())["shards"])
    assert ran == list(range(2, n_tasks))  # the finished tasks were not run again
    _reference_split(multi_shard_corpus, d / "ref", ByteTokenizer(), 1 << 16)
    assert _files(out) == _files(d / "ref") and not (d / ".work").exists()
