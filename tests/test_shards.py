"""Token shards: writer, memory-mapped reader, deterministic windows, boundary masks, bad files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from bytelm.errors import UserError
from bytelm.shards import CORPUS_FORMAT, IGNORE_INDEX, ShardDataset, ShardWriter, iter_documents
from bytelm.tokenizers import ByteTokenizer

DOCS = [b"first document", b"ab", b"x" * 30, b"the last one\n", b"q", b"\xff\xfe not utf-8"]


def write_split(path, docs=DOCS, shard_tokens=16):
    tok = ByteTokenizer()
    with ShardWriter(path, "uint16", tok.eos_id, {"tokenizer": tok.describe()}, shard_tokens) as w:
        for d in docs:
            w.add(np.frombuffer(d, dtype=np.uint8), len(d))
    return w.meta


def stream_and_docs(docs=DOCS):
    """The expected token stream and, per position, the index of its document."""
    stream, owner = [], []
    for i, d in enumerate(docs):
        stream += list(d) + [256]
        owner += [i] * (len(d) + 1)
    return np.array(stream), np.array(owner)


def expected_y(starts, seq_len, n_future, docs=DOCS):
    stream, owner = stream_and_docs(docs)
    y = np.full((len(starts), seq_len, n_future), IGNORE_INDEX)
    for b, s in enumerate(starts):
        for t in range(seq_len):
            for i in range(n_future):
                p, q = s + t, s + t + i + 1
                if owner[q] == owner[p]:
                    y[b, t, i] = stream[q]
    return y


def test_writer_layout_and_reader_totals(tmp_path):
    meta = write_split(tmp_path / "train", shard_tokens=16)
    stream, _ = stream_and_docs()
    n = len(stream)
    assert meta["n_tokens"] == n and meta["n_docs"] == len(DOCS) and meta["n_text_bytes"] == sum(map(len, DOCS))
    # Bounded shards: all full but the last; a document may continue into the next shard.
    assert [s["n_tokens"] for s in meta["shards"]] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    on_disk = np.concatenate([np.fromfile(tmp_path / "train" / s["tokens"], dtype="<u2") for s in meta["shards"]])
    assert np.array_equal(on_disk, stream)
    ds = ShardDataset(tmp_path / "train", verify=True)
    assert (ds.n_tokens, ds.n_docs, ds.n_text_bytes) == (n, len(DOCS), meta["n_text_bytes"])
    assert ds.doc_starts.tolist() == np.cumsum([0] + [len(d) + 1 for d in DOCS[:-1]]).tolist()
    assert isinstance(ds.tokenizer, ByteTokenizer)
    # Nothing but the finished folder is left in the parent.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


@pytest.mark.parametrize("seq_len,n_future", [(5, 1), (4, 3), (7, 8)])
def test_eval_windows_and_boundary_masks(tmp_path, seq_len, n_future):
    write_split(tmp_path / "s", shard_tokens=16)
    ds = ShardDataset(tmp_path / "s")
    stream, _ = stream_and_docs()
    n_win = (len(stream) - n_future) // seq_len
    assert ds.n_windows(seq_len, n_future) == n_win
    xs, ys = zip(*ds.iter_eval_batches(seq_len, n_future, batch_size=3))
    x, y = np.concatenate([t.numpy() for t in xs]), np.concatenate([t.numpy() for t in ys])
    starts = np.arange(n_win) * seq_len
    # In order, every token an input exactly once; windows straddle shard boundaries.
    assert np.array_equal(x.reshape(-1), stream[: n_win * seq_len])
    assert np.array_equal(y, expected_y(starts, seq_len, n_future))
    assert x.dtype == y.dtype == np.int64 and y.shape == (n_win, seq_len, n_future)
    # The EOS belongs to the document it ends: predicting it is allowed, predicting past it is not.
    eos_pos = int(np.nonzero(stream == 256)[0][0])
    b, t = divmod(eos_pos - 1, seq_len)
    if b < n_win:
        assert y[b, t, 0] == 256
    b, t = divmod(eos_pos, seq_len)
    if b < n_win:
        assert y[b, t, 0] == IGNORE_INDEX
    assert len(list(ds.iter_eval_batches(seq_len, n_future, batch_size=2, max_batches=2))) == min(2, -(-n_win // 2))


def test_batches_are_deterministic_permuted_epochs_and_independent_of_world_size(tmp_path):
    rng = random.Random(0)
    docs = [rng.randbytes(rng.randint(1, 60)) for _ in range(40)]
    write_split(tmp_path / "s", docs=docs, shard_tokens=100)
    ds = ShardDataset(tmp_path / "s")
    T, n, B = 8, 4, 6
    x0, y0 = ds.batch(3, T, n, B, seed=7)
    x1, y1 = ShardDataset(tmp_path / "s").batch(3, T, n, B, seed=7)  # a fresh reader: same batch
    assert x0.equal(x1) and y0.equal(y1)
    assert not ds.batch(3, T, n, B, seed=8)[0].equal(x0)
    assert not ds.batch(4, T, n, B, seed=7)[0].equal(x0)
    # Rank r of world w gets its contiguous slice of the global batch.
    for world in (2, 3):
        parts = [ds.batch(3, T, n, B, seed=7, rank=r, world=world) for r in range(world)]
        assert np.array_equal(np.concatenate([p[0].numpy() for p in parts]), x0.numpy())
        assert np.array_equal(np.concatenate([p[1].numpy() for p in parts]), y0.numpy())
    # One epoch visits every window once (in a seed-dependent order); masks match the rule.
    stream, _ = stream_and_docs(docs)
    n_win = ds.n_windows(T, n)
    rows = np.concatenate([ds.batch(s, T, n, 1, seed=7)[0].numpy() for s in range(n_win)])
    starts = [int(np.nonzero((np.lib.stride_tricks.sliding_window_view(stream, T) == r).all(1))[0][0]) for r in rows]
    assert sorted(s // T for s in starts) == list(range(n_win)) and starts != sorted(starts)
    ys = np.concatenate([ds.batch(s, T, n, 1, seed=7)[1].numpy() for s in range(n_win)])
    assert np.array_equal(ys, expected_y(starts, T, n, docs))
    # Steps past the first epoch go on into the next permutation.
    x_next = ds.batch(n_win, T, n, 1, seed=7)[0]
    assert x_next.shape == (1, T)
    with pytest.raises(ValueError, match="split evenly"):
        ds.batch(0, T, n, 5, seed=0, rank=0, world=2)


def test_split_smaller_than_one_window(tmp_path):
    write_split(tmp_path / "s", docs=[b"abc"])
    with pytest.raises(UserError, match="fewer than one window"):
        ShardDataset(tmp_path / "s").batch(0, 16, 2, 1, seed=0)


def test_corpus_format_round_trip(tmp_path):
    with ShardWriter(tmp_path / "c", "uint8", None, {}, shard_tokens=7, format=CORPUS_FORMAT) as w:
        for d in DOCS:
            w.add(d, len(d))
    assert list(iter_documents(tmp_path / "c", verify=True)) == DOCS
    with pytest.raises(UserError, match="format"):
        ShardDataset(tmp_path / "c")  # a corpus split is not a token split


def test_writer_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", "uint16", 256, {}, 4) as w:
            w.add(np.arange(10), 10)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def split(tmp_path):
    write_split(tmp_path / "s", shard_tokens=16)
    return tmp_path / "s"


def edit_meta(split, fn):
    meta = json.loads((split / "meta.json").read_text())
    fn(meta)
    (split / "meta.json").write_text(json.dumps(meta))


def test_missing_meta(tmp_path):
    with pytest.raises(UserError, match="meta.json not found"):
        ShardDataset(tmp_path)
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a valid meta.json"):
        ShardDataset(tmp_path)


def test_truncated_shard(split):
    path = split / "tokens_00001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated"):
        ShardDataset(split)


def test_missing_shard(split):
    (split / "docs_00002.npy").unlink()
    with pytest.raises(UserError, match="missing"):
        ShardDataset(split)


def test_corrupt_shard_caught_by_checksum(split):
    path = split / "tokens_00000.bin"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    # sizes still match: the checksum of the file's ends (checked at every open) tells
    with pytest.raises(UserError, match="fails its checksum"):
        ShardDataset(split)
    with pytest.raises(UserError, match="checksum"):
        ShardDataset(split, verify=True)


def test_corrupt_docs_file(split):
    (split / "docs_00000.npy").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid .npy"):
        ShardDataset(split)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(n_tokens=m["n_tokens"] + 1), "do not add up"),
        (lambda m: m["shards"][0].update(n_docs=m["shards"][0]["n_docs"] + 1, sha256="x") or m.update(n_docs=m["n_docs"] + 1), "does not match"),
        (lambda m: m.update(dtype="uint32"), "expected"),
        (lambda m: m["tokenizer"].update(vocab_size=300), "vocab_size"),
        (lambda m: m.update(tokenizer={"kind": "bpe", "path": "bpe/tokenizer.json"}), "not found"),
        (lambda m: m.update(tokenizer={"kind": "sentencepiece"}), "unknown tokenizer kind"),
        (lambda m: m.pop("shards"), "not a valid meta.json"),
        (lambda m: m["shards"][0].pop("tokens"), "not a valid meta.json"),
        (lambda m: m.clear() or m.update(format="bytelm-shards/1", dtype="float99"), "not a valid meta.json"),
    ],
)
def test_meta_not_matching_shards(split, edit, message):
    edit_meta(split, edit)
    with pytest.raises(UserError, match=message):
        ShardDataset(split)


def test_tokenizer_file_of_the_wrong_kind(split):
    # meta.json points at a BPE tokenizer, but the file there is something else.
    (split.parent / "bpe").mkdir()
    (split.parent / "bpe" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    edit_meta(split, lambda m: m.update(tokenizer={"kind": "bpe", "path": "bpe/tokenizer.json", "vocab_size": 258, "eos_id": 256, "pad_id": 257}))
    with pytest.raises(UserError, match="tokenizer"):
        ShardDataset(split / ".." / "s")


def test_shards_from_another_corpus(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "manifest.json").write_text("{}")
    with ShardWriter(tmp_path / "bytes" / "train", "uint16", 256, {"tokenizer": tok.describe(), "manifest_sha256": "0" * 64}) as w:
        w.add(np.arange(5), 5)
    with pytest.raises(UserError, match="another corpus"):
        ShardDataset(tmp_path / "bytes" / "train")
