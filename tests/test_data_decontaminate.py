"""Decontamination against the real HumanEval, MBPP and APPS files in the data directory."""

from __future__ import annotations

import json

import pytest

from bytelm.fileio import read_jsonl
from bytelm.paths import data_file
from bytelm.shards import iter_documents
from data_prep.corpus import CorpusOptions, build_corpus
from data_prep.decontaminate import Benchmark, NgramIndex, apps, humaneval, load_benchmarks, mbpp

CLEAN = '''import math


def circle_area(radius: float) -> float:
    """The area of a circle of the given radius, which must not be negative."""
    if radius < 0:
        raise ValueError("radius must be >= 0")
    return math.pi * radius * radius
'''


@pytest.fixture(scope="module")
def index():
    return NgramIndex.build(load_benchmarks())


def humaneval_task(i: int) -> dict:
    return read_jsonl(data_file("humaneval/HumanEval.jsonl.gz"))[i]


def test_humaneval_solution_is_found_clean_code_is_not(index):
    task = humaneval_task(12)
    assert index.match(CLEAN) == -1
    leaked = CLEAN + "\n\n" + task["prompt"] + task["canonical_solution"]
    assert index.names[index.match(leaked)] == "humaneval"
    # Whitespace tokens: re-indenting with tabs and CRLF line ends does not hide it.
    disguised = (task["prompt"] + task["canonical_solution"]).replace("    ", "\t").replace("\n", "\r\n")
    assert index.match(disguised) == index.names.index("humaneval")
    # The test alone (assertions on the candidate) counts too.
    assert index.match(task["test"]) == index.names.index("humaneval")


def test_every_mbpp_problem_is_indexed(index):
    tasks = read_jsonl(data_file("mbpp/mbpp.jsonl"))
    assert len(tasks) == 974
    # A problem's code followed by its tests, as in a leaked solution file, is found, and
    # so is a code or test block on its own, whenever it has at least 13 whitespace tokens
    # (the few shorter ones cannot hold a 13-gram: docs/data.md counts them).
    for t in tasks:
        tests = "\n".join(t["test_list"])
        for block in (t["code"] + "\n\n" + tests, t["code"], tests):
            if len(block.split()) >= 13:
                assert index.match("# solution\n" + block + "\n") >= 0, t["task_id"]


def test_ngram_length_is_configurable(tmp_path):
    text = " ".join(f"w{i}" for i in range(20))
    bench = [Benchmark("toy", tmp_path, [text])]
    shares_10 = "unrelated words " + " ".join(f"w{i}" for i in range(5, 15)) + " more words"
    assert NgramIndex.build(bench, n=13).match(shares_10) == -1
    assert NgramIndex.build(bench, n=10).match(shares_10) == 0
    assert NgramIndex.build(bench, n=11).match(shares_10) == -1
    # Out-of-vocabulary tokens break a run: the 10 shared tokens must be consecutive.
    assert NgramIndex.build(bench, n=10).match(shares_10.replace("w9", "zz")) == -1


def test_numbers_and_punctuation_alone_do_not_match(tmp_path):
    # MBPP's tests hold long lists of numbers; so does much unrelated code.
    bench = NgramIndex.build([Benchmark("toy", tmp_path, ["assert f([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]) == 3"])])
    assert bench.match("primes = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]") == -1
    assert bench.match("assert f([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]") == 0


def test_apps_file_is_used_when_given():
    path = data_file("apps/mapcoder_apps_selected150.jsonl")
    bench = apps(path)
    with open(path) as f:
        first = json.loads(f.readline())
    index = NgramIndex.build([humaneval(), mbpp(), bench])
    assert index.names[index.match("# problem\n" + first["description"])] == "apps"


def test_corpus_drops_contaminated_documents_and_reports_them(tmp_path):
    task = humaneval_task(3)
    src = tmp_path / "src"
    src.mkdir()
    clean = [CLEAN.replace("circle", f"circle_{i}") for i in range(8)]
    for i, text in enumerate(clean):
        (src / f"clean_{i}.py").write_text(text)
    (src / "leak.py").write_text("# copied\n" + task["prompt"] + task["canonical_solution"])
    out = tmp_path / "out"
    manifest = build_corpus(out, CorpusOptions(sources=[str(src)], val_share=0.5), workers=1)
    dropped = manifest["dropped"]["contaminated/humaneval"]
    assert dropped == {"docs": 1, "bytes": (src / "leak.py").stat().st_size}
    assert manifest["decontamination"]["benchmarks"]["humaneval"]["dropped_examples"] == ["leak.py"]
    assert manifest["dropped"]["contaminated/mbpp"]["docs"] == 0
    kept = [d for split in ("train", "val") for d in iter_documents(out / "corpus" / split)]
    assert sorted(kept) == sorted(t.encode() for t in clean)
