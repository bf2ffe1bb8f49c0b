"""Decontamination: drop any training document that shares a long n-gram with a benchmark.

The rule (GPT-3's 13-gram overlap filter, in whitespace tokens): split the document and
every benchmark text on whitespace; a document is contaminated when any run of `n`
consecutive tokens (default 13) equals a run of `n` consecutive tokens of a benchmark
prompt, test or reference solution. Whitespace tokens make the match blind to
indentation and line endings (MBPP's code uses CRLF and tabs). A benchmark text shorter
than `n` tokens contributes nothing; so texts of one task are also matched joined (the
HumanEval prompt followed by its solution, MBPP's tests as one block and after the code),
which is how they would appear in a leaked file.

An n-gram made only of numbers and punctuation (`[0, 1, 2, 3, ...`, a list of primes, a
row of zeros) is common to unrelated code and is ignored: a matching n-gram must hold at
least one token with a letter.

Speed: every distinct benchmark token gets an id; a document token outside that vocabulary
cannot be part of a match, so only windows of `n` in-vocabulary tokens are hashed, with a
vectorised polynomial hash (uint64, wrapping), and looked up in the sorted benchmark hashes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bytelm.errors import UserError
from bytelm.fileio import read_jsonl
from bytelm.paths import data_file

DEFAULT_NGRAM = 13
RULE_VERSION = 2  # bump when the matching rule changes, so that `prepare` redoes the corpus
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the rolling hash


@dataclass
class Benchmark:
    name: str
    path: Path
    texts: list[str]

    def describe(self) -> dict:
        return {"file": str(self.path), "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(), "texts": len(self.texts)}


def humaneval(data_dir: str | None = None) -> Benchmark:
    path = data_file("humaneval/HumanEval.jsonl.gz", data_dir)
    texts = []
    for r in read_jsonl(path):
        texts += [r["prompt"] + r["canonical_solution"], r["test"]]
    return Benchmark("humaneval", path, texts)


def mbpp(data_dir: str | None = None) -> Benchmark:
    """All 974 problems of mbpp.jsonl (train, validation, test and prompt splits alike)."""
    path = data_file("mbpp/mbpp.jsonl", data_dir)
    texts = []
    for r in read_jsonl(path):
        tests = r.get("test_setup_code", "") + "\n" + "\n".join(r["test_list"] + r.get("challenge_test_list", []))
        texts += [r["text"], r["code"], tests, r["code"] + "\n" + tests]
    return Benchmark("mbpp", path, texts)


def _strings(value) -> list[str]:
    """Every string inside a JSON value (APPS stores solutions and tests as JSON strings)."""
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return [value]
        return _strings(inner) if isinstance(inner, (list, dict)) else [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def apps(path: str | Path) -> Benchmark:
    """An APPS file: the full `test.jsonl` (question, solutions, input_output,
    starter_code) or a subset with MapCoder's keys (description, test_list, sample_io)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"APPS file {path} not found (--apps)")
    keys = ("question", "description", "solutions", "starter_code", "input_output", "test_list", "sample_io")
    texts = []
    for r in read_jsonl(path):
        for k in keys:
            parts = _strings(r.get(k))
            texts += parts
            if k in ("input_output", "test_list", "sample_io") and len(parts) > 1:
                texts.append("\n".join(parts))
    return Benchmark("apps", path, texts)


def load_benchmarks(data_dir: str | None = None, apps_path: str | None = None) -> list[Benchmark]:
    out = [humaneval(data_dir), mbpp(data_dir)]
    if apps_path:
        out.append(apps(apps_path))
    return out


def _window_hashes(ids: np.ndarray, wordy: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the windows of n ids that have no out-of-vocabulary id (-1) and at least
    one token with a letter (`wordy`)."""
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    oov = np.concatenate([[0], np.cumsum(ids < 0)])
    words = np.concatenate([[0], np.cumsum(wordy)])
    ok = ((oov[n:] - oov[:-n]) == 0) & ((words[n:] - words[:-n]) > 0)
    if not ok.any():
        return np.zeros(0, dtype=np.uint64)
    v = (ids + 1).astype(np.uint64)
    m = len(ids) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + v[j : j + m]
    return h[ok]


def _has_letter(token: str) -> bool:
    return any(c.isalpha() for c in token)


@dataclass
class NgramIndex:
    """The n-grams of all benchmarks: token vocabulary, sorted hashes, owning benchmark."""

    n: int
    names: list[str]
    vocab: dict[str, int] = field(default_factory=dict)
    wordy: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per vocab id: has a letter
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ngrams_per_benchmark: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, benchmarks: list[Benchmark], n: int = DEFAULT_NGRAM) -> NgramIndex:
        if n < 1:
            raise UserError(f"--ngram must be >= 1, got {n}")
        index = cls(n=n, names=[b.name for b in benchmarks])
        hashes, owners = [], []
        for bi, bench in enumerate(benchmarks):
            per = []
            for text in bench.texts:
                tokens = text.split()
                ids = np.array([index.vocab.setdefault(t, len(index.vocab)) for t in tokens], dtype=np.int64)
                per.append(_window_hashes(ids, np.array([_has_letter(t) for t in tokens], dtype=bool), n))
            h = np.unique(np.concatenate(per)) if per else np.zeros(0, dtype=np.uint64)
            index.ngrams_per_benchmark.append(len(h))
            hashes.append(h)
            owners.append(np.full(len(h), bi, dtype=np.int64))
        h, o = np.concatenate(hashes), np.concatenate(owners)
        # Sorted by hash, the first benchmark first among equal hashes: a document that
        # matches several benchmarks is charged to the first one listed.
        order = np.lexsort((o, h))
        h, o = h[order], o[order]
        first = np.concatenate([[True], h[1:] != h[:-1]]) if len(h) else np.zeros(0, dtype=bool)
        index.hashes, index.owner = h[first], o[first]
        index.wordy = np.array([_has_letter(t) for t in index.vocab], dtype=bool)
        return index

    def match(self, text: str) -> int:
        """Index of the benchmark the text shares an n-gram with (the first listed), or -1."""
        get = self.vocab.get
        ids = np.array([get(t, -1) for t in text.split()], dtype=np.int64)
        h = _window_hashes(ids, self.wordy[ids] & (ids >= 0), self.n)
        if not len(h) or not len(self.hashes):
            return -1
        pos = np.searchsorted(self.hashes, h)
        pos[pos == len(self.hashes)] = 0
        hit = self.hashes[pos] == h
        return int(self.owner[pos[hit]].min()) if hit.any() else -1
