"""The corpus stage: sources, dedupe, non-UTF-8 documents, the split, limits and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from bytelm.errors import UserError
from bytelm.shards import iter_documents
from data_prep.corpus import CorpusOptions, build_corpus, is_val
from data_prep.sources import Source


def doc(i: int) -> str:
    return f"def function_{i}(x):\n    return x * {i} + {i * i}\n"


def make_folder(path, texts: dict[str, str | bytes]):
    for name, text in texts.items():
        p = path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def corpus_docs(out) -> dict[str, list[bytes]]:
    return {split: list(iter_documents(out / "corpus" / split)) for split in ("train", "val")}


def build(tmp_path, sources, **kw):
    out = tmp_path / "out"
    manifest = build_corpus(out, CorpusOptions(sources=[str(s) for s in sources], **kw), workers=1)
    return out, manifest


def test_folder_glob_and_order(tmp_path):
    src = make_folder(tmp_path / "src", {"b.py": doc(1), "a/z.py": doc(2), "a/notes.txt": "text", "__pycache__/c.py": doc(3)})
    assert [n for n, _ in Source(str(src)).files()] == ["b.py", "a/z.py"]  # sorted walk, folders after files
    assert [n for n, _ in Source(str(src), globs=("*.txt",)).files()] == ["a/notes.txt"]
    assert [n for n, _ in Source(str(src), globs=("a/*",)).files()] == ["a/notes.txt", "a/z.py"]


def test_python_env_source_reads_stdlib_and_site_packages():
    env = Source("python-env")
    labels = [label for label, _ in env.roots]
    assert labels[0] == "stdlib" and "site-packages" in labels
    names = set()
    for name, _ in env.files():
        names.add(name)
        if len(names) > 3000:
            break
    assert "stdlib/json/__init__.py" in names
    assert not any("/site-packages/" in n for n in names if n.startswith("stdlib/"))


def test_jsonl_and_gzip_sources_with_text_field(tmp_path):
    rows = [{"content": doc(i), "id": i} for i in range(12)] + [{"content": ""}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:3] + [{"content": doc(99)}]) + "\n")
    out, m = build(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"], text_field="content", val_share=0.3)
    assert m["counts"]["read"]["docs"] == 12 + 4
    assert m["sources"][0]["skipped"] == {"empty": 1}
    assert m["dropped"]["duplicate"]["docs"] == 3  # b's first three rows repeat a's
    docs = corpus_docs(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(doc(i).encode() for i in [*range(12), 99])


def test_jsonl_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match="line 1 has no field 'content'"):
        build(tmp_path, [tmp_path / "a.jsonl"], text_field="content")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        build(tmp_path, [tmp_path / "b.jsonl"])
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="not a string"):
        build(tmp_path, [tmp_path / "c.jsonl"])
    assert not (tmp_path / "out" / "corpus").exists()


def test_exact_dedupe_keeps_first_copy(tmp_path):
    files = {f"f{i}.py": doc(i) for i in range(20)}
    files |= {"copy_a.py": doc(3), "sub/copy_b.py": doc(3), "near.py": doc(3) + " "}
    out, m = build(tmp_path, [make_folder(tmp_path / "src", files)], val_share=0.2)
    assert m["dropped"]["duplicate"] == {"docs": 2, "bytes": 2 * len(doc(3))}
    assert m["counts"]["kept"]["docs"] == 21  # 20 originals + the near-duplicate
    docs = corpus_docs(out)
    assert len(docs["train"] + docs["val"]) == len(set(docs["train"] + docs["val"])) == 21


def test_non_utf8_documents_are_kept_and_counted(tmp_path):
    bad = b"# latin-1: caf\xe9\nx = 1\n"
    files = {f"f{i}.py": doc(i) for i in range(10)} | {"latin.py": bad}
    out, m = build(tmp_path, [make_folder(tmp_path / "src", files)], val_share=0.2)
    assert m["counts"]["non_utf8_kept"] == {"docs": 1, "bytes": len(bad)}
    assert m["split"]["train"]["non_utf8_docs"] + m["split"]["val"]["non_utf8_docs"] == 1
    docs = corpus_docs(out)
    assert bad in docs["train"] + docs["val"]


def test_split_depends_only_on_content(tmp_path):
    texts = [doc(i) for i in range(300)]
    out1, m1 = build(tmp_path / "one", [make_folder(tmp_path / "a", {f"{i:03d}.py": t for i, t in enumerate(texts)})], val_share=0.2)
    # The same documents, another order, other names, another kind of source.
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    out2, m2 = build(tmp_path / "two", [tmp_path / "b.jsonl"], val_share=0.2)
    d1, d2 = corpus_docs(out1), corpus_docs(out2)
    assert set(d1["val"]) == set(d2["val"]) and set(d1["train"]) == set(d2["train"])
    assert 0.12 < len(d1["val"]) / 300 < 0.28  # about val_share
    assert all(is_val(hashlib.blake2b(d, digest_size=16).digest(), 0.2) for d in d1["val"])
    # A larger val share only moves documents from train to val.
    out3, _ = build(tmp_path / "three", [tmp_path / "b.jsonl"], val_share=0.4)
    assert set(d1["val"]) <= set(corpus_docs(out3)["val"])


def test_max_bytes_stops_reading(tmp_path):
    src = make_folder(tmp_path / "src", {f"f{i:03d}.py": doc(i) for i in range(100)})
    out, m = build(tmp_path, [src], max_bytes=1000, val_share=0.3)
    assert m["counts"]["stopped_at_max_bytes"]
    assert 1000 <= m["counts"]["kept"]["bytes"] < 1000 + 50


def test_missing_source(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build(tmp_path, [tmp_path / "nope"])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not .jsonl"):
        build(tmp_path, [tmp_path / "file.txt"])
    assert not (tmp_path / "out").exists()


def test_empty_corpus_after_filtering(tmp_path):
    src = make_folder(tmp_path / "src", {"a.txt": "not python", "empty.py": ""})
    with pytest.raises(UserError, match="empty after filtering"):
        build(tmp_path, [src])
    assert not (tmp_path / "out" / "corpus").exists() and not (tmp_path / "out" / "manifest.json").exists()
    src2 = make_folder(tmp_path / "src2", {"one.py": doc(1)})
    with pytest.raises(UserError, match="split is empty"):
        build(tmp_path, [src2], val_share=0.01)


def test_symlinks_are_followed_only_inside_the_source(tmp_path):
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0:the machine's own file\n")
    src = make_folder(tmp_path / "src", {f"f{i}.py": doc(i) for i in range(12)})
    (src / "link.py").symlink_to(secret)
    (src / "inside.py").symlink_to(src / "f3.py")  # inside the root: read (a duplicate here)
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    out, m = build(tmp_path, [src], val_share=0.3, globs=["*"])
    assert m["sources"][0]["skipped"] == {"link_outside_source": 1}
    assert m["dropped"]["duplicate"]["docs"] == 1
    docs = corpus_docs(out)
    assert secret.read_bytes() not in docs["train"] + docs["val"]
    # The user can opt in.
    out2, m2 = build(tmp_path / "two", [src], val_share=0.3, globs=["*"], follow_symlinks=True)
    assert "link_outside_source" not in m2["sources"][0]["skipped"]
    docs2 = corpus_docs(out2)
    assert (docs2["train"] + docs2["val"]).count(secret.read_bytes()) == 1  # via link.py; sub/up's copy is a duplicate


@pytest.mark.timeout(60)
def test_fifo_and_other_non_regular_files_are_skipped(tmp_path):
    src = make_folder(tmp_path / "src", {f"f{i}.py": doc(i) for i in range(12)})
    os.mkfifo(src / "pipe.py")  # reading it would block forever
    out, m = build(tmp_path, [src], val_share=0.3)
    assert m["sources"][0]["skipped"] == {"not_regular_file": 1}
    assert m["counts"]["kept"]["docs"] == 12
