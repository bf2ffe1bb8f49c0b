"""Polynomial arithmetic over F_7[X]/(X^5): the generator against an independent
evaluation (numpy.polynomial on a re-parse of the serialised text), the test/train
separation, and the data set on disk."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import numpy.polynomial.polynomial as npoly
import pytest

from bytelm.fileio import read_jsonl
from bytelm.shards import ShardDataset, iter_documents
from data_prep import polynomials as poly

P, N = 7, 5


# ----------------------------------------------------------------------------- an independent evaluator


def reduce(c) -> tuple[int, ...]:
    """numpy coefficients -> the canonical representative (truncate mod X^5, mod 7)."""
    c = np.rint(np.asarray(c, dtype=float)).astype(np.int64)
    out = np.zeros(N, dtype=np.int64)
    out[: min(N, len(c))] = c[:N]
    return tuple(int(x) for x in out % P)


def np_compose(f, g) -> tuple[int, ...]:
    total = np.zeros(1)
    for i, a in enumerate(f):
        total = npoly.polyadd(total, a * npoly.polypow(g, i))
    return reduce(total)


def parse_leaf(text: str) -> tuple[int, ...]:
    coef = [0] * N
    if text == "0":
        return tuple(coef)
    for term in text.split("+"):
        if "x" not in term:
            coef[0] += int(term)
            continue
        c, _, power = term.partition("x")
        coef[int(power[1:]) if power else 1] += int(c) if c else 1
    return tuple(coef)


def evaluate(text: str) -> tuple[tuple[int, ...], int]:
    """Recursive descent over the fully bracketed grammar, evaluated with numpy:
    E := '(' leaf ')' | '(' '-' E ')' | '(' E op E ')'. Returns (value, #operations)."""
    pos = 0

    def expr():
        nonlocal pos
        assert text[pos] == "(", text[pos:]
        pos += 1
        if text[pos] == "-":
            pos += 1
            v, k = expr()
            out, ops = reduce(npoly.polysub([0], v)), k + 1
        elif text[pos] == "(":
            a, ka = expr()
            op = text[pos]
            pos += 1
            b, kb = expr()
            if op == "+":
                out = reduce(npoly.polyadd(a, b))
            elif op == "*":
                out = reduce(npoly.polymul(a, b))
            else:
                assert op == "@", op
                out = np_compose(a, b)
            ops = ka + kb + 1
        else:
            end = text.index(")", pos)
            out, ops = parse_leaf(text[pos:end]), 0
            pos = end
        assert text[pos] == ")"
        pos += 1
        return out, ops

    value, ops = expr()
    assert pos == len(text)
    return value, ops


# ----------------------------------------------------------------------------- the ring


def test_ring_operations_match_numpy_on_random_cases():
    rng = random.Random(1)
    for _ in range(500):
        a, b = poly.random_poly(rng), poly.random_poly(rng)
        assert poly.neg(a) == reduce(npoly.polysub([0], a))
        assert poly.add(a, b) == reduce(npoly.polyadd(a, b))
        assert poly.mul(a, b) == reduce(npoly.polymul(a, b))
        assert poly.compose(a, b) == np_compose(a, b)


def test_hand_made_products_and_compositions():
    # (3x^2 + 1)(-(x + 4)) = -3x^3 - 12x^2 - x - 4 = 4x^3 + 2x^2 + 6x + 3 (mod 7)
    assert poly.mul((1, 0, 3, 0, 0), poly.neg((4, 1, 0, 0, 0))) == (3, 6, 2, 4, 0)
    # x^3 * x^2 = x^5 = 0 in the ring
    assert poly.mul((0, 0, 0, 1, 0), (0, 0, 1, 0, 0)) == (0, 0, 0, 0, 0)
    # (x^2 + 1) o (x + 1) = x^2 + 2x + 2
    assert poly.compose((1, 0, 1, 0, 0), (1, 1, 0, 0, 0)) == (2, 2, 1, 0, 0)
    # a constant inner polynomial evaluates the outer one: (x^4 + 6) at 2 = 22 = 1 mod 7
    assert poly.compose((6, 0, 0, 0, 1), (2, 0, 0, 0, 0)) == (1, 0, 0, 0, 0)


def test_composition_depends_on_the_representative_only_when_the_inner_constant_is_nonzero():
    """The claim of docs/synthetic.md: f o g is well defined on residues mod X^5 iff g(0) = 0."""
    rng = random.Random(2)
    for _ in range(200):
        f_long = [rng.randrange(P) for _ in range(9)]  # a degree-8 representative
        g = list(poly.random_poly(rng))
        g0 = [0] + g[1:]
        assert np_compose(f_long, g0) == poly.compose(reduce(f_long), tuple(g0))
    # X^5 is 0 in the ring, yet X^5 o 1 = 1: composing representatives is a choice.
    assert np_compose([0, 0, 0, 0, 0, 1], [1]) == (1, 0, 0, 0, 0)
    assert poly.compose(reduce([0, 0, 0, 0, 0, 1]), (1, 0, 0, 0, 0)) == (0, 0, 0, 0, 0)


def test_serialisation():
    assert poly.format_poly((0, 0, 0, 0, 0)) == "0"
    assert poly.format_poly((1, 1, 0, 0, 0)) == "x+1"
    assert poly.format_poly((0, 0, 3, 0, 1)) == "x^4+3x^2"
    assert poly.format_poly((6, 2, 0, 5, 0)) == "5x^3+2x+6"
    ex = poly.Example("((3x^2+1)*(-(x+4)))", (3, 6, 2, 4, 0), 2)
    assert ex.text == "((3x^2+1)*(-(x+4)))=3 6 2 4 0;"
    assert ex.prompt == "((3x^2+1)*(-(x+4)))="
    assert poly.parse_answer("3 6 2 4 0;junk") == (3, 6, 2, 4, 0)
    assert poly.parse_answer("3 6 2 4;") is None
    assert poly.parse_answer("3 6 2 4 7;") is None


@pytest.mark.parametrize("m", range(1, 11))
def test_random_expressions_match_the_independent_evaluator(m):
    rng = random.Random(m)
    for _ in range(60):
        ex = poly.sample(rng, m)
        value, ops = evaluate(ex.expression)
        assert ops == m
        assert value == ex.value
        assert ex.text.endswith("=" + " ".join(map(str, value)) + ";")


def test_operators_are_drawn_uniformly():
    rng = random.Random(3)
    counts = {"-(": 0, "+(": 0, "*(": 0, "@(": 0}
    for _ in range(3000):
        text = poly.sample(rng, 1).expression
        # the one operator of an m=1 expression, seen between the leaf brackets
        for key in counts:
            counts[key] += text.startswith("(-") if key == "-(" else (")" + key in text)
    assert sum(counts.values()) == 3000
    assert all(650 <= c <= 850 for c in counts.values()), counts


def test_test_sets_are_deterministic_distinct_and_seed_dependent():
    a = poly.test_set(0, 3, 300)
    assert [e.expression for e in a] == [e.expression for e in poly.test_set(0, 3, 300)]
    assert len({e.expression for e in a}) == 300
    assert {e.expression for e in a}.isdisjoint(e.expression for e in poly.test_set(1, 3, 300))


# ----------------------------------------------------------------------------- the data set


@pytest.fixture(scope="module")
def poly_data(tmp_path_factory):
    """m = 1 only in training, so a real share of training draws hits a test expression."""
    out = tmp_path_factory.mktemp("poly")
    opts = poly.PolyOptions(n_train=20000, n_val=500, test_per_m=2000, m_train_max=1, m_test_max=3)
    return out, poly.build_poly(out, opts)


def test_training_never_contains_a_test_expression(poly_data):
    out, manifest = poly_data
    test = set()
    for m in (1, 2, 3):
        rows = read_jsonl(out / poly.test_file(m))
        assert len(rows) == 2000 and all(r["m"] == m for r in rows)
        test |= {r["expression"] for r in rows}
    for split in ("train", "val"):
        exprs = [d.decode().split("=")[0] for d in iter_documents(out / "corpus" / split)]
        assert len(exprs) == manifest["counts"][split]["docs"]
        assert test.isdisjoint(exprs)
    # the exclusion did real work: ~1/4 of m=1 draws are negations, and the test set
    # holds ~500 of the 16,807 possible ones
    assert manifest["counts"]["train"]["skipped_test_expressions"][1] > 50


def test_data_set_layout_and_documents(poly_data):
    out, manifest = poly_data
    ds = ShardDataset(out / "bytes" / "train")
    assert ds.tokenizer.kind == "bytes" and ds.n_docs == 20000
    docs = list(iter_documents(out / "corpus" / "train"))
    first = docs[0].decode()
    value, ops = evaluate(first.split("=")[0])
    assert ops == 1 and first.endswith("=" + poly.format_answer(value) + ";")
    # the byte shard holds the same text, then EOS
    assert ds._stream.read(0, len(docs[0]) + 1).tolist() == list(docs[0]) + [ds.tokenizer.eos_id]
    assert not (out / "bpe").exists()  # bytes only unless --bpe-vocab


def test_cli_is_deterministic_and_writes_a_bpe_arm(tmp_path):
    def run(out):
        subprocess.run([sys.executable, "-m", "bytelm", "synth", "poly", "--out", str(out), "--n-train", "3000",
                        "--n-val", "100", "--test-per-m", "50", "--m-test-max", "7", "--bpe-vocab", "300", "--seed", "5"],
                       check=True, capture_output=True)

    run(tmp_path / "a")
    run(tmp_path / "b")
    for rel in ("bytes/train/tokens_00000.bin", "bpe/train/tokens_00000.bin", "bpe/tokenizer.json", "tests/poly_m7.jsonl"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert ShardDataset(tmp_path / "a" / "bpe" / "val").n_docs == 100
    assert len((tmp_path / "a" / "tests" / "poly_m7.jsonl").read_text().splitlines()) == 50


def test_cli_refuses_a_foreign_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "bytelm", "synth", "poly", "--out", str(tmp_path), "--n-train", "10"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "not a `bytelm synth poly` folder" in r.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
