"""Induction stories: the paper's §4.1 test of copying a name seen earlier in a story.

Pipeline (`bytelm synth induction`; docs/synthetic.md gives the reasons):

1. Stories: a TinyStories text file, stories separated by `<|endoftext|>`. The piece
   after the last separator is dropped (in the 2 MiB sample it is a truncated story);
   exact duplicates are dropped.
2. Character names (`find_names`): capitalised words that recur in the middle of a
   sentence and almost never appear in lower case, minus a short list of titles, days,
   months and languages.
3. Split: the test stories are the `n_test` stories with the smallest
   sha256(seed, story) among those where some name occurs at least twice (only they have
   repeated occurrences to score); validation takes `val_share` of the rest (decided by
   other bytes of the same hash, so it does not depend on the test choice); training
   takes everything else.
4. A byte-level BPE (data_prep.bpe, the same trainer as the code corpus) is trained on
   the original training stories.
5. Names are replaced (`randomize_names`). Every name of a story maps to a random name
   that is exactly two tokens under that BPE, both after a space (" Name") and without one
   ("Name", e.g. after a quote or a line break), so every occurrence is two tokens. Names
   come from two disjoint pools: test names never occur in the training data. Training
   and validation stories get random names too (`train_copies` copies, each with fresh
   names), so the model can only predict a name's second token by copying it from its
   earlier occurrence — the small sample would otherwise let it memorise the few dozen
   names it holds (a deviation from the paper, which trained on the stories as they are).
6. Output, in the prepared-data layout of docs/architecture.md: DIR/corpus/{train,val}
   (the name-randomised stories), DIR/bpe/tokenizer.json, DIR/{bytes,bpe}/{train,val}
   token shards, DIR/manifest.json, DIR/source/train (the original training stories the
   BPE saw), and DIR/tests/induction_test.jsonl: one story per line with the UTF-8 byte
   spans of every occurrence of every (new) name, which is what the metric needs.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from bytelm.errors import UserError
from bytelm.fileio import atomic_path, write_json, write_jsonl
from bytelm.paths import STORIES, STORY_SEPARATOR, data_file
from bytelm.shards import CORPUS_FORMAT, SYNTH_FORMAT, ShardWriter, sha256_file
from bytelm.tokenizers import BPETokenizer, ByteTokenizer

WORD = re.compile(r"[A-Za-z]+")
# A word right after one of these (spaces skipped) starts a sentence or a quotation, where
# any word is capitalised: such occurrences do not count as evidence of a name.
SENTENCE_OPENERS = set('\n.!?:;"“”‘\'(—–-')
# Capitalised mid-sentence, never lower case, yet not characters of the story.
NOT_NAMES = frozenset(
    "Mr Mrs Ms Miss Dr Sir Madam Lord Lady Captain Doctor Officer King Queen Prince Princess "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday "
    "January February March April May June July August September October November December "
    "Christmas Easter Halloween English Spanish French German Chinese American "
    "North South East West God".split()
)
TEST_FILE = "tests/induction_test.jsonl"
VOWELS = set("aeiouy")


# ----------------------------------------------------------------------------- stories


def iter_stories(path: Path, chunk_chars: int = 1 << 22) -> Iterator[str]:
    """The complete stories of a TinyStories text file, stripped, in file order.

    Streams: memory holds one chunk. The text after the last separator is not a
    complete story (the sample was cut at 2 MiB; a full file ends with a separator) and
    is dropped.
    """
    if not path.is_file():
        raise UserError(f"stories file {path} not found")
    buf = ""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            while chunk := f.read(chunk_chars):
                buf += chunk
                *stories, buf = buf.split(STORY_SEPARATOR)
                for s in stories:
                    if s := s.strip():
                        yield s
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e})") from None


def story_key(seed: int, story: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{story}".encode()).digest()


def _sentence_initial(text: str, start: int) -> bool:
    j = start - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return j < 0 or text[j] in SENTENCE_OPENERS


@dataclass
class NameStats:
    capitalised_mid: Counter  # word -> capitalised occurrences not at a sentence start
    lower: Counter  # word -> all-lower-case occurrences

    def names(self, min_count: int = 2, max_lower_ratio: float = 0.1) -> list[str]:
        return sorted(
            w
            for w, c in self.capitalised_mid.items()
            if c >= min_count and self.lower[w.lower()] <= max_lower_ratio * c and w not in NOT_NAMES
        )


def count_words(stories: Iterable[str]) -> NameStats:
    cap, low = Counter(), Counter()
    for s in stories:
        for m in WORD.finditer(s):
            w = m.group()
            if w.islower():
                low[w] += 1
            elif len(w) >= 2 and w[0].isupper() and w[1:].islower() and not _sentence_initial(s, m.start()):
                cap[w] += 1
    return NameStats(cap, low)


def name_occurrences(story: str, names: frozenset[str] | set[str]) -> dict[str, list[tuple[int, int]]]:
    """name -> character spans of its whole-word occurrences (sentence starts included)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for m in WORD.finditer(story):
        if m.group() in names:
            out.setdefault(m.group(), []).append(m.span())
    return out


