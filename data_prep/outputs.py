"""What `bytelm prepare` may replace in its output folder, and the leftovers it removes.

`prepare` writes a fixed set of paths under `--out DIR` (listed in `OUTPUTS`). It replaces
one of them only when it made it itself, recognised by its format marker:
`manifest.json` of format `bytelm-manifest/1`, a corpus folder whose `train/` and `val/`
hold a `meta.json` of format `bytelm-corpus/1`, a token split whose `meta.json` is of
format `bytelm-shards/1`, the BPE's two JSON files. Anything else at one of those paths
(a user's own `DIR/corpus/` folder, say) stops the command with one line before anything
is written. An output folder that is, contains or lies inside one of the sources is
refused too: the command would read what it writes, or replace what it reads.

A run killed mid-stage leaves the temporary folder of `bytelm.fileio.atomic_path` behind:
`.corpus.~PID@HOST~XXXX/` beside `corpus/`, `.train.~PID@HOST~XXXX/` beside a token split,
and so on. The next run removes those of its own outputs whose process is dead
(`remove_stale_temporaries`), and a write of an output removes those beside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bytelm import fileio
from bytelm.errors import UserError
from bytelm.shards import CORPUS_FORMAT, TOKEN_FORMAT

MANIFEST_FORMAT = "bytelm-manifest/1"

# Path under DIR -> what marks it as made by prepare.
OUTPUTS = {
    "manifest.json": "manifest",
    "corpus": "corpus",
    "bytes/train": "shards",
    "bytes/val": "shards",
    "bpe/train": "shards",
    "bpe/val": "shards",
    "bpe/tokenizer.json": "json",
    "bpe/tokenizer_info.json": "json",
}


def _json_format(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def is_ours(path: Path, kind: str) -> bool:
    if path.is_symlink():
        return False
    if kind == "manifest":
        return path.is_file() and _json_format(path) == MANIFEST_FORMAT
    if kind == "json":  # the BPE's files: plain JSON files of the kind prepare writes
        if not path.is_file():
            return False
        try:
            return isinstance(json.loads(path.read_text()), dict)
        except (OSError, ValueError, UnicodeDecodeError):
            return False
    if kind == "shards":
        return path.is_dir() and {p.name for p in path.iterdir()} <= _shard_names(path) and _json_format(path / "meta.json") == TOKEN_FORMAT
    if kind == "corpus":
        return (
            path.is_dir()
            and {p.name for p in path.iterdir()} == {"train", "val"}
            and all(
                _json_format(path / s / "meta.json") == CORPUS_FORMAT and {p.name for p in (path / s).iterdir()} <= _shard_names(path / s)
                for s in ("train", "val")
            )
        )
    raise ValueError(kind)


_SHARD_FILE = re.compile(r"(tokens_\d{5,}\.bin|docs_\d{5,}\.npy|meta\.json)")


def _shard_names(split: Path) -> set[str]:
    return {p.name for p in split.iterdir() if _SHARD_FILE.fullmatch(p.name)}


def check_output(out: Path, source_roots: list[Path]) -> None:
    """Refuse an output folder that overlaps a source or holds, at a path prepare writes,
    something prepare did not make."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    real = out.resolve()
    for root in source_roots:
        root = root.resolve()
        if real == root or real.is_relative_to(root) or root.is_relative_to(real):
            raise UserError(f"--out {out} overlaps the source {root}: choose an output folder outside every source")
    for rel, kind in OUTPUTS.items():
        path = out / rel
        if (path.exists() or path.is_symlink()) and not is_ours(path, kind):
            raise UserError(
                f"{path} exists and was not made by `bytelm prepare`; it is left alone: "
                "move it away or choose another --out"
            )


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders that a killed run of prepare left beside its outputs:
    those of `bytelm.fileio.atomic_path` whose process is dead (`fileio.remove_stale_temporaries`)."""
    removed = []
    for rel in OUTPUTS:
        path = out / rel
        if path.parent.is_dir():
            removed += fileio.remove_stale_temporaries(path.parent, path.name)
    return removed
