"""One writer per folder: a lock that a command holds on its run directory (or a sweep's
output folder) for its whole life, so that two processes never train into, log into or
count the same folder twice.

The lock is an OS file lock (`filelock`) on `FOLDER/.bytelm.lock`: the kernel releases it
when its process dies, however it dies, so a lock left by a dead process never blocks. Its
holder is written beside it (`.bytelm.lock.json`: pid, host, command, start), for the
one-line refusal a second process gets, and to say so when the last holder died without
releasing it (kill -9, a lost node).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from bytelm.errors import UserError
from bytelm.fileio import write_json

LOCK_FILE = ".bytelm.lock"
HOLDER_FILE = ".bytelm.lock.json"


def _holder(folder: Path) -> dict:
    try:
        info = json.loads((folder / HOLDER_FILE).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class FolderLock:
    """A held folder lock; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, folder: Path, lock: FileLock, created: bool):
        self.folder, self._lock, self._created = folder, lock, created

    def release(self) -> None:
        if self._lock.is_locked:
            (self.folder / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()
            if self._created:  # a command that failed before writing anything leaves no folder
                (self.folder / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only when empty

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, command: str) -> FolderLock:
    """Takes the folder's lock (creating the folder) or raises a UserError naming the
    process that holds it. The caller holds it for as long as it writes there; the
    process's end, however it comes, gives it back too."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        h = _holder(folder)
        who = (f"`{h.get('command', 'bytelm')}` (pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
               f"since {h.get('started', '?')})") if h else "another process"
        raise UserError(f"{folder} is in use by {who}: wait for it to finish, or use another folder") from None
    last = _holder(folder)
    if last and last.get("pid") != os.getpid():
        # the holder file outlives its lock only when its process died without releasing it
        print(f"bytelm: {folder}: the lock of `{last.get('command', 'bytelm')}` (pid {last.get('pid')} on host "
              f"{last.get('host')}) was left by a process that ended without releasing it; taking it", file=sys.stderr)
    write_json(folder / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    return FolderLock(folder, lock, created)
