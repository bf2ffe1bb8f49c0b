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
        body = "".join(f"    total += values[{j}] * {i + j}\n" for j in range(i % 7 + 1))
        (src / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def compute_{i}(values):\n    total = 0\n{body}    return total\n")
    (src / "pkg0" / "latin1.py").write_bytes(b"# caf\xe9\nname = 'caf\xe9'\n")
    return src


def test_prepare_end_to_end_is_deterministic_and_skips_done_work(tmp_path, code_folder):
    args = ["--source", code_folder, "--bpe-vocab", 300, "--val-share", 0.3, "--shard-tokens", 1000]
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
