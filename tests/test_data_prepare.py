"""`bytelm prepare` end to end, through the real command line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from bytelm.shards import ShardDataset


def run_prepare(*args, cwd=None):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "bytelm", "prepare", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def tree_hashes(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def code_folder(tmp_path):
    src = tmp_path / "src"
    for i in range(60):
        (src / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        # About 400 KB in all: enough for more than one shard of the smallest size allowed.
        body = "".join(f"    total += values[{j}] * {i + j}\n" for j in range(150 + i % 7))
        (src / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def compute_{i}(values):\n    total = 0\n{body}    return total\n")
    (src / "pkg0" / "latin1.py").write_bytes(b"# caf\xe9\nname = 'caf\xe9'\n")
    return src


def test_prepare_end_to_end_is_deterministic_and_skips_done_work(tmp_path, code_folder):
    args = ["--source", code_folder, "--bpe-vocab", 300, "--val-share", 0.3, "--shard-tokens", 65536]
    r = run_prepare(*args, "--out", tmp_path / "a")  # every core: the worker pool path
    assert r.returncode == 0, r.stderr
    a = tmp_path / "a"
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["counts"]["kept"]["docs"] == 61 and manifest["counts"]["non_utf8_kept"]["docs"] == 1
    for arm in ("bytes", "bpe"):
        train, val = ShardDataset(a / arm / "train", verify=True), ShardDataset(a / arm / "val", verify=True)
        assert len(train.meta["shards"]) > 1  # --shard-tokens bounds the shard size
        assert train.n_docs + val.n_docs == 61 - (arm == "bpe")  # BPE skips the latin-1 file
        assert train.meta["manifest_sha256"] == hashlib.sha256((a / "manifest.json").read_bytes()).hexdigest()
    bpe = ShardDataset(a / "bpe" / "train")
    assert bpe.tokenizer.vocab_size <= 300 and bpe.meta["tokenizer"]["path"] == "bpe/tokenizer.json"
    assert bpe.meta["skipped"]["non_utf8_docs"] + ShardDataset(a / "bpe" / "val").meta["skipped"]["non_utf8_docs"] == 1
    first = tree_hashes(a)

    again = run_prepare(*args, "--out", a, "--workers", 1)
    assert again.returncode == 0 and again.stdout.count("up to date") == 6, again.stdout
    assert tree_hashes(a) == first
    # From scratch elsewhere, on one worker: the same bytes.
    assert run_prepare(*args, "--out", tmp_path / "b", "--workers", 1).returncode == 0
    assert tree_hashes(tmp_path / "b") == first
    # The prepared folder can move: the BPE path in meta.json is relative to it.
    (tmp_path / "b").rename(tmp_path / "moved")
    assert ShardDataset(tmp_path / "moved" / "bpe" / "val").tokenizer.vocab_size == bpe.tokenizer.vocab_size

    # A changed input file is noticed; only what depends on it is redone.
    (code_folder / "pkg1" / "mod1.py").write_text("def changed():\n    return 'a new body'\n")
    r = run_prepare(*args, "--out", a, "--workers", 1, "--tokenizer", "bytes")
    assert r.returncode == 0 and "corpus: up to date" not in r.stdout
    assert tree_hashes(a)["manifest.json"] != first["manifest.json"]


def test_smoke_preset(smoke_data):
    manifest = json.loads((smoke_data / "manifest.json").read_text())
    assert manifest["sources"][0]["spec"] == "python-stdlib"
    assert 4_000_000 <= manifest["counts"]["kept"]["bytes"] < 5_000_000
    for arm in ("bytes", "bpe"):
        for split in ("train", "val"):
            ds = ShardDataset(smoke_data / arm / split, verify=True)
            assert ds.n_windows(256, 8) >= 16
    bpe = ShardDataset(smoke_data / "bpe" / "val")
    assert bpe.tokenizer.vocab_size == 2048 and bpe.n_text_bytes / bpe.n_tokens > 2.5


def test_cli_preset_writes_relative_to_cwd(tmp_path):
    r = run_prepare("--preset", "smoke", "--tokenizer", "bytes", "--max-bytes", 200_000, "--val-share", 0.3, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "smoke" / "bytes" / "train" / "meta.json").is_file()
    assert not (tmp_path / "data" / "smoke" / "bpe").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--source", "/no/such/folder"], "does not exist"),
        (["--source", "{src}", "--glob", "*.rs"], "empty after filtering"),
        (["--source", "{src}", "--val-share", "1.5"], "--val-share"),
        (["--source", "{src}", "--bpe-vocab", "100"], "--bpe-vocab"),
        (["--source", "{src}", "--data-dir", "/no/data"], "data directory"),
        (["--source", "{src}", "--apps", "/no/apps.jsonl"], "APPS file"),
        (["--out", "{out}"], "--source"),
        (["--source", "{src}", "--shard-tokens", "1"], "--shard-tokens must be >= 65536"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, code_folder, args, message):
    out = tmp_path / "out"
    args = [a.format(src=code_folder, out=out) for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    r = run_prepare(*args, "--workers", 1)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bytelm prepare: error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def one_line_error(r, message: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bytelm prepare: error:") and message in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["corpus", "bytes/train", "manifest.json"])
def test_prepare_never_replaces_what_it_did_not_make(tmp_path, code_folder, where):
    out = tmp_path / "u"
    mine = out / where
    if where.endswith(".json"):
        mine.parent.mkdir(parents=True)
        mine.write_text('{"my": "own file"}')
    else:
        mine.mkdir(parents=True)
        (mine / "notes.txt").write_text("a user's file")
    before = tree_hashes(out)
    r = run_prepare("--source", code_folder, "--out", out, "--tokenizer", "bytes", "--val-share", 0.3, "--workers", 1)
    one_line_error(r, "was not made by `bytelm prepare`")
    assert tree_hashes(out) == before and sorted(p.name for p in out.iterdir()) == [where.split("/")[0]]


def test_prepare_refuses_an_output_that_overlaps_a_source(tmp_path, code_folder):
    before = tree_hashes(code_folder)
    for out in (code_folder, code_folder / "pkg0" / "prepared"):
        one_line_error(run_prepare("--source", code_folder, "--out", out, "--workers", 1), "overlaps the source")
    # The source inside the output folder: replacing the output could remove the source.
    one_line_error(run_prepare("--source", code_folder, "--out", tmp_path, "--workers", 1), "overlaps the source")
    assert tree_hashes(code_folder) == before


def test_prepare_refuses_a_folder_holding_another_corpus(tmp_path, code_folder):
    out = tmp_path / "u"
    common = ["--out", out, "--tokenizer", "bytes", "--val-share", 0.3, "--workers", 1]
    assert run_prepare("--source", code_folder, *common).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"m{i}.py").write_text(f"def other_{i}():\n    return {i}\n")
    first = tree_hashes(out)
    one_line_error(run_prepare("--source", other, *common), "holds a corpus made from other inputs")
    assert tree_hashes(out) == first
    r = run_prepare("--source", other, *common, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["options"]["sources"] == [str(other)]


def test_stale_temporary_folders_of_a_killed_run_are_removed(tmp_path, code_folder):
    from bytelm.fileio import atomic_path

    out = tmp_path / "u"
    common = ["--source", code_folder, "--out", out, "--tokenizer", "bytes", "--val-share", 0.3, "--workers", 1]
    assert run_prepare(*common).returncode == 0
    # A run killed inside a stage: the process dies in atomic_path's block, as on kill -9.
    for target, marker in ((out / "corpus", "train/meta.json"), (out / "bytes" / "train", "meta.json")):
        pid = os.fork()
        if pid == 0:
            try:
                with atomic_path(target, marker=marker) as tmp:
                    tmp.mkdir()
                    (tmp / "half_written.bin").write_bytes(b"x")
                    os._exit(9)
            finally:
                os._exit(1)  # the child never returns into pytest
        os.waitpid(pid, 0)
    left = sorted(p.name for p in [*out.glob(".corpus.*"), *(out / "bytes").glob(".train.*")])
    assert len(left) == 2
    (out / ".corpus.mine").mkdir()  # not atomic_path's naming: a user's folder, kept
    (code_folder / "pkg1" / "mod1.py").write_text("def changed():\n    return 'a new body'\n")
    r = run_prepare(*common)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".corpus.mine", "bytes", "corpus", "manifest.json"]
    assert sorted(p.name for p in (out / "bytes").iterdir()) == ["train", "val"]
