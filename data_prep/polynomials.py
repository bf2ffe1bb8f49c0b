"""Polynomial arithmetic over F_7[X]/(X^5): the paper's algorithmic-reasoning task (§4.2).

An element of the ring is stored as its canonical representative, the 5 coefficients
(c0, c1, c2, c3, c4) of a polynomial of degree <= 4 with coefficients in 0..6.

Operations (each one counts as one of the m operations of an expression):
- negation  `(-A)`      coefficient-wise  -c mod 7
- addition  `(A+B)`     coefficient-wise  (a + b) mod 7
- product   `(A*B)`     polynomial product, truncated mod X^5, coefficients mod 7
- composition `(A@B)`   A(B(X)): the degree <= 4 representatives are composed,
                        A(B) = sum_i a_i B^i, then reduced mod X^5 and mod 7.

Composition is the one operation the quotient ring does not define for free: A(B) only
depends on the residue class of A mod X^5 when B^5 = 0 mod X^5, i.e. when B has a zero
constant term (B(0) = 0). For B(0) != 0, a different representative of A (A + X^5)
would give a different result. We keep composition for every B (operands are uniform,
as in the paper) and make it well defined as a function on the canonical
representatives: every subexpression is reduced to its degree <= 4 representative
before it is composed. docs/synthetic.md says why.

Serialisation (every operation fully bracketed, every leaf in brackets, no spaces):

    ((3x^2+1)*(-(x+4)))=3 6 2 4 0;

A leaf is written as a polynomial in x with descending powers, coefficient 1 omitted
on x-terms, zero terms omitted, `0` for the zero polynomial. After `=` comes the answer:
the 5 coefficients c0..c4 separated by single spaces, then the end marker `;`.

Expressions are random trees with exactly m operators: the operator is uniform over the
four, the m - 1 remaining operators of a binary node are split uniformly between its
two children, and leaf coefficients are uniform in 0..6. Everything is drawn from
`random.Random` seeded with a string, so a seed gives the same data on every machine.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from bytelm.errors import UserError
from bytelm.fileio import atomic_path, write_json, write_jsonl
from bytelm.shards import CORPUS_FORMAT, SYNTH_FORMAT, ShardWriter, sha256_file
from bytelm.tokenizers import BPETokenizer, ByteTokenizer

P = 7  # the field F_7
N_COEF = 5  # the ring F_7[X]/(X^5): 5 coefficients
OPERATORS = ("neg", "add", "mul", "compose")
SYMBOLS = {"add": "+", "mul": "*", "compose": "@"}
ANSWER_SEP = "="
END = ";"  # end of the answer; generation stops here

Poly = tuple[int, ...]


# ----------------------------------------------------------------------------- ring


def neg(a: Poly) -> Poly:
    return tuple((-x) % P for x in a)


def add(a: Poly, b: Poly) -> Poly:
    return tuple((x + y) % P for x, y in zip(a, b))


def mul(a: Poly, b: Poly) -> Poly:
    out = [0] * N_COEF
    for i, x in enumerate(a):
        if x:
            for j in range(N_COEF - i):  # terms of degree >= 5 vanish mod X^5
                out[i + j] += x * b[j]
    return tuple(c % P for c in out)


def compose(a: Poly, b: Poly) -> Poly:
    """a(b(X)) mod (X^5, 7), by Horner's rule on the representatives."""
    out: Poly = (0,) * N_COEF
    for coef in reversed(a):
        out = add(mul(out, b), (coef,) + (0,) * (N_COEF - 1))
    return out


APPLY = {"add": add, "mul": mul, "compose": compose}


# ----------------------------------------------------------------------------- text


def format_poly(a: Poly) -> str:
    terms = []
    for power in range(N_COEF - 1, -1, -1):
        c = a[power]
        if c == 0:
            continue
        if power == 0:
            terms.append(str(c))
        else:
            x = "x" if power == 1 else f"x^{power}"
            terms.append(x if c == 1 else f"{c}{x}")
    return "+".join(terms) or "0"


