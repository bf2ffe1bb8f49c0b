"""Where documents come from: one `Source` per `--source SPEC`.

SPEC is one of
- `python-env`: the `.py` files of the running interpreter's standard library and of its
  installed packages (sysconfig's `stdlib`, `purelib`, `platlib`);
- `python-stdlib`: the standard library alone (the smoke preset takes a few MB of it);
- a folder: its files whose path relative to the folder matches one of the `--glob`
  patterns (fnmatch, where `*` also matches `/`, so `*.py` takes every .py at any depth).
  Only regular files are read (a FIFO, socket or device is skipped and counted: reading
  a FIFO would block forever). A symbolic link is followed only when its target lies
  inside the folder, unless `follow_symlinks` is set (`--follow-symlinks`): a link such as
  `link.py -> /etc/passwd` is skipped and counted, so a shared folder cannot pull files
  from elsewhere on the machine into a corpus;
- a `.jsonl` or `.jsonl.gz` file: one JSON object per line, the document in `--text-field`.

Documents come out in a fixed order (sorted paths, file order), so everything downstream
is deterministic. `fingerprint()` summarises a source's files by path, size and mtime:
cheap to compute, and it changes when an input does, which is what lets `prepare` skip
work that is already done.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import stat
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bytelm.errors import UserError

PYTHON_GLOBS = ("*.py",)
# Folders of an interpreter's stdlib that are not the stdlib (they are walked, if at all,
# as purelib/platlib).
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    source: int  # index of the Source it came from
    name: str  # a path or `file:line`, for reports
    data: bytes


@dataclass
class Source:
    spec: str
    globs: tuple[str, ...] = PYTHON_GLOBS
    text_field: str = "text"
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        if self.spec in ("python-env", "python-stdlib"):
            self.kind = self.spec
            self.roots = _python_roots(stdlib_only=self.spec == "python-stdlib")
            self.globs = PYTHON_GLOBS
            return
        path = Path(self.spec).expanduser()
        if not path.exists():
            raise UserError(f"source {self.spec!r} does not exist (expected python-env, a folder, or a .jsonl/.jsonl.gz file)")
        if path.is_dir():
            self.kind, self.roots = "folder", [("", path.resolve())]
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            self.kind, self.roots = "jsonl", [("", path.resolve())]
        else:
            raise UserError(f"source {self.spec!r} is a file but not .jsonl or .jsonl.gz")

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "roots": [str(r) for _, r in self.roots]}
        if self.kind == "jsonl":
            d["text_field"] = self.text_field
        else:
            d["globs"] = list(self.globs)
        return d

    def files(self, skipped: dict | None = None) -> Iterator[tuple[str, Path]]:
        """(document name, path) of every input file, in a fixed order; `skipped` counts
        the matching entries that are not read (not a regular file, a link leaving the root)."""
        if self.kind == "jsonl":
            yield self.roots[0][1].name, self.roots[0][1]
            return
        skipped = {} if skipped is None else skipped
        for label, root in self.roots:
            exclude = _NOT_STDLIB if label == "stdlib" else {"__pycache__"}
            for rel in _walk(root, exclude, self.follow_symlinks):
                if not any(fnmatch.fnmatch(rel, g) for g in self.globs):
                    continue
                why = _unreadable_reason(root, root / rel, self.follow_symlinks)
                if why:
                    skipped[why] = skipped.get(why, 0) + 1
                    continue
                yield (f"{label}/{rel}" if label else rel), root / rel

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for name, path in self.files():
            try:
                st = path.stat()
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{name}\0unreadable\n".encode())
        return h.hexdigest()

    def documents(self, index: int, stats: dict) -> Iterator[Document]:
        """Every document; `stats` counts what could not be read or was empty."""
        if self.kind == "jsonl":
            yield from self._jsonl(index, stats)
            return
        for name, path in self.files(stats):
            try:
                data = path.read_bytes()
            except OSError:
                stats["unreadable"] = stats.get("unreadable", 0) + 1
                continue
            if not data:
                stats["empty"] = stats.get("empty", 0) + 1
                continue
            yield Document(index, name, data)

    def _jsonl(self, index: int, stats: dict) -> Iterator[Document]:
        path = self.roots[0][1]
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}, line {lineno}"
                    try:
                        record = json.loads(line)
                    except ValueError as e:
                        raise UserError(f"{where} is not valid JSON ({e})") from None
                    if not isinstance(record, dict) or self.text_field not in record:
                        raise UserError(f"{where} has no field {self.text_field!r} (choose the field with --text-field)")
                    text = record[self.text_field]
                    if not isinstance(text, str):
                        raise UserError(f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
                    if not text:
                        stats["empty"] = stats.get("empty", 0) + 1
                        continue
                    # surrogatepass: a lone surrogate escaped in the JSON survives as
                    # invalid UTF-8, and the document goes to the byte arm only.
                    yield Document(index, f"{path.name}:{lineno}", text.encode("utf-8", errors="surrogatepass"))
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"cannot read {path}: {e}") from None


def _python_roots(stdlib_only: bool) -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]).resolve())]
    if not stdlib_only:
        for key in ("purelib", "platlib"):
            p = Path(paths[key]).resolve()
            if p.is_dir() and all(p != r for _, r in roots):
                roots.append(("site-packages" if key == "purelib" else "platlib", p))
    return roots


def _walk(root: Path, exclude: set[str], follow_links: bool = False) -> Iterator[str]:
    """Relative POSIX paths of the entries under root that are not folders, sorted.

    Folder links are entered only with `follow_links`, and then each real folder once
    (a link to an ancestor would otherwise loop forever).
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        if follow_links:
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            yield (rel / f).as_posix()


def _unreadable_reason(root: Path, path: Path, follow_links: bool) -> str | None:
    """Why a matching entry is not read, or None: only regular files are, and a link only
    when it stays inside the root (or the user allowed links anywhere)."""
    try:
        st = path.stat()
    except OSError:
        return "unreadable"
    if not stat.S_ISREG(st.st_mode):
        return "not_regular_file"
    if not follow_links and not Path(os.path.realpath(path)).is_relative_to(root):
        return "link_outside_source"
    return None
