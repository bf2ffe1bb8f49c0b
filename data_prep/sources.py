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
- a Hugging Face dataset saved on disk (`Dataset.save_to_disk`: a folder with
  `state.json`; or a `DatasetDict`: `dataset_dict.json`, every split in its listed order);
- `.jsonl`, `.jsonl.gz` or `.jsonl.zst` files, or `.parquet` files: one path or a glob
  (`stack/*.parquet`, `dumps/**/*.jsonl.zst`); the document is the `--text-field` column.

A SPEC may end in `@W` (`stack/*.parquet@0.5`) to weight that source in the mix (see
data_prep/corpus.py). Record sources (JSONL, parquet, HF datasets) carry their other
columns as document metadata, which `--where` filters read.

Units of work are files: documents come out in a fixed order (sources in the order given,
sorted paths, file order), so everything downstream is deterministic whatever the number
of tasks. `fingerprint()` summarises a source's files by path, size and mtime: cheap to
compute, and it changes when an input does, which is what lets `prepare` skip work that
is already done.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bytelm.errors import UserError

PYTHON_GLOBS = ("*.py",)
# Folders of an interpreter's stdlib that are not the stdlib (they are walked, if at all,
# as purelib/platlib).
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
RECORD_KINDS = ("jsonl", "parquet", "hf-disk")


@dataclass(frozen=True)
class Document:
    source: int  # index of the Source it came from
    name: str  # a path or `file:line`, for reports
    data: bytes
    columns: dict = field(default_factory=dict)  # a record's other columns (record sources)


def split_weight(spec: str) -> tuple[str, float]:
    """`SPEC@W` -> (SPEC, W); a SPEC without a weight, or one that exists as written, has weight 1."""
    head, at, tail = spec.rpartition("@")
    if not at or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        w = float(tail)
    except ValueError:
        return spec, 1.0
    if not w >= 0 or w == float("inf"):
        raise UserError(f"source weight must be a number >= 0, got {tail!r} in {spec!r}")
    return head, w


