"""Sandbox throughput: programs executed per second by `bytelm.evaluation.sandbox.Executor`
against the bare cost of starting as many Python processes, with the same worker count.

Four measurements, each the best of --repeats runs:
- bare start: `python -I -S -c pass` in a subprocess, W at a time (the interpreter and
  flags the sandbox uses): the floor of any one-process-per-program executor;
- sandbox, trivial: an empty program through the sandbox;
- plain, reference programs: the HumanEval and MBPP reference programs (solution + tests)
  as `python -I -S -c program`, unconfined: what the programs themselves cost;
- sandbox, reference programs: the same programs through the sandbox.
The ratios (trivial / bare, reference / plain) are the sandbox's own overhead.

    python benchmarks/exec_bench.py [--workers W] [--n N] [--repeats R] [--json OUT]

Prints a table and writes the numbers, the machine and the date to OUT.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bytelm.evaluation.sandbox import Executor, Job, Limits  # noqa: E402
from bytelm.evaluation.tasks import load_problems  # noqa: E402
from bytelm.fileio import write_json  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def best_rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """(programs per second, seconds) of the fastest of `repeats` runs of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times), min(times)


def plain(argvs: list[list[str]], workers: int) -> None:
    def one(argv):
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, argvs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=0, help="programs at once (0 = every core)")
    ap.add_argument("--n", type=int, default=0, help="programs per trivial measurement (0 = 100 per worker)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", help="the benchmark data folder (default: bytelm.paths.data_dir())")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    python = os.path.realpath(sys.executable)
    problems = load_problems("humaneval", args.data_dir) + load_problems("mbpp", args.data_dir)
    jobs = [p.job(p.reference) for p in problems]
    load_before = os.getloadavg()[0]
    with Executor(workers=args.workers, limits=Limits(timeout_s=30)) as ex:
        w = ex.workers
        n = args.n or 100 * w
        ex.map([Job("pass")] * w)  # warm up: page cache, interpreter files
        bare, bare_s = best_rate(lambda: plain([[python, "-I", "-S", "-c", "pass"]] * n, w), n, args.repeats)
        triv, triv_s = best_rate(lambda: ex.map([Job("pass")] * n), n, args.repeats)
        programs = [[python, "-I", "-S", "-c", j.solution + "\n" + j.tests] for j in jobs]
        plain_ref, plain_ref_s = best_rate(lambda: plain(programs, w), len(jobs), args.repeats)
        results = []
        sand_ref, sand_ref_s = best_rate(lambda: results.append(ex.map(jobs)), len(jobs), args.repeats)
        passed = sum(r.status == "passed" for r in results[-1])
        isolation = ex.isolation
    rows = [
        {"measurement": "bare start: python -I -S -c pass", "programs": n, "seconds": bare_s, "per_s": bare},
        {"measurement": "sandbox, trivial program", "programs": n, "seconds": triv_s, "per_s": triv},
        {"measurement": "plain subprocess, HumanEval+MBPP references", "programs": len(jobs), "seconds": plain_ref_s, "per_s": plain_ref},
        {"measurement": "sandbox, HumanEval+MBPP references", "programs": len(jobs), "seconds": sand_ref_s, "per_s": sand_ref},
    ]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    # other work on the machine skews the numbers: the 1-minute load average around the run
                    "load_average_before": load_before, "load_average_after": os.getloadavg()[0]},
        "workers": w, "repeats": args.repeats, "isolation": isolation, "rows": rows,
        "cost_ratio": {"trivial_vs_bare_start": bare / triv, "references_vs_plain": plain_ref / sand_ref},
        "references_passed": f"{passed}/{len(jobs)}",
    }
    print(tabulate([[r["measurement"], r["programs"], f"{r['seconds']:.2f}", f"{r['per_s']:.1f}"] for r in rows],
                   headers=["measurement", "programs", "best s", "programs/s"]))
    print(f"cost per program, sandbox / unconfined: trivial {report['cost_ratio']['trivial_vs_bare_start']:.2f}x, "
          f"references {report['cost_ratio']['references_vs_plain']:.2f}x  ({w} workers, {isolation['mode']} mode, "
          f"references passed {passed}/{len(jobs)})")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