def format_answer(a: Poly) -> str:
    return " ".join(str(c) for c in a)


def parse_answer(completion: str) -> Poly | None:
    """The 5 coefficients at the start of a completion (up to `;`), or None if malformed."""
    parts = completion.split(END, 1)[0].split(" ")
    if len(parts) != N_COEF or not all(len(p) == 1 and p in "0123456" for p in parts):
        return None
    return tuple(int(p) for p in parts)


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Example:
    expression: str  # the question, without '='
    value: Poly
    m: int  # number of operations

    @property
    def prompt(self) -> str:
        return self.expression + ANSWER_SEP

    @property
    def answer(self) -> str:
        return format_answer(self.value)

    @property
    def text(self) -> str:
        """The training document."""
        return f"{self.prompt}{self.answer}{END}"

    def to_json(self) -> dict:
        return {"expression": self.expression, "prompt": self.prompt, "answer": self.answer,
                "coefficients": list(self.value), "m": self.m}


def random_poly(rng: random.Random) -> Poly:
    return tuple(rng.randrange(P) for _ in range(N_COEF))


def random_expression(rng: random.Random, m: int) -> tuple[str, Poly]:
    """A uniform-operator random tree with exactly m operations: (text, value)."""
    if m == 0:
        leaf = random_poly(rng)
        return f"({format_poly(leaf)})", leaf
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    if op == "neg":
        text, value = random_expression(rng, m - 1)
        return f"(-{text})", neg(value)
    k = rng.randrange(m)  # operations in the left subtree; m - 1 - k in the right
    lt, lv = random_expression(rng, k)
    rt, rv = random_expression(rng, m - 1 - k)
    return f"({lt}{SYMBOLS[op]}{rt})", APPLY[op](lv, rv)


def sample(rng: random.Random, m: int) -> Example:
    text, value = random_expression(rng, m)
    return Example(text, value, m)


def test_set(seed: int, m: int, n: int) -> list[Example]:
    """n distinct expressions with m operations, from their own seeded stream."""
    rng = random.Random(f"poly-test-{seed}-m{m}")
    out: dict[str, Example] = {}
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"cannot draw {n} distinct expressions with m={m}")
        ex = sample(rng, m)
        out.setdefault(ex.expression, ex)
    return list(out.values())


def training_stream(
    seed: int, n: int, m_max: int, exclude: set[str], stream: str = "train", skipped: Counter | None = None
) -> Iterator[Example]:
    """n examples with m ~ U{1..m_max}, skipping every expression in `exclude` (the test
    sets; `skipped[m]` counts them). Duplicates inside the stream are kept: they are rare
    except at m = 1, and the paper samples i.i.d. `stream` names an independent random
    stream (train, val)."""
    rng = random.Random(f"poly-{stream}-{seed}")
    made = 0
    while made < n:
        ex = sample(rng, rng.randint(1, m_max))
        if ex.expression in exclude:
            if skipped is not None:
                skipped[ex.m] += 1
            continue
        made += 1
        yield ex


# ----------------------------------------------------------------------------- data set