@dataclass
class Source:
    spec: str
    globs: tuple[str, ...] = PYTHON_GLOBS
    text_field: str = "text"
    follow_symlinks: bool = False

    on_corrupt: str = "error"  # a parquet file that cannot be read: error | skip

    def __post_init__(self) -> None:
        self.path_spec, self.weight = split_weight(self.spec)
        if self.path_spec in ("python-env", "python-stdlib"):
            self.kind = self.path_spec
            self.roots = _python_roots(stdlib_only=self.path_spec == "python-stdlib")
            self.globs = PYTHON_GLOBS
            return
        expanded = os.path.expanduser(self.path_spec)
        if any(c in expanded for c in "*?["):
            paths = [Path(p).resolve() for p in sorted(globlib.glob(expanded, recursive=True)) if os.path.isfile(p)]
            if not paths:
                raise UserError(f"source {self.path_spec!r} matches no file")
        else:
            path = Path(expanded)
            if not path.exists():
                raise UserError(
                    f"source {self.path_spec!r} does not exist (expected python-env, a folder, a saved Hugging Face "
                    "dataset, or .jsonl/.jsonl.gz/.jsonl.zst/.parquet files or a glob of them)"
                )
            if path.is_dir():
                if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                    self.kind, self.roots = "hf-disk", [("", path.resolve())]
                else:
                    self.kind, self.roots = "folder", [("", path.resolve())]
                return
            paths = [path.resolve()]
        kinds = {"jsonl" if p.name.endswith(JSONL_SUFFIXES) else "parquet" if p.name.endswith(".parquet") else None for p in paths}
        if None in kinds or len(kinds) > 1:
            raise UserError(
                f"source {self.path_spec!r} is not .jsonl, .jsonl.gz, .jsonl.zst or .parquet files (one kind per source): "
                f"got {', '.join(sorted({p.name for p in paths})[:3])}"
            )
        self.kind, self.roots = kinds.pop(), [("", p) for p in paths]

    def describe(self) -> dict:
        d = {"spec": self.spec, "kind": self.kind, "roots": [str(r) for _, r in self.roots], "weight": self.weight}
        if self.kind in RECORD_KINDS:
            d["text_field"] = self.text_field
        else:
            d["globs"] = list(self.globs)
        return d

    def files(self, skipped: dict | None = None) -> Iterator[tuple[str, Path]]:
        """(document name, path) of every input file, in a fixed order; `skipped` counts
        the matching entries that are not read (not a regular file, a link leaving the root)."""
        if self.kind in ("jsonl", "parquet"):
            for _, path in self.roots:
                yield path.name, path
            return
        if self.kind == "hf-disk":
            yield from _hf_files(self.roots[0][1])
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
        for name, path in self.files(stats):
            yield from self.read_file(index, name, path, stats)

    def read_file(self, index: int, name: str, path: Path, stats: dict) -> Iterator[Document]:
        """The documents of one input file (one unit of work)."""
        if self.kind == "jsonl":
            yield from self._jsonl(index, path, stats)
        elif self.kind in ("parquet", "hf-disk"):
            yield from self._arrow(index, name, path, stats)
        else:
            try:
                data = path.read_bytes()
            except OSError:
                stats["unreadable"] = stats.get("unreadable", 0) + 1
                return
            if not data:
                stats["empty"] = stats.get("empty", 0) + 1
                return
            yield Document(index, name, data)

    def _arrow(self, index: int, name: str, path: Path, stats: dict) -> Iterator[Document]:
        """Parquet and Arrow files, through datatrove's readers (record batches of 1,000 rows)."""
        import pyarrow as pa
        from datatrove.pipeline.readers import IpcReader, ParquetReader

        try:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                schema = pq.read_schema(path)
                reader = ParquetReader(str(path.parent), text_key=self.text_field, id_key="\0")
            else:
                with pa.ipc.open_stream(path) as r:
                    schema = r.schema
                reader = IpcReader(str(path.parent), stream=True, text_key=self.text_field, id_key="\0")
        except (OSError, pa.ArrowException) as e:
            if self.on_corrupt == "skip":
                stats["corrupt_files"] = stats.get("corrupt_files", 0) + 1
                return
            raise UserError(f"cannot read {path}: {e} (--on-corrupt skip skips such files and counts them)") from None
        if self.text_field not in schema.names:
            raise UserError(f"{path} has no column {self.text_field!r} (columns: {', '.join(schema.names)}; choose one with --text-field)")
        self.columns = schema.names
        rows = 0
        docs = reader.read_file(path.name)
        while True:
            try:
                d = next(docs)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:
                if self.on_corrupt == "skip":
                    stats["corrupt_files"] = stats.get("corrupt_files", 0) + 1
                    return
                raise UserError(f"cannot read {path} after {rows} rows: {e} (--on-corrupt skip skips such files and counts them)") from None
            rows += 1
            text = d.text
            data = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
            columns = {k: v for k, v in d.metadata.items() if k != "file_path"}
            yield Document(index, f"{name}:{rows}", data, columns)
        if empty := _empty_rows(path, self.kind, self.text_field, rows):
            stats["empty"] = stats.get("empty", 0) + empty

    def _jsonl(self, index: int, path: Path, stats: dict) -> Iterator[Document]:
        try:
            with _open_jsonl(path) as f:
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
                    columns = {k: v for k, v in record.items() if k != self.text_field}
                    yield Document(index, f"{path.name}:{lineno}", text.encode("utf-8", errors="surrogatepass"), columns)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        except Exception as e:  # zstandard's ZstdError is not an OSError
            if type(e).__module__.startswith("zstandard"):
                raise UserError(f"cannot read {path}: {e}") from None
            raise


def _open_jsonl(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _empty_rows(path: Path, kind: str, text_field: str, docs: int) -> int:
    """Rows whose text is empty or null (datatrove's readers skip them): all rows minus documents."""
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows - docs
    with pa.ipc.open_stream(path) as r:
        return sum(b.num_rows for b in r) - docs


def _hf_files(root: Path) -> Iterator[tuple[str, Path]]:
    """The Arrow files of a dataset saved with `save_to_disk`, in their recorded order."""
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
        for split in splits:
            for name, path in _hf_files(root / split):
                yield f"{split}/{name}", path
        return
    try:
        state = json.loads((root / "state.json").read_text())
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{root} is not a dataset saved with save_to_disk: {root / 'state.json'} unreadable ({e})") from None
    for f in files:
        yield f, root / f


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
