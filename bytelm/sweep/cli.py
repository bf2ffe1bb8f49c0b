"""`bytelm sweep SPEC.yaml`: run a study, a grid of configurations, as MLflow runs
(docs/sweeps.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bytelm.errors import UserError
from bytelm.folderlock import lock_folder
from bytelm.sweep.plan import RunPlan, plan_sweep
from bytelm.sweep.runner import RunResult, SweepRunner
from bytelm.sweep.spec import SweepSpec, load_spec, run_overrides
from bytelm.units import PEAK_FLOPS, human


def cpu_flops_per_s() -> float:
    """fp32 matmul FLOP/s of this machine, measured in about a second."""
    import torch

    a = torch.randn(512, 512)
    torch.mm(a, a)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        torch.mm(a, a)
        reps += 1
    return 2 * 512**3 * reps / (time.perf_counter() - t0)


def print_plan(spec: SweepSpec, plans: list[RunPlan], devices: list[str], out: Path, use_mlflow: bool, uri: str,
               runner: SweepRunner) -> None:
    from tabulate import tabulate

    if devices == ["cpu"]:
        rate, how = cpu_flops_per_s(), "an fp32 matmul measured here (a lower bound: tiny models run below it)"
    else:
        rate, how = 0.4 * PEAK_FLOPS["H200"], f"40% MFU of an H200's {human(PEAK_FLOPS['H200'])}FLOP/s per GPU"
    rows = []
    for p in plans:
        secs = p.train_flops / rate / max(p.resources.gpus * p.resources.nodes, 1) if p.train_flops else None
        rows.append([p.name, p.grid.get("vocab", ""), p.n_future, p.grid.get("head_type", ""), p.steps,
                     p.resources.gpus * p.resources.nodes, human(p.params), human(p.train_bytes, "B"),
                     human(p.train_flops), f"{secs / 60:.1f}" if secs else "?"])
    bases = ", ".join(dict.fromkeys(p.base for p in plans)) or str(spec.base)
    print(f"sweep {spec.name}: {len(plans)} runs of {bases}, stages {', '.join(spec.stages)}, match by {spec.match.by}")
    print(f"output {out}; MLflow {'experiment ' + repr(spec.experiment) + ' at ' + uri if use_mlflow else 'off (run dirs only)'}; "
          f"launcher {spec.launcher}" + (f", devices {', '.join(devices)}" if spec.launcher == "local" else ""))
    print(tabulate(rows, headers=["run", "vocab", "n", "head", "steps", "gpus", "params", "train bytes", "train FLOPs",
                                  "train min"]))
    total = sum(p.train_flops or 0 for p in plans)
    n_dev = len(set(devices))  # a GPU listed twice runs two configurations at once, at no more FLOP/s
    wall = total / rate / 60 / n_dev
    print(f"total training FLOPs {human(total)}; training time about {wall:.1f} min on {n_dev} device(s), "
          f"at {human(rate)}FLOP/s per device from {how}; eval and bench not included")
    if plans:
        print("commands of the first run:")
        for job in runner.config_jobs(plans[0], 1, write=False).stages:
            for cmd in job.commands:
                print("  " + " ".join(cmd[1:] if cmd[1:3] == ["-m", "torch.distributed.run"] else ["bytelm", *cmd[3:]]))


def print_summary(results: list[RunResult], out: Path, waited: bool = True) -> None:
    from tabulate import tabulate

    stages = list(results[0].stages) if results else []
    rows = [[r.name, *[r.stages[s] for s in stages], r.error or ""] for r in results]
    print(tabulate(rows, headers=["run", *stages, "error"]))
    failed = [r for r in results if r.error]
    if waited:
        print(f"{len(results) - len(failed)} of {len(results)} runs ok; summary in {out / 'summary.json'}")
    else:
        n = sum(v == "submitted" for r in results for v in r.stages.values())
        print(f"{n} job(s) submitted now; {len(failed)} run(s) with a failed stage; summary in {out / 'summary.json'}")
    for r in failed:
        print(f"FAILED {r.name}: {r.error} (log: {out / 'runs' / r.name / 'logs'})")


def parse_stages(text: str, spec: SweepSpec) -> list[str]:
    asked = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in asked if x not in spec.stages]
    if bad or not asked:
        raise UserError(f"--stages {text!r}: the spec {spec.name} has the stages {', '.join(spec.stages)}")
    return [x for x in spec.stages if x in asked]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="sweep spec YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--out", type=Path, help="sweep folder (default runs/<spec name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run; slurm.*, resources.* and launcher change the spec")
    p.add_argument("--devices", help="local launcher: cpu, or cuda:0,cuda:1,... (default: the spec's, else auto)")
    p.add_argument("--only", metavar="GLOB", help="run only the configurations whose name matches")
    p.add_argument("--stages", help="run only these of the spec's stages, comma-separated (e.g. train, then eval,bench "
                                    "later: a run stopped at its time limit is evaluated at its last checkpoint)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="local launcher: print each running stage's progress and the sweep's ETA this often (default 30)")
    p.add_argument("--no-mlflow", action="store_true", help="run dirs only; a later sweep run with MLflow imports them")
    p.add_argument("--dry-run", action="store_true", help="check the spec, print the plan (configs, FLOPs, time) and exit")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print each run's stages with their states (and Slurm job ids)")
    what.add_argument("--cancel", action="store_true", help="cancel the study's queued and running Slurm jobs")


def check_mlflow_server(uri: str) -> None:
    """A tracking server must answer before anything starts: jobs on other hosts would
    each fail later, one by one."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except (urllib.error.URLError, OSError) as e:
        why = str(getattr(e, "reason", e))
    raise UserError(f"the MLflow tracking server {uri} is not reachable ({why}): start it (`mlflow server ...`), "
                    "or run with --no-mlflow and bring the run directories in later with `bytelm track import`")


