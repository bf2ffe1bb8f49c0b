"""Training the byte-level BPE baseline tokenizer on the train split of the corpus.

HuggingFace `tokenizers`: GPT-2-style byte-level pre-tokenisation (no prefix space, so a
round trip is exact), a BPE model with no unknown token (every byte is in the initial
alphabet), the special tokens `<|eos|>` (id 0) and `<|pad|>` (id 1), and the byte-level
decoder. The trainer reads documents from the on-disk corpus through an iterator, so the
corpus is never in memory; its own memory grows with the number of distinct
pre-tokenised words, which `max_bytes` bounds on very large corpora.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bytelm.errors import UserError
from bytelm.fileio import atomic_path, write_json
from bytelm.shards import iter_documents, sha256_file
from bytelm.tokenizers import EOS_TEXT, PAD_TEXT

DEFAULT_VOCAB = 32768
DEFAULT_TRAIN_BYTES = 512 << 20  # the BPE sees at most the first 512 MiB of the train split (memory: docs/data.md)


@dataclass
class BPEOptions:
    vocab_size: int = DEFAULT_VOCAB
    max_bytes: int = DEFAULT_TRAIN_BYTES
    min_frequency: int = 2

    def check(self) -> None:
        if not 258 <= self.vocab_size <= 1 << 32:
            raise UserError(f"--bpe-vocab must be between 258 (256 bytes + 2 specials) and 2**32, got {self.vocab_size}")
        if self.max_bytes < 1:
            raise UserError(f"--bpe-train-bytes must be >= 1, got {self.max_bytes}")


def _texts(corpus_train: Path, max_bytes: int, stats: dict) -> Iterator[str]:
    """The UTF-8 documents of the train split, up to max_bytes in total."""
    for data in iter_documents(corpus_train):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        stats["docs"] += 1
        stats["bytes"] += len(data)
        yield text
        if stats["bytes"] >= max_bytes:
            return


def bpe_key(corpus_train_meta_sha256: str, opts: BPEOptions) -> str:
    state = {"corpus_train_meta": corpus_train_meta_sha256, "options": opts.__dict__, "format": "bytelm-bpe/1"}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def train_bpe(corpus_train: Path, bpe_dir: Path, opts: BPEOptions) -> dict:
    """Write bpe_dir/tokenizer.json and bpe_dir/tokenizer_info.json; return the info.

    Skips training when tokenizer_info.json records the same corpus and options and the
    tokenizer file still has the recorded hash.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    opts.check()
    key = bpe_key(sha256_file(corpus_train / "meta.json"), opts)
    tok_path, info_path = bpe_dir / "tokenizer.json", bpe_dir / "tokenizer_info.json"
    if info_path.is_file() and tok_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == key and info.get("tokenizer_sha256") == sha256_file(tok_path):
            print(f"bpe: up to date ({tok_path})")
            return info

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=opts.vocab_size,
        min_frequency=opts.min_frequency,
        special_tokens=[EOS_TEXT, PAD_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = {"docs": 0, "bytes": 0}
    tok.train_from_iterator(_texts(corpus_train, opts.max_bytes, stats), trainer)
    with atomic_path(tok_path) as tmp:
        tok.save(str(tmp))
    info = {
        "key": key,
        "tokenizer_sha256": sha256_file(tok_path),
        "vocab_size": tok.get_vocab_size(),
        "requested_vocab_size": opts.vocab_size,
        "trained_on": stats,
        "options": opts.__dict__,
    }
    write_json(info_path, info)
    return info
