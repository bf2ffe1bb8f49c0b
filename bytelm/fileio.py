"""Reading and writing the suite's files.

An interrupted step never leaves a half-written checkpoint, shard, config or report, and
a command never destroys what it did not make:

- an output *file* may replace only a regular file (not a folder, a link or a device);
- an output *folder* may replace only a folder holding the command's own marker (a file
  it writes inside, e.g. a checkpoint's `state.json`, a shard folder's `meta.json`);
- no output may be one of the command's inputs (`--json` naming the samples file).

Anything else is refused with one line before anything is touched. The temporary beside
the output is named `.<name>.~<pid>@<host>~<random>`, so a later successful write of the
same kind can tell that one was left by a process that died (kill -9) and remove it.

JSONL files (plain or gzipped) are read by `iter_jsonl`/`read_jsonl` alone.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from bytelm.errors import UserError

# .<name>.~<pid>@<host>~<random>; before this naming, temporaries were .<name>.<8 chars of mkdtemp>
_TEMP = re.compile(r"^\.(?P<name>.+)\.~(?P<pid>\d+)@(?P<host>[^~/]+)~[a-z0-9_]+$")
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")


def check_output(path: str | os.PathLike, *, marker: str | None = None, inputs: Iterable = ()) -> Path:
    """Refuses (UserError) an output path that the command may not replace: an input, a
    folder where a file is written, a folder without `marker` where a folder is written,
    a link, a device. Commands call it before their work, and `atomic_path` again before
    the rename. Returns the path."""
    path = Path(path)
    for i in inputs:
        if i is not None and _same(path, Path(i)):
            raise UserError(f"output {path} is also an input of this command; choose another output path")
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    except NotADirectoryError:  # a parent is a file: the mkdir below says so, naming it
        return path
    what = "a folder" if marker else "a file"
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"output {path} is a symbolic link; bytelm writes {what} there only where none exists or "
                        "where it made one; choose another path")
    if marker is None:
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise UserError(f"output {path} exists and is {kind}; bytelm writes a file there and never replaces "
                            "what it did not make; choose another path")
    elif not stat.S_ISDIR(st.st_mode) or not (path / marker).is_file():
        raise UserError(f"output {path} exists and is not a folder bytelm made (no {marker} in it); "
                        "choose another path, or remove it yourself")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, marker: str | None = None, inputs: Iterable = (),
                stale_prefix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`.

    A file by default; a folder (swapped in whole) when `marker` names a file the folder
    holds once written (see `check_output`). After the rename, temporaries left beside it
    by dead processes are removed: those of the same name, or of every name starting
    with `stale_prefix` (checkpoints: "step_")."""
    path = Path(path)
    inputs = list(inputs)
    check_output(path, marker=marker, inputs=inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a component of the path is a file
        raise NotADirectoryError(e.errno, "a parent of the output path is not a folder", str(path)) from None
    prefix = f".{path.name}.~{os.getpid()}@{socket.gethostname()}~"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent)) / path.name
    try:
        try:
            yield tmp
        except OSError as e:  # e.g. ENOSPC from a write: name the output, not the temporary
            if e.filename is None or str(tmp.parent) in str(e.filename):
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise
        if marker is not None and not (tmp / marker).is_file():
            raise RuntimeError(f"{path}: the folder written has no {marker}")
        check_output(path, marker=marker, inputs=inputs)
        if marker is not None and path.is_dir():
            # a folder cannot be renamed onto a non-empty one: move the old one aside first
            old = tmp.parent / ".old"
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    remove_stale_temporaries(path.parent, stale_prefix or path.name, exact=stale_prefix is None)


def remove_stale_temporaries(folder: Path, name: str, exact: bool = True) -> list[Path]:
    """Removes the temporaries in `folder` of outputs named `name` (or starting with it,
    when not `exact`) whose process is dead: made on this host by a pid that no longer
    runs, or of the earlier naming (which no running version of the suite makes).
    Returns what it removed."""
    removed = []
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e.name)
        legacy = m is None and _LEGACY_TEMP.match(e.name)
        match = m or legacy
        if not match or not e.is_dir(follow_symlinks=False):
            continue
        out_name = match.group("name")
        if (out_name != name) if exact else not out_name.startswith(name):
            continue
        if m is not None and (m.group("host") != host or pid_alive(int(m.group("pid")))):
            continue
        try:
            # only what atomic_path puts there: the output's own name (and .old while swapping)
            if not set(os.listdir(e.path)) <= {out_name, ".old"}:
                continue
        except OSError:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_bytes(path: str | os.PathLike, data: bytes, *, inputs: Iterable = ()) -> None:
    with atomic_path(path, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str, *, inputs: Iterable = ()) -> None:
    write_bytes(path, text.encode("utf-8"), inputs=inputs)


def write_json(path: str | os.PathLike, obj: Any, *, inputs: Iterable = ()) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", inputs=inputs)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *, inputs: Iterable = ()) -> None:
    """One JSON value per line. Non-ASCII characters are escaped: a completion may hold a
    lone surrogate, which UTF-8 cannot encode."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows), inputs=inputs)


def iter_jsonl(path: str | os.PathLike, *, appending: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file, `.gz` or plain.

    A missing file, or a line that is not JSON, is a UserError naming the file (and the
    line). `appending`: the file is a log that a process appends to, and may not have
    begun: a missing file has no lines, and a cut-off last line (the process was killed
    while writing it) is dropped."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    bad: tuple[int, str] | None = None  # (line, why) of a line that did not parse
    followed = False  # a non-blank line came after it
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if bad:
                    followed = True
                    break
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    bad = (n, e.msg)
                    continue
                yield n, value
    except FileNotFoundError:
        if appending:
            return
        raise UserError(f"{path} not found") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if bad and (followed or not appending):
        raise UserError(f"{path} line {bad[0]} is not valid JSON: {bad[1]}")


def read_jsonl(path: str | os.PathLike, *, appending: bool = False) -> list[Any]:
    """The values of a JSONL file's non-blank lines (see `iter_jsonl`)."""
    return [value for _, value in iter_jsonl(path, appending=appending)]
