"""Tokenizers: exact round trips on arbitrary bytes and text, and clear errors for bad files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from bytelm.errors import UserError
from bytelm.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

TEXTS = [
    "",
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "naïve café — 日本語 🐍 \u0000 \x7f",
    "    " * 20 + "pass\n\n\n",
    "<|eos|> is plain text here, not the special token",
]


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for seed in range(20):
        data = random_bytes(seed, seed * 37)
        ids = tok.encode(data)
        assert ids == list(data) and tok.decode_bytes(ids) == data
        assert np.array_equal(tok.encode_array(data), np.frombuffer(data, dtype=np.uint8))
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    # Special ids stand for no text: they vanish on decoding and count 0 bytes.
    assert tok.decode_bytes([104, 256, 105, 257]) == b"hi"
    assert tok.token_byte_lengths[[104, 256, 257]].tolist() == [1, 0, 0]


def test_bpe_round_trip_on_text_and_arbitrary_bytes(smoke_data):
    tok = load_tokenizer("bpe", smoke_data / "bpe" / "tokenizer.json")
    assert tok.vocab_size == 2048 and {tok.eos_id, tok.pad_id} == {0, 1}
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text.encode("utf-8")) == ids  # bytes and str encode alike
        # token_byte_lengths is what bits per byte divides by: it must add up exactly.
        assert int(tok.token_byte_lengths[ids].sum()) == len(text.encode("utf-8"))
    for seed in range(30):  # random bytes are almost never valid UTF-8
        data = random_bytes(seed, 1 + seed * 11)
        ids = tok.encode(data)
        assert tok.decode_bytes(ids) == data
        assert max(ids, default=0) < tok.vocab_size
    # Decoding a prefix that cuts a multi-byte character keeps the exact bytes.
    ids = tok.encode("日本語")
    assert b"".join(tok.decode_bytes([i]) for i in ids) == "日本語".encode()
    assert tok.decode_bytes([tok.eos_id, tok.pad_id]) == b""
    # The special tokens are not produced from their text: they are only ever added.
    assert tok.eos_id not in tok.encode("<|eos|>")


def test_bpe_compresses_code(smoke_data):
    tok = BPETokenizer(smoke_data / "bpe" / "tokenizer.json")
    code = "import os\n\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n        print(name)\n"
    assert len(code) / len(tok.encode(code)) > 2.0


def _word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_bpe_tokenizer_file_of_the_wrong_kind(tmp_path, smoke_data):
    with pytest.raises(UserError, match="not found"):
        BPETokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{ not json")
    with pytest.raises(UserError, match="not a HuggingFace tokenizer.json"):
        BPETokenizer(tmp_path / "junk.json")
    _word_level_tokenizer(tmp_path / "wordlevel.json")
    with pytest.raises(UserError, match="not a byte-level BPE"):
        BPETokenizer(tmp_path / "wordlevel.json")
    # A byte-level BPE without the suite's special tokens.
    spec = json.loads((smoke_data / "bpe" / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|pad|>"]
    del spec["model"]["vocab"]["<|pad|>"]
    (tmp_path / "nopad.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="lacks the special token <\\|pad\\|>"):
        BPETokenizer(tmp_path / "nopad.json")
    with pytest.raises(UserError, match="needs the path"):
        load_tokenizer("bpe")
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer("wordpiece")
