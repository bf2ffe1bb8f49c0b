"""Induction stories from the real TinyStories sample: story reading, name detection,
two-token replacement names, the split, and the data set on disk."""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from bytelm.errors import UserError
from bytelm.fileio import read_jsonl
from bytelm.paths import STORIES, STORY_SEPARATOR, data_file
from bytelm.shards import ShardDataset, iter_documents
from bytelm.tokenizers import BPETokenizer
from data_prep import induction as ind


def test_iter_stories_drops_the_unterminated_tail(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("One story.\n<|endoftext|>\n\n<|endoftext|>\nTwo.<|endoftext|>\nThree, cut sho")
    assert list(ind.iter_stories(f, chunk_chars=7)) == ["One story.", "Two."]
    f.write_text("One.<|endoftext|>Two.<|endoftext|>\n")
    assert list(ind.iter_stories(f)) == ["One.", "Two."]
    with pytest.raises(UserError, match="not found"):
        list(ind.iter_stories(tmp_path / "missing.txt"))


def test_the_sample_has_2316_complete_stories():
    # SOURCES.md: 2,316 complete stories + 1 truncated
    assert sum(1 for _ in ind.iter_stories(data_file(STORIES))) == 2316


def test_name_heuristic_on_the_sample():
    names = set(ind.count_words(ind.iter_stories(data_file(STORIES))).names())
    assert {"Lily", "Ben", "Tom", "Timmy", "Sue", "Mia", "Max"} <= names
    # common words capitalised at sentence starts, family words that occur in lower
    # case, and titles are not names
    assert not {"The", "Once", "One", "She", "Mom", "Dad", "Mommy", "Mr", "Mrs", "Tuesday"} & names


def test_sentence_initial_words_are_not_evidence():
    stats = ind.count_words(['"Hello," said Zig. Zig ran. Then Zig sat.\nZag came and Zag sang. "Zog!"'])
    assert stats.capitalised_mid == {"Zig": 2, "Zag": 1}
    assert stats.names(min_count=2) == ["Zig"]


def test_randomize_names_keeps_text_and_reports_byte_spans():
    pool = [ind.NewName("Kelun", "K"), ind.NewName("Kabo", "K"), ind.NewName("Brady", "Br")]
    story = "Sue met “Tom”. Sue's hat, Tom said, was red. Sue smiled."
    r = ind.randomize_names(story, frozenset({"Sue", "Tom"}), pool, random.Random(0))
    by_old = {n["original"]: n for n in r.names}
    assert set(by_old) == {"Sue", "Tom"}
    # distinct first tokens: one of the K-names and Brady
    assert {by_old["Sue"]["name"][0], by_old["Tom"]["name"][0]} == {"K", "B"}
    data = r.text.encode()
    for n, count in (("Sue", 3), ("Tom", 2)):
        spans = by_old[n]["spans"]
        assert len(spans) == count
        assert all(data[s:e].decode() == by_old[n]["name"] for s, e in spans)
    expected = story.replace("Sue", "\0").replace("Tom", by_old["Tom"]["name"]).replace("\0", by_old["Sue"]["name"])
    assert r.text == expected


# ----------------------------------------------------------------------------- the data set


@pytest.fixture(scope="module")
def induction_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("induction")
    r = subprocess.run([sys.executable, "-m", "bytelm", "synth", "induction", "--out", str(out), "--train-copies", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def records(out):
    return read_jsonl(out / ind.TEST_FILE)


def test_every_test_name_occurrence_is_exactly_two_tokens(induction_data):
    tok = BPETokenizer(induction_data / "bpe" / "tokenizer.json")
    rows = records(induction_data)
    assert len(rows) == 100
    n_occ = 0
    for r in rows:
        ids = tok.encode(r["text"])
        ends = np.cumsum(tok.token_byte_lengths[ids])
        starts = ends - tok.token_byte_lengths[ids]
        data = r["text"].encode()
        assert any(len(n["spans"]) >= 2 for n in r["names"])  # something to score
        firsts = set()
        for n in r["names"]:
            assert ind.two_token_split(tok, n["name"]) is not None
            firsts.add(ind.two_token_split(tok, n["name"])[0])
            for s, e in n["spans"]:
                assert data[s:e].decode() == n["name"]
                inside = [k for k in range(len(ids)) if starts[k] < e and ends[k] > s]
                assert len(inside) == 2, (n["name"], [tok.decode([ids[k]]) for k in inside])
                # the name's tokens end exactly where the name does; the first may hold a space
                assert ends[inside[1]] == e and starts[inside[0]] in (s, s - 1)
                n_occ += 1
        assert len(firsts) == len(r["names"])  # no two names of a story share a first token
    assert n_occ > 300


def test_test_names_and_stories_never_occur_in_training(induction_data):
    rows = records(induction_data)
    test_names = {n["name"] for r in rows for n in r["names"]}
    train_text = b"\n".join(iter_documents(induction_data / "corpus" / "train")).decode()
    train_words = set(re.findall(r"[A-Za-z]+", train_text))
    assert not test_names & train_words
    originals = {r["story_sha256"] for r in rows}
    for d in iter_documents(induction_data / "source" / "train"):
        assert hashlib.sha256(d).hexdigest() not in originals


def test_training_stories_have_random_names_in_fresh_copies(induction_data):
    manifest = json.loads((induction_data / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["train"] + c["val"] + c["test"] == c["distinct"] == 2316
    docs = list(iter_documents(induction_data / "corpus" / "train"))
    assert len(docs) == 2 * c["train"]
    text = b"\n".join(docs).decode()
    assert " Lily " not in text and " Ben " not in text
    # the two copies of a story differ in their names only
    a, b = docs[0].decode(), docs[c["train"]].decode()
    assert a != b and re.sub(r"[A-Z][a-z]+", "N", a) == re.sub(r"[A-Z][a-z]+", "N", b)


def test_shards_open_for_both_arms(induction_data):
    for arm in ("bytes", "bpe"):
        for split in ("train", "val"):
            ds = ShardDataset(induction_data / arm / split)
            assert ds.tokenizer.kind == arm
            assert ds.n_text_bytes == sum(len(d) for d in iter_documents(induction_data / "corpus" / split))
    assert ShardDataset(induction_data / "bpe" / "train").tokenizer.vocab_size == 2048


def test_the_build_is_deterministic(induction_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bytelm", "synth", "induction", "--out", str(tmp_path / "again"),
                        "--train-copies", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for rel in (ind.TEST_FILE, "bpe/tokenizer.json", "bpe/train/tokens_00000.bin", "bytes/val/tokens_00000.bin"):
        assert (tmp_path / "again" / rel).read_bytes() == (induction_data / rel).read_bytes(), rel


def test_bad_inputs(tmp_path):
    def synth(*args):
        return subprocess.run([sys.executable, "-m", "bytelm", "synth", "induction", "--out", str(tmp_path / "o"), *args],
                              capture_output=True, text=True)

    r = synth("--stories", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "not found" in r.stderr
    f = tmp_path / "few.txt"
    f.write_text("Zig saw Zig and Zig.<|endoftext|>\n")
    r = synth("--stories", str(f))
    assert r.returncode == 2 and "fewer than --n-test" in r.stderr
    assert not (tmp_path / "o" / "corpus").exists()


def test_bpe_metric_scores_exactly_the_second_token_of_each_repeat(induction_data):
    import torch

    from bytelm.synthetic_eval import induction_accuracy, story_targets

    tok = BPETokenizer(induction_data / "bpe" / "tokenizer.json")
    rows = records(induction_data)
    repeats = sum(len(n["spans"]) - 1 for r in rows for n in r["names"])
    firsts = sum(len(r["names"]) for r in rows)

    def oracle(x):
        return torch.cat([x[:, 1:], torch.full_like(x[:, :1], tok.pad_id)], dim=1)

    res = induction_accuracy(oracle, tok, rows, context=4096)
    assert (res.repeated.total, res.repeated.correct, res.first.total) == (repeats, repeats, firsts)
    m = res.metrics()
    assert m["induction/acc"] == 1.0 and m["induction/acc_first"] == 1.0
    # the scored token is the name's second token
    for r in rows[:10]:
        n = next(n for n in r["names"] if len(n["spans"]) >= 2)
        st = story_targets(tok, {"text": r["text"], "names": [n]}, 4096)
        second = ind.two_token_split(tok, n["name"])[1]
        assert [len(t.positions) for t in st.targets] == [1] * len(n["spans"])
        assert all(tok.decode([st.ids[t.positions[0] + 1]]) == second for t in st.targets)


def test_default_copies_give_about_one_pass_of_a_gpu_run(tmp_path, monkeypatch):
    """train_copies = 0 makes enough copies for AUTO_TRAIN_BYTES of training text (the
    GPU sweeps read about that much: each name assignment about once); here on the first
    400 stories of the sample, with the target scaled down."""
    text = data_file(STORIES).read_text(encoding="utf-8")
    head = STORY_SEPARATOR.join(text.split(STORY_SEPARATOR)[:400]) + STORY_SEPARATOR
    src = tmp_path / "stories.txt"
    src.write_text(head, encoding="utf-8")
    monkeypatch.setattr(ind, "AUTO_TRAIN_BYTES", 1_000_000)
    m = ind.build_induction(tmp_path / "out", ind.InductionOptions(stories=str(src), n_test=5, bpe_vocab=1024))
    c = m["counts"]
    copies = m["options"]["train_copies"]
    assert copies == -(-1_000_000 // c["train_bytes"]) and copies > 1
    train = sum(len(d) for d in iter_documents(tmp_path / "out" / "corpus" / "train"))
    assert len(list(iter_documents(tmp_path / "out" / "corpus" / "train"))) == copies * c["train"]
    assert 0.95 < train / (copies * c["train_bytes"]) < 1.05  # random names change a story's length a little
    with pytest.raises(UserError, match="--train-copies must be >= 1, or 0"):
        ind.InductionOptions(stories=str(src), train_copies=-1).check()
