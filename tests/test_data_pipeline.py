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
    inode = (work / "parts" / "00000" / "docs.bin").stat().st_ino
    build_corpus(out, opts, workers=1)
    assert not (out / ".work").exists()
    # Tasks 0 and 1 were not run again (their part was read as it was), and the result is
    # the same as a run that was never interrupted.
    build_corpus(tmp_path / "fresh", opts, workers=1)
    assert corpus_docs(out) == corpus_docs(tmp_path / "fresh")
    assert inode  # (the part folder is gone now; its inode was taken while it existed)


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
    m = build(tmp_path / "slurm", [src], val_share=0.3, tasks=3, minhash=True, minhash_bands=2, executor="slurm", slurm_partition="debug")
    local = build(tmp_path / "local", [src], val_share=0.3, tasks=3, minhash=True, minhash_bands=2)
    assert corpus_docs(tmp_path / "slurm") == corpus_docs(tmp_path / "local")
    assert m["dropped"] == local["dropped"] and m["dropped"]["duplicate"]["docs"] == 6
    with pytest.raises(UserError, match="needs --slurm-partition"):
        build(tmp_path / "x", [src], executor="slurm")