def has_repeated_name(story: str, names: frozenset[str]) -> bool:
    return any(len(v) >= 2 for v in name_occurrences(story, names).values())


# ----------------------------------------------------------------------------- names


@dataclass(frozen=True)
class NewName:
    text: str
    first: str  # its first token's text (without the leading space)


def _pronounceable(name: str) -> bool:
    """No three consonants or three vowels in a row (keeps out 'Kwhere', 'Thatlf')."""
    run_c = run_v = 0
    for ch in name.lower():
        v = ch in VOWELS
        run_v, run_c = (run_v + 1, 0) if v else (0, run_c + 1)
        if run_c >= 3 or run_v >= 3:
            return False
    return any(ch in VOWELS for ch in name.lower())


def two_token_split(tok: BPETokenizer, name: str) -> tuple[str, str] | None:
    """(first, second) token texts when `name` is exactly two tokens both with and
    without a leading space, with the same second token; else None."""
    bare = tok.encode(name)
    spaced = tok.encode(" " + name)
    if len(bare) != 2 or len(spaced) != 2 or bare[1] != spaced[1]:
        return None
    first = tok.decode_bytes(bare[:1]).decode("utf-8", errors="replace")
    return first, tok.decode_bytes(bare[1:]).decode("utf-8", errors="replace")


def name_pool(tok: BPETokenizer, forbidden: set[str], size: int, seed: int, max_len: int = 9) -> list[NewName]:
    """Up to `size` distinct random two-token names, in a seeded random order.

    A candidate joins a capitalised alphabetic token (one that is also a token after a
    space: " Xy") and a lower-case alphabetic token of two or more letters; it is kept
    when the BPE splits it back into exactly those two tokens in both contexts, it is
    4..max_len letters, pronounceable, and not a word of the stories (any case).
    """
    vocab = [tok.decode_bytes([i]).decode("utf-8", errors="replace") for i in range(tok.vocab_size)]
    vocab_set = set(vocab)
    firsts = sorted(
        t for t in vocab_set
        if t.isascii() and t.isalpha() and t[0].isupper() and (len(t) == 1 or t[1:].islower()) and " " + t in vocab_set
    )
    seconds = sorted(t for t in vocab_set if t.isascii() and t.isalpha() and t.islower() and len(t) >= 2)
    if not firsts or not seconds:
        raise UserError("the BPE has no capitalised or no lower-case word pieces to build two-token names from")
    rng = random.Random(f"induction-names-{seed}")
    out: dict[str, NewName] = {}
    attempts = 0
    while len(out) < size and attempts < 50 * size:
        attempts += 1
        a, b = rng.choice(firsts), rng.choice(seconds)
        name = a + b
        if name in out or not 4 <= len(name) <= max_len or name.lower() in forbidden or not _pronounceable(name):
            continue
        if two_token_split(tok, name) == (a, b):
            out[name] = NewName(name, a)
    return list(out.values())


@dataclass
class Replaced:
    text: str
    # one entry per name of the story: the new name, the one it replaced, and the UTF-8
    # byte spans [start, end) of its occurrences in `text`, in order
    names: list[dict]


def randomize_names(story: str, names: frozenset[str], pool: list[NewName], rng: random.Random) -> Replaced:
    """Every name of `story` replaced by a distinct pool name; no two new names of one
    story share a first token (otherwise its second token would be ambiguous)."""
    occ = name_occurrences(story, names)
    mapping: dict[str, NewName] = {}
    firsts: set[str] = set()
    for old in sorted(occ, key=lambda n: occ[n][0][0]):
        for _ in range(1000):
            new = pool[rng.randrange(len(pool))]
            if new.first not in firsts:
                break
        else:
            raise UserError(f"the name pool ({len(pool)} names) cannot give {len(occ)} names with distinct first tokens")
        mapping[old] = new
        firsts.add(new.first)
    spans = sorted((s, e, old) for old, v in occ.items() for s, e in v)
    parts: list[str] = []
    byte_spans: dict[str, list[list[int]]] = {old: [] for old in mapping}
    pos = nbytes = 0
    for s, e, old in spans:
        chunk = story[pos:s]
        parts.append(chunk)
        nbytes += len(chunk.encode("utf-8"))
        new = mapping[old].text
        parts.append(new)
        byte_spans[old].append([nbytes, nbytes + len(new)])  # names are ASCII
        nbytes += len(new)
        pos = e
    parts.append(story[pos:])
    info = [{"name": mapping[old].text, "original": old, "spans": byte_spans[old]} for old in mapping]
    return Replaced("".join(parts), info)