@dataclass
class PolyOptions:
    n_train: int = 1_000_000
    n_val: int = 2000
    test_per_m: int = 2000
    m_train_max: int = 5
    m_test_max: int = 10
    seed: int = 0
    bpe_vocab: int = 0  # 0: the byte arm only

    def check(self) -> None:
        for name in ("n_train", "n_val", "test_per_m", "m_train_max", "m_test_max"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def test_file(m: int) -> str:
    return f"tests/poly_m{m}.jsonl"


def build_poly(out: Path, opts: PolyOptions) -> dict:
    """Write the polynomial data set under `out` (docs/architecture.md layout plus
    DIR/tests/poly_m{m}.jsonl); return its manifest."""
    from data_prep.bpe import BPEOptions, train_bpe
    from data_prep.sharding import encode_split

    opts.check()
    tests = {m: test_set(opts.seed, m, opts.test_per_m) for m in range(1, opts.m_test_max + 1)}
    exclude = {ex.expression for exs in tests.values() for ex in exs}
    for m, exs in tests.items():
        write_jsonl(out / test_file(m), ({"id": i, **ex.to_json()} for i, ex in enumerate(exs)))

    counts = {sp: {"docs": 0, "bytes": 0, "skipped_test_expressions": Counter()} for sp in ("train", "val")}
    meta = {"source": "bytelm synth poly"}
    with atomic_path(out / "corpus", marker="train/meta.json") as tmp:
        tmp.mkdir()
        for split, n in (("train", opts.n_train), ("val", opts.n_val)):
            stream = training_stream(opts.seed, n, opts.m_train_max, exclude, split, counts[split]["skipped_test_expressions"])
            with ShardWriter(tmp / split, "uint8", None, meta, format=CORPUS_FORMAT) as w:
                for ex in tqdm(stream, total=n, desc=f"poly/{split}", unit="expr", unit_scale=True, disable=None):
                    data = ex.text.encode()
                    w.add(data, len(data))
                    counts[split]["docs"] += 1
                    counts[split]["bytes"] += len(data)

    manifest = {
        "format": SYNTH_FORMAT,
        "task": "poly",
        "options": asdict(opts),  # options.m_train_max: the in-domain range of m, for the evaluation
        "ring": f"F_{P}[X]/(X^{N_COEF})",
        "answer_end": END,  # the evaluation stops generating there and compares what comes before
        "counts": counts,
        "test_files": {str(m): test_file(m) for m in tests},
        "corpus": {sp: {"meta_sha256": sha256_file(out / "corpus" / sp / "meta.json")} for sp in ("train", "val")},
    }
    tok = None
    if opts.bpe_vocab:
        manifest["bpe"] = train_bpe(out / "corpus" / "train", out / "bpe", BPEOptions(vocab_size=opts.bpe_vocab))
        tok = BPETokenizer(out / "bpe" / "tokenizer.json")
    write_json(out / "manifest.json", manifest)
    msha = sha256_file(out / "manifest.json")
    for sp in ("train", "val"):
        encode_split(out / "corpus" / sp, out / "bytes" / sp, ByteTokenizer(), msha)
        if tok is not None:
            encode_split(out / "corpus" / sp, out / "bpe" / sp, tok, msha)
    return manifest


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bytelm synth poly --out DIR [--n-train N] [--test-per-m 2000] [--seed S]`: a
    prepared-data folder (`bytelm train` reads it with data.root=DIR) and DIR/tests/."""
    p.add_argument("--out", required=True, type=Path, help="output folder (a prepared-data folder)")
    p.add_argument("--n-train", type=int, default=1_000_000, help="training expressions (default 1,000,000)")
    p.add_argument("--n-val", type=int, default=2000, help="validation expressions")
    p.add_argument("--test-per-m", type=int, default=2000, help="test expressions per number of operations (default 2000)")
    p.add_argument("--m-train-max", type=int, default=5, help="training draws m in 1..this (default 5)")
    p.add_argument("--m-test-max", type=int, default=10, help="test sets for m in 1..this (default 10)")
    p.add_argument("--bpe-vocab", type=int, default=0, help="also train a BPE of this size (default 0: bytes only)")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from data_prep.sharding import check_synth_out

    check_synth_out(args.out, "poly")
    opts = PolyOptions(n_train=args.n_train, n_val=args.n_val, test_per_m=args.test_per_m, m_train_max=args.m_train_max,
                       m_test_max=args.m_test_max, seed=args.seed, bpe_vocab=args.bpe_vocab)
    t0 = time.time()
    m = build_poly(args.out, opts)
    c = m["counts"]
    print(f"poly: {c['train']['docs']} train ({c['train']['bytes']} bytes), {c['val']['docs']} val, "
          f"{opts.test_per_m} test x m=1..{opts.m_test_max}, {time.time() - t0:.1f} s -> {args.out}")
    return 0