def make_launcher(spec: SweepSpec, devices: list[str] | None):
    if spec.launcher == "slurm":
        from bytelm.sweep.slurm import SlurmLauncher

        return SlurmLauncher(spec.slurm, spec.name, log=_log)
    from bytelm.sweep.local import LocalLauncher

    return LocalLauncher(devices, log=_log)


def print_status(runner: SweepRunner, plans: list[RunPlan]) -> list[list[str]]:
    """Each run's stages with their states (and job ids): the table `--status` prints."""
    from tabulate import tabulate

    launcher = runner.launcher
    configs = [runner.config_jobs(p, 1, write=False) for p in plans]
    queue = launcher.queue() if launcher.name == "slurm" else None
    rows, states = [], {}
    for c in configs:
        row = [c.name]
        states[c.name] = {}
        for s in c.stages:
            if queue is not None:
                state, job = launcher.stage_status(c.run_dir, s.stage, queue)
                row.append(f"{state} ({job})" if job else state)
            else:
                state = launcher.states(c)[s.stage]
                row.append(state)
            states[c.name][s.stage] = state
        rows.append(row)
    print(tabulate(rows, headers=["run", *runner.stages]))
    if queue is not None:
        runner.finish_parent_if_done(states)
    return rows


def main(args: argparse.Namespace) -> int:
    from bytelm.sweep.local import resolve_devices
    from bytelm.sweep.progress import Progress
    from bytelm.tracking import mlflow_uri

    spec = load_spec(args.spec, args.set)
    plans = plan_sweep(spec, run_overrides(args.set), args.only)
    stages = parse_stages(args.stages, spec) if args.stages else None
    out = (args.out or Path("runs") / spec.name).resolve()
    devices = resolve_devices(args.devices or spec.devices) if spec.launcher == "local" else ["slurm"]
    use_mlflow = not args.no_mlflow
    if use_mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            print("bytelm sweep: MLflow is not installed here; running with --no-mlflow", file=sys.stderr)
            use_mlflow = False
    uri = mlflow_uri()
    launcher = make_launcher(spec, devices)
    runner = SweepRunner(spec, plans, out, launcher, use_mlflow, uri if use_mlflow else None, stages, log=_log)
    if args.status:
        print_status(runner, plans)
        return 0
    if args.cancel:
        if spec.launcher != "slurm":
            raise UserError("--cancel stops a study's Slurm jobs; a local sweep stops with its process (Ctrl-C)")
        with lock_folder(out, "bytelm sweep"):
            ids = launcher.cancel([runner.config_jobs(p, 1, write=False) for p in plans])
        print(f"cancelled {len(ids)} Slurm job(s){': ' + ' '.join(ids) if ids else ''}")
        return 0
    runner.check()
    if use_mlflow and not args.dry_run:
        check_mlflow_server(uri)
    if args.dry_run:
        print_plan(spec, plans, devices, out, use_mlflow, uri, runner)
        return 0
    slots = min(len(devices), len(plans))
    where = f"devices {', '.join(devices)}" if spec.launcher == "local" else "Slurm"
    _log(f"sweep {spec.name}: {len(plans)} run(s), stages {', '.join(stages or spec.stages)}, on {where}; output {out}")
    with lock_folder(out, "bytelm sweep"):
        if spec.launcher == "local":
            configs = [runner.config_jobs(p, slots, write=False) for p in plans]
            launcher.progress = Progress(plans, configs, parallel=len(set(devices)))
            launcher.progress_every_s = args.progress_every
        results = runner.run(slots)
    print_summary(results, out, waited=launcher.waits)
    if spec.launcher == "slurm":
        print(f"`bytelm sweep {args.spec} --status` shows their states; `--cancel` cancels them")
    return 1 if any(r.error for r in results) else 0


def _log(line: str) -> None:
    print(line, flush=True)