# ----------------------------------------------------------------------------- build


# Training text the default build aims for (`train_copies = 0`): about what one run of the
# GPU sweeps reads (1,000 steps of 65,536 tokens at ~3.6 bytes per token), so that each
# copy, i.e. each assignment of random names to a story, is seen about once. Copies seen
# many times are learned by heart, names included, and then no model needs to copy a name
# (8 copies of the 2 MiB sample read 16 times each: docs/synthetic.md). On the sample this
# makes 127 copies; a full TinyStories file gets 1.
AUTO_TRAIN_BYTES = 240_000_000


@dataclass
class InductionOptions:
    stories: str
    bpe_vocab: int = 2048
    seed: int = 0
    n_test: int = 100
    val_share: float = 0.05
    train_copies: int = 0  # 0: enough copies for AUTO_TRAIN_BYTES of training text
    randomize_train: bool = True
    test_pool: int = 1000  # names reserved for the test stories
    pool_size: int = 20000  # all two-token names drawn (test pool included)

    def check(self) -> None:
        if self.n_test < 1:
            raise UserError(f"--n-test must be >= 1, got {self.n_test}")
        if not 0 < self.val_share < 1:
            raise UserError(f"--val-share must be strictly between 0 and 1, got {self.val_share}")
        if self.train_copies < 0:
            raise UserError(f"--train-copies must be >= 1, or 0 for the default, got {self.train_copies}")
        if not self.randomize_train and self.train_copies > 1:
            raise UserError("--train-copies > 1 needs randomised training names (copies would be identical)")


def unique_stories(path: Path, seed: int) -> Iterator[tuple[bytes, str]]:
    """(key, story) of each distinct story, in file order (the first copy is kept)."""
    seen: set[bytes] = set()
    for s in iter_stories(path):
        key = story_key(seed, s)
        if key not in seen:
            seen.add(key)
            yield key, s


