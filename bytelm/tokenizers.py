"""One tokenizer interface for both arms of the study.

- `ByteTokenizer`: ids 0..255 are the byte values; 256 is the end-of-document token (the
  separator written after every document in the shards, and the EOS of generation); 257
  is padding. vocab_size = 258.
- `BPETokenizer`: a byte-level BPE (HuggingFace `tokenizers`) saved as `tokenizer.json`,
  with the special tokens `<|eos|>` and `<|pad|>`. Decoding goes through the byte-level
  alphabet, token by token, so any id sequence decodes to its exact bytes (also when it
  cuts a UTF-8 character in half).

Both decode to bytes (`decode_bytes`) and to text (`decode`, invalid UTF-8 replaced), and
know how many text bytes each id stands for (`token_byte_lengths`), which is what bits
per byte needs.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bytelm.errors import UserError

EOS_TEXT = "<|eos|>"
PAD_TEXT = "<|pad|>"


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, data: bytes | str) -> list[int]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return list(data)

    def encode_array(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[256:] = 0
        return lengths

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte value as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class BPETokenizer:
    kind = "bpe"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found")
        try:
            spec = json.loads(path.read_text())
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exceptions for bad files
            raise UserError(f"{path} is not a HuggingFace tokenizer.json: {e}") from None
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        dec = (spec.get("decoder") or {}).get("type")
        model = (spec.get("model") or {}).get("type")
        if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) or dec != "ByteLevel" or model != "BPE":
            raise UserError(
                f"{path} is not a byte-level BPE tokenizer (model {model!r}, pre_tokenizer {pre!r}, decoder {dec!r})"
            )
        self.path = path
        # Text that spells a special token ("<|eos|>" inside a document) is encoded as
        # ordinary text: special ids come only from the shard writer and generation.
        self._tok.encode_special_tokens = True
        self.eos_id = self._special(EOS_TEXT)
        self.pad_id = self._special(PAD_TEXT)
        self.vocab_size = self._tok.get_vocab_size()

    def _special(self, text: str) -> int:
        i = self._tok.token_to_id(text)
        if i is None:
            raise UserError(f"{self.path} lacks the special token {text}")
        return i

    def encode(self, data: bytes | str) -> list[int]:
        if isinstance(data, str):
            return self._tok.encode(data, add_special_tokens=False).ids
        # Bytes that are not valid UTF-8: encode each valid stretch as text and each
        # invalid byte as its single-byte token, so that decode_bytes gives back the input.
        ids: list[int] = []
        while data:
            try:
                text, bad, data = data.decode("utf-8"), b"", b""
            except UnicodeDecodeError as e:
                text, bad, data = data[: e.start].decode("utf-8"), data[e.start : e.end], data[e.end :]
            if text:
                ids += self._tok.encode(text, add_special_tokens=False).ids
            ids += [self._byte_ids[b] for b in bad]
        return ids

    @cached_property
    def _byte_ids(self) -> list[int]:
        """Id of the single-byte token of each byte value (all are in the base alphabet)."""
        return [self._tok.token_to_id(ch) for _, ch in sorted(_bytes_to_unicode().items())]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_array(self, data: bytes | str) -> np.ndarray:
        return np.asarray(self.encode(data), dtype=np.int64)

    @cached_property
    def _id_bytes(self) -> list[bytes]:
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        out = []
        for i in range(self.vocab_size):
            tok = self._tok.id_to_token(i)
            if i in (self.eos_id, self.pad_id) or tok is None:
                out.append(b"")
            elif all(ch in inverse for ch in tok):
                out.append(bytes(inverse[ch] for ch in tok))
            else:  # an added token that is not in the byte alphabet: its UTF-8 text
                out.append(tok.encode("utf-8"))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._id_bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(b) for b in self._id_bytes], dtype=np.int64)

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id, "path": str(self.path)}


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(kind: str, path: str | Path | None = None) -> Tokenizer:
    """`bytes`, or `bpe` with the path of a tokenizer.json."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        if path is None:
            raise UserError("a BPE tokenizer needs the path of its tokenizer.json")
        return BPETokenizer(path)
    raise UserError(f"unknown tokenizer kind {kind!r} (bytes or bpe)")
