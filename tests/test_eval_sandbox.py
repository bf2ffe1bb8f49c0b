"""The sandbox against hostile programs: runaway ones, ones that reach for the host, and
ones that fake a pass. Real subprocesses, real namespaces (this machine runs us as root).

Several tricks are first shown to fool a naive harness (the same code run with `python -c`,
judged by its exit code), so that each test proves the sandbox defeats something real.
"""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from bytelm.evaluation.sandbox import Executor, Job, Limits

SQUARE_TESTS = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n\ncheck(square)\n"
RIGHT = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return 0\n"


def processes_of(uids) -> list[str]:
    """Every process (zombies included) whose real, effective or saved uid is one of
    `uids`, read from /proc/*/status, which a program cannot hide by making itself
    non-dumpable."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if any(int(u) in uids for u in uid_line.split()[1:4]):
            found.append(status.splitlines()[0] + f" pid {name}")
    return found


def naive_passes(solution: str, tests: str) -> bool:
    """What a harness that trusts the exit code of `python -c program` would conclude."""
    return subprocess.run([sys.executable, "-c", solution + "\n" + tests], capture_output=True, timeout=30).returncode == 0


# Programs that should end on their own get a wall clock far beyond what they need even on a
# saturated machine, so that no outcome here depends on the machine's load; the tests of
# timeouts give their jobs a short one of their own.
LONG = 120


@pytest.fixture(scope="module")
def ex():
    with Executor(workers=2, limits=Limits(timeout_s=LONG)) as e:
        assert e.isolation["mode"] == "namespaces", f"the sandbox fell back to process mode: {e.isolation}"
        yield e
        assert processes_of(e.uids) == []


def run(ex, solution, tests="", **kw):
    return ex.map([Job(solution, tests, **kw)])[0]


def test_a_right_program_passes_and_a_wrong_one_fails(ex):
    assert run(ex, RIGHT, SQUARE_TESTS).status == "passed"
    r = run(ex, WRONG, SQUARE_TESTS)
    assert (r.status, r.reason) == ("failed", "AssertionError (tests line 2)")
    r = run(ex, "def square(x) return x\n", SQUARE_TESTS)
    assert r.status == "error" and r.reason.startswith("SyntaxError")
    assert r.network_isolated


def test_runaway_programs_time_out_and_leave_nothing(ex):
    jobs = {
        "busy loop": "while True:\n    pass\n",
        "sleeper": "import time\ntime.sleep(1000)\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "output flood": "while True:\n    print('x' * 100000)\n",
    }
    results = dict(zip(jobs, ex.map([Job(code, timeout_s=2) for code in jobs.values()])))
    for name, r in results.items():
        assert r.status == "timeout", (name, r)
        # ended at its 2 s, not at the fixture's long wall clock (killing takes what it takes)
        assert r.duration_s < LONG / 2, (name, r.duration_s)
    assert len(results["output flood"].stdout) <= ex.limits.output_kb << 10
    assert processes_of(ex.uids) == []
    assert run(ex, RIGHT, SQUARE_TESTS).status == "passed"  # the slots still work


def test_huge_allocations_fail_inside_the_program():
    """Bounded by the memory limit, not the clock: a small limit (filled in moments even on
    a saturated machine) and a wall clock far beyond it."""
    with Executor(workers=1, limits=Limits(timeout_s=LONG, memory_mb=192)) as small:
        r = run(small, "x = bytearray(1 << 40)\n")
        assert (r.status, r.reason.split(" (")[0]) == ("error", "MemoryError")
        r = run(small, "def square(x):\n    return x * x\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))\n")
        assert r.status == "failed" and r.reason.startswith("MemoryError"), r


def test_the_host_file_system_is_untouched(ex, tmp_path):
    victim_dir = Path(tempfile.mkdtemp(prefix="bytelm-victim-", dir="/tmp"))
    var_victim = Path(tempfile.mkstemp(prefix="bytelm-victim-", dir="/var/tmp")[1])
    try:
        os.chmod(victim_dir, 0o777)  # open to everyone: permissions alone would not save it
        victim = victim_dir / "victim.txt"
        for f in (victim, var_victim, tmp_path / "mine.txt"):
            f.write_text("original")
            os.chmod(f, 0o666)
        new = f"bytelm-new-{os.getpid()}"
        attempts = [
            f"open({str(victim)!r}, 'w').write('pwned')", f"os.remove({str(victim)!r})",
            f"shutil.rmtree({str(victim_dir)!r})", f"open({str(var_victim)!r}, 'w').write('pwned')",
            f"os.remove({str(var_victim)!r})", f"open({str(tmp_path / 'mine.txt')!r}, 'w').write('pwned')",
            f"open('/tmp/{new}', 'w').write('x')", f"open('/var/tmp/{new}', 'w').write('x')",
            f"open('/dev/shm/{new}', 'w').write('x')", f"open('/{new}', 'w').write('x')",
        ]
        solution = "import os, shutil\n" + "".join(
            f"try:\n    {a}\nexcept OSError:\n    pass\n" for a in attempts
        ) + "open('own.txt', 'w').write('ok')\n" + RIGHT
        r = run(ex, solution, "assert open('own.txt').read() == 'ok'\n" + SQUARE_TESTS)
        assert r.status == "passed", r  # its own folder is writable
        for f in (victim, var_victim, tmp_path / "mine.txt"):
            assert f.read_text() == "original", f
        for p in (Path("/tmp") / new, Path("/var/tmp") / new, Path("/dev/shm") / new, Path("/") / new):
            assert not p.exists(), p
    finally:
        var_victim.unlink()
        for f in victim_dir.iterdir():
            f.unlink()
        victim_dir.rmdir()


def test_programs_cannot_see_each_others_files(ex):
    assert run(ex, "open('/tmp/left-behind', 'w').write('x')\nopen('here', 'w').write('x')\n").status == "passed"
    for _ in range(ex.workers):  # whichever slot runs it, the tmpfs is empty again
        r = run(ex, "import os\nassert os.listdir('/tmp') == ['work'] and os.listdir('.') == [], os.listdir('/tmp')\n")
        assert r.status == "passed", r


def test_killing_the_parent_or_everything_fails_and_the_harness_survives(ex):
    solution = textwrap.dedent(f"""
        import os, signal
        for target in (os.getppid(), 1, {os.getpid()}, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        os.killpg(0, signal.SIGKILL)
        """)
    r = run(ex, solution + WRONG, SQUARE_TESTS)
    assert r.status == "error" and "SIGKILL" in r.reason, r
    assert run(ex, RIGHT, SQUARE_TESTS).status == "passed"


def test_host_unix_sockets_are_out_of_reach(ex):
    """A network namespace does not cover path sockets: a world-writable one under /run
    was reachable, and the host read what a program sent. The slot's root holds none of
    the host's sockets (nor its other files: this repository is not there)."""
    import socket

    path = Path(f"/run/bytelm-test-{os.getpid()}.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    os.chmod(path, 0o777)
    server.listen(1)
    server.setblocking(False)
    try:
        program = textwrap.dedent(f"""
            import os, socket
            s = socket.socket(socket.AF_UNIX)
            s.connect({str(path)!r})
            s.sendall(b"escaped")
            """)
        r = run(ex, program)
        assert r.status == "error" and "FileNotFoundError" in r.reason, r
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
        r = run(ex, f"import os\nassert not os.path.exists({str(Path(__file__).resolve())!r})\n"
                    "assert sorted(os.listdir('/run')) in (['lock'], ['lock', 'mount']), os.listdir('/run')\n")
        assert r.status == "passed", r
    finally:
        server.close()
        path.unlink()


def test_programs_cannot_make_user_namespaces(ex):
    """unshare(CLONE_NEWUSER) gives a program root's powers over new namespaces, the way
    into most of the kernel's attack surface; in a slot it fails."""
    program = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x10000000) == 0:
            raise SystemExit("made a user namespace")
        assert ctypes.get_errno() in (1, 22, 28), ctypes.get_errno()  # EPERM, EINVAL, ENOSPC
        """)
    r = run(ex, program)
    assert r.status == "passed", r
    assert ex.isolation["no_user_namespaces"]


def test_no_network(ex):
    r = run(ex, "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)\n")
    assert r.status == "error" and "unreachable" in r.reason, r


def test_stdin_is_empty(ex):
    r = run(ex, "x = input()\n")
    assert r.status == "error" and r.reason.startswith("EOFError"), r


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)\n",
    "raise SystemExit\n",
    "exit()\n",
    "import os\nos._exit(0)\n",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)\n",
    "print('passed')\nimport sys\nsys.exit(0)\n",
])
def test_exiting_early_is_not_a_pass(ex, trick):
    assert naive_passes(WRONG + trick, SQUARE_TESTS)  # an exit-code harness is fooled
    r = run(ex, WRONG + trick, SQUARE_TESTS)
    assert r.status == "error", r


def test_closing_stdout_is_neither_a_pass_nor_a_failure_of_the_harness(ex):
    close = "import os, sys\nos.close(1)\nos.close(2)\n"
    assert run(ex, WRONG + close, SQUARE_TESTS).status == "failed"
    assert run(ex, WRONG + close + "sys.exit(0)\n", SQUARE_TESTS).status == "error"
    # the verdict has its own pipe: a right program that closes its output still passes
    assert run(ex, RIGHT + close, SQUARE_TESTS).status == "passed"
    r = run(ex, WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed\\n')\n"
            "    except OSError:\n        pass\n", SQUARE_TESTS)
    assert (r.status, r.reason) == ("error", "the program wrote into the harness's verdict pipe"), r


def test_patching_builtins_or_check_does_not_make_a_pass(ex):
    abs_tests = "def check(candidate):\n    assert abs(candidate(2) - 4) < 1e-9\n    assert abs(candidate(3) - 9) < 1e-9\n\ncheck(square)\n"
    patch_abs = "import builtins\nbuiltins.abs = lambda x: 0\n"
    assert naive_passes(WRONG + patch_abs, abs_tests)
    assert run(ex, WRONG + patch_abs, abs_tests).status == "failed"
    assert run(ex, WRONG + "__builtins__['abs'] = lambda x: 0\n", abs_tests).status == "failed"
    # a `check` of its own is replaced by the tests' definition
    assert run(ex, WRONG + "def check(candidate):\n    pass\n", SQUARE_TESTS).status == "failed"
    r = run(ex, WRONG + "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\n", SQUARE_TESTS)
    assert r.status == "failed"


def test_a_trace_function_cannot_skip_the_asserts(ex):
    tests = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n    return\n\ncheck(square)\n"
    skip = textwrap.dedent("""
        import sys
        def _jump(frame, event, arg):
            if frame.f_code.co_name != "check":
                return None
            def local(frame, event, arg):
                if event == "line" and frame.f_lineno < frame.f_code.co_firstlineno + 3:
                    frame.f_lineno = frame.f_code.co_firstlineno + 3  # straight to `return`
                return local
            return local
        sys.settrace(_jump)
        """)
    assert naive_passes(WRONG + skip, tests)
    assert run(ex, WRONG + skip, tests).status == "failed"


def test_rebinding_the_harness_functions_does_not_forge_the_verdict(ex):
    forge = textwrap.dedent("""
        import os
        _write = os.write
        os.write = lambda fd, data: _write(fd, data.replace(b"failed", b"passed"))
        os._exit = lambda code: None
        exec = eval = compile = None
        """)
    assert run(ex, WRONG + forge, SQUARE_TESTS).status == "failed"


def test_background_processes_do_not_survive_their_program(ex):
    daemon = textwrap.dedent("""
        import ctypes, os, signal, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(4, 0)  # PR_SET_DUMPABLE 0: /proc shows it as root's
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                time.sleep(600)
            os._exit(0)
        """)
    # the daemon holds the output pipes for 600 s: had the harness waited for it, the
    # program would have hit its wall clock (LONG) and be a timeout, not a pass
    r = run(ex, daemon + RIGHT, SQUARE_TESTS)
    assert r.status == "passed", r
    assert processes_of(ex.uids) == []


def test_a_forked_copy_cannot_double_report(ex):
    """The child defines a right solution and reports first; the parent waits for it,
    then fails. Two verdicts on the pipe are an error, never a pass. (A copy that is
    still running when the main process exits is killed before it can report.)"""
    program = ("import os\npid = os.fork()\nif pid == 0:\n" + "".join("    " + l + "\n" for l in RIGHT.splitlines())
               + "else:\n    os.waitpid(pid, 0)\n" + "".join("    " + l + "\n" for l in WRONG.splitlines()))
    r = run(ex, program, SQUARE_TESTS)
    assert r.status == "error" and "more than one verdict" in r.reason, r


def test_stdio_and_call_modes_return_outputs(ex):
    styles = [
        "print(int(input()) * 2)\n",
        "import sys\nprint(int(sys.stdin.buffer.readline()) * 2)\n",
        "print(int(open(0).read()) * 2)\nexit()\n",
        "import os, sys\nos.write(1, str(int(sys.stdin.read()) * 2).encode())\n",
        "import threading\ndef main():\n    print(int(input()) * 2)\nthreading.Thread(target=main).start()\n",
    ]
    for code in styles:
        r = run(ex, code, mode="stdio", inputs=("3\n", "21\n"))
        assert r.status == "passed", (code, r)
        assert [o.strip() for o, _ in r.outputs] == ["6", "42"], (code, r.outputs)
    r = run(ex, "print(1 // int(input()))\n", mode="stdio", inputs=("1\n", "0\n", "2\n"))
    assert r.status == "failed" and r.reason.startswith("ZeroDivisionError") and len(r.outputs) == 2
    r = run(ex, "class Solution:\n    def twice(self, xs):\n        return (xs * 2, len(xs))\n", mode="call",
            fn_name="twice", class_method=True, inputs=([[1, 2]], [[]]))
    assert r.status == "passed" and r.outputs == [("([1, 2, 1, 2], 2)", None), ("([], 0)", None)]


def test_process_mode_is_said_and_still_times_out():
    with Executor(workers=1, limits=Limits(timeout_s=2), isolation="process") as e:
        assert e.isolation["mode"] == "process" and e.isolation["reason"]
        a, b, c = e.map([Job(RIGHT, SQUARE_TESTS), Job(WRONG, SQUARE_TESTS), Job("while True:\n    pass\n")])
    assert (a.status, b.status, c.status) == ("passed", "failed", "timeout")
    assert not a.network_isolated