def build_induction(out: Path, opts: InductionOptions) -> dict:
    """Write the induction data set under `out`; return its manifest."""
    from data_prep.bpe import BPEOptions, train_bpe
    from data_prep.sharding import encode_split

    opts.check()
    src = Path(opts.stories)

    # Pass 1: character names, and every word of the stories (new names must not be one).
    words: set[str] = set()
    counts = {"stories": 0, "distinct": 0, "train": 0, "val": 0, "test": 0, "train_bytes": 0}

    def reading() -> Iterator[str]:
        for s in iter_stories(src):
            counts["stories"] += 1
            words.update(w.lower() for w in WORD.findall(s))
            yield s

    names = frozenset(count_words(reading()).names())
    if counts["stories"] == 0:
        raise UserError(f"{src} holds no complete story (each story ends with {STORY_SEPARATOR})")
    if not names:
        raise UserError(f"no character names found in {src}: is it a TinyStories file?")

    # Pass 2: the test stories.
    eligible = ((k, s) for k, s in unique_stories(src, opts.seed) if has_repeated_name(s, names))
    test = heapq.nsmallest(opts.n_test, eligible, key=lambda ks: ks[0])
    if len(test) < opts.n_test:
        raise UserError(f"{src} has only {len(test)} distinct stories with a repeated name, fewer than --n-test {opts.n_test}")
    test_keys = {k for k, _ in test}

    def split_of(key: bytes) -> str:
        if key in test_keys:
            return "test"
        return "val" if int.from_bytes(key[8:16], "big") < int(opts.val_share * 2**64) else "train"

    # Pass 3: the original training stories, for the BPE.
    with ShardWriter(out / "source" / "train", "uint8", None, {"source": "bytelm synth induction (original stories)"},
                     format=CORPUS_FORMAT) as w:
        for key, s in unique_stories(src, opts.seed):
            counts["distinct"] += 1
            sp = split_of(key)
            counts[sp] += 1
            if sp == "train":
                data = s.encode("utf-8")
                w.add(data, len(data))
                counts["train_bytes"] += len(data)
    if not opts.randomize_train:
        opts = replace(opts, train_copies=1)
    elif opts.train_copies == 0:
        opts = replace(opts, train_copies=max(1, math.ceil(AUTO_TRAIN_BYTES / max(counts["train_bytes"], 1))))
    bpe_info = train_bpe(out / "source" / "train", out / "bpe", BPEOptions(vocab_size=opts.bpe_vocab))
    tok = BPETokenizer(out / "bpe" / "tokenizer.json")

    # Two disjoint pools of two-token names: test names never occur in training.
    pool = name_pool(tok, words, opts.pool_size, opts.seed)
    if len(pool) < opts.test_pool + 100:
        raise UserError(f"only {len(pool)} two-token names under a {tok.vocab_size}-token BPE; raise --bpe-vocab")
    test_pool, train_pool = pool[: opts.test_pool], pool[opts.test_pool :]

    rows = []
    for i, (key, s) in enumerate(test):
        r = randomize_names(s, names, test_pool, random.Random(f"induction-test-{opts.seed}-{key.hex()}"))
        rows.append({"id": i, "story_sha256": hashlib.sha256(s.encode()).hexdigest(), "text": r.text, "names": r.names})
    write_jsonl(out / TEST_FILE, rows)

    # Pass 4 (one per copy): training and validation stories with random names.
    meta = {"source": "bytelm synth induction"}
    with atomic_path(out / "corpus", marker="train/meta.json") as tmp:
        tmp.mkdir()
        with (ShardWriter(tmp / "train", "uint8", None, meta, format=CORPUS_FORMAT) as train,
              ShardWriter(tmp / "val", "uint8", None, meta, format=CORPUS_FORMAT) as val):
            for copy in range(opts.train_copies):
                for key, s in unique_stories(src, opts.seed):
                    sp = split_of(key)
                    if sp == "test" or (sp == "val" and copy > 0):
                        continue
                    if opts.randomize_train:
                        rng = random.Random(f"induction-{sp}-{opts.seed}-{copy}-{key.hex()}")
                        s = randomize_names(s, names, train_pool, rng).text
                    data = s.encode("utf-8")
                    (train if sp == "train" else val).add(data, len(data))

    manifest = {
        "format": SYNTH_FORMAT,
        "task": "induction",
        "options": asdict(opts),
        "source": {"path": str(src), "sha256": sha256_file(src)},
        "counts": counts,
        "names": {"detected": sorted(names), "pool": len(pool), "test_pool": len(test_pool), "train_pool": len(train_pool)},
        "bpe": {k: bpe_info[k] for k in ("vocab_size", "tokenizer_sha256", "trained_on")},
        "test_file": TEST_FILE,
        "corpus": {sp: {"meta_sha256": sha256_file(out / "corpus" / sp / "meta.json")} for sp in ("train", "val")},
    }
    write_json(out / "manifest.json", manifest)
    msha = sha256_file(out / "manifest.json")
    for sp in ("train", "val"):
        encode_split(out / "corpus" / sp, out / "bytes" / sp, ByteTokenizer(), msha)
        encode_split(out / "corpus" / sp, out / "bpe" / sp, tok, msha)
    return manifest


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bytelm synth induction --out DIR [--stories FILE] [--bpe-vocab N] [--seed S]`: a
    prepared-data folder (`bytelm train` reads it with data.root=DIR) and DIR/tests/."""
    p.add_argument("--out", required=True, type=Path, help="output folder (a prepared-data folder)")
    p.add_argument("--stories", help=f"TinyStories text file (default: the data directory's {STORIES})")
    p.add_argument("--data-dir", help="benchmark data directory (default: $BYTELM_DATA_DIR or ../shared/data)")
    p.add_argument("--bpe-vocab", type=int, default=2048, help="BPE vocabulary size (default 2048: fits the 2 MiB sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=100, help="test stories (default 100, as the paper)")
    p.add_argument("--val-share", type=float, default=0.05, help="share of the other stories for validation")
    p.add_argument("--train-copies", type=int, default=0,
                   help="copies of the training stories, each with fresh random names (default 0: enough for about "
                        "240 MB of training text, one pass of a GPU sweep's run: 127 copies of the 2 MiB sample)")
    p.add_argument("--keep-train-names", action="store_true",
                   help="train on the stories' own names (the paper's set-up) instead of random ones; implies --train-copies 1")


def main(args: argparse.Namespace) -> int:
    from data_prep.sharding import check_synth_out

    check_synth_out(args.out, "induction")
    stories = Path(args.stories) if args.stories else data_file(STORIES, args.data_dir)
    opts = InductionOptions(
        stories=str(stories), bpe_vocab=args.bpe_vocab, seed=args.seed, n_test=args.n_test, val_share=args.val_share,
        train_copies=args.train_copies, randomize_train=not args.keep_train_names,
    )
    t0 = time.time()
    m = build_induction(args.out, opts)
    c = m["counts"]
    print(f"induction: {c['distinct']} stories ({c['train']} train x {m['options']['train_copies']} copies, {c['val']} val, "
          f"{c['test']} test), {len(m['names']['detected'])} names found, BPE {m['bpe']['vocab_size']} tokens, "
          f"{time.time() - t0:.1f} s -> {args.out}")
    return 0
