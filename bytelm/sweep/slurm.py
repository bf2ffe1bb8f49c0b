"""The `slurm` launcher: each stage of each configuration is one Slurm job, and a stage
waits for the one before it (`--dependency=afterok:ID`). Slurm queues, runs and requeues;
the suite only writes and submits sbatch scripts and reads back states.

Why sbatch scripts and not submitit: a stage is a command line (`python -m
bytelm.sweep.job JOB.json`), not a pickled Python function, and a script a user can read
and run by hand (`sbatch DIR/stages/train.sbatch`) is easier to check against a cluster's
rules. submitit reads job states from sacct, which clusters without accounting lack;
here states come from squeue (queued, running, and recently ended jobs) and from the
markers each job writes when it ends, which every cluster has.

Preemption and time limits: a training job is submitted with `--requeue` and
`--signal=B:USR1@<slurm.signal_s>`. On USR1 (its time limit is near) the job passes
SIGTERM to the trainer, which keeps its checkpoints, and requeues itself (`scontrol
requeue $SLURM_JOB_ID`). On preemption or `scontrol requeue` Slurm sends SIGTERM and
requeues the job itself; on scancel it sends SIGTERM and does not, so the job never
requeues itself after SIGTERM. Either way the requeued job resumes from its latest
checkpoint exactly, as after a SIGKILL.

Re-submission is idempotent: a finished stage stays finished, a stage whose job is queued
or running is left alone, and a failed or lost one is submitted again (after a stage
before it, if that one runs again).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from bytelm.errors import UserError
from bytelm.fileio import write_json, write_text
from bytelm.sweep.launcher import ConfigJobs, Launcher, StageJob
from bytelm.sweep.spec import SlurmBlock, StageResources
from bytelm.sweep.stages import distributed
from bytelm.sweep.state import stage_done, stage_state

# squeue's states, by what they mean for a stage
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
        "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "SPECIAL_EXIT", "STOPPED", "PREEMPTED"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def _run(cmd: list[str], what: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} is not on PATH: the slurm launcher needs Slurm's commands (sbatch, squeue, "
                        "scancel, scontrol) on this host; use launcher: local to run here") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: `{' '.join(cmd[:2])}` gave no answer in 60 s; is the Slurm controller up?") from None


def train_command(cmd: list[str], res: StageResources) -> list[str]:
    """A training command in a Slurm job. On one node: torchrun's standalone rendezvous
    for several GPUs. On several: srun starts one torchrun per node, and they meet at the
    job's first node (BYTELM_RDZV_HOST, set by the sbatch script; the job expands the
    ${...} when it runs)."""
    if res.nodes == 1:
        return distributed(cmd, res)
    rdzv = ["--nnodes", str(res.nodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", "${BYTELM_RDZV_HOST}:29500",
            "--rdzv_id", "${SLURM_JOB_ID}"]
    srun = ["srun", f"--nodes={res.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    return [*srun, *distributed(cmd, res, rendezvous=rdzv)]


class SlurmLauncher(Launcher):
    name = "slurm"

    waits = False
    expand_env = True  # train_command's ${...} are the job's own variables

    def train_command(self, cmd: list[str], res: StageResources) -> list[str]:
        return train_command(cmd, res)

    def __init__(self, slurm: SlurmBlock, sweep: str, log=print):
        self.slurm = slurm
        self.sweep = sweep
        self.log = log

    # -- what the cluster has --------------------------------------------------------

    def partitions(self) -> dict[str, dict]:
        r = _run(["scontrol", "show", "partition", "--oneliner"], "reading the cluster's partitions")
        if r.returncode != 0:
            raise UserError(f"scontrol show partition failed: {(r.stderr or r.stdout).strip()}")
        parts = {}
        for line in r.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "PartitionName" in fields:
                parts[fields["PartitionName"]] = fields
        return parts

    def node_gpus(self, partition: str | None) -> int:
        """The most GPUs one node of the partition has (gres gpu:N or gpu:type:N)."""
        cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
        r = _run(cmd, "reading the nodes' GPUs")
        best = 0
        for gres in r.stdout.split():
            for item in gres.split(","):
                parts = item.split("(")[0].split(":")
                if parts[0] == "gpu" and parts[-1].isdigit():
                    best = max(best, int(parts[-1]))
        return best

    def check(self, configs: list[ConfigJobs]) -> None:
        if shutil.which("sbatch") is None:
            raise UserError("sbatch is not on PATH: the slurm launcher needs Slurm's commands on this host "
                            "(or use launcher: local)")
        parts = self.partitions()
        partition = self.slurm.partition or None
        if partition is None and not any(p.get("Default") == "YES" for p in parts.values()):
            raise UserError(f"this cluster has no default partition: set slurm.partition "
                            f"(--set slurm.partition=NAME; partitions: {', '.join(parts) or 'none'})")
        if partition is not None and partition not in parts:
            raise UserError(f"slurm.partition {partition!r} is not a partition of this cluster "
                            f"(partitions: {', '.join(parts) or 'none'})")
        gpus = self.node_gpus(partition)
        for c in configs:
            for s in c.stages:
                if s.resources.gpus > gpus:
                    raise UserError(f"run {c.name}: its {s.stage} stage asks for {s.resources.gpus} GPU(s) per node, and "
                                    f"the nodes of partition {partition or 'default'} have at most {gpus}")
        # every distinct shape of job, tested by Slurm itself before anything is submitted
        seen = set()
        for c in configs:
            for s in c.stages:
                key = (s.resources, s.stage == "train")
                if key in seen:
                    continue
                seen.add(key)
                r = _run(["sbatch", "--test-only"], "sbatch --test-only", stdin=self.script(c, s))
                if r.returncode != 0:
                    msg = " ".join(l.strip() for l in r.stderr.splitlines() if l.strip())
                    raise UserError(f"Slurm refuses run {c.name}'s {s.stage} job: {msg}")

    # -- the scripts --------------------------------------------------------------

    def script(self, c: ConfigJobs, s: StageJob) -> str:
        r, sl = s.resources, self.slurm
        lines = ["#!/bin/bash", f"#SBATCH --job-name={self.sweep}/{c.name}/{s.stage}",
                 f"#SBATCH --output={c.run_dir / 'logs' / (s.stage + '.slurm-%j.out')}", "#SBATCH --open-mode=append",
                 f"#SBATCH --nodes={r.nodes}", "#SBATCH --ntasks-per-node=1", "#SBATCH --kill-on-invalid-dep=yes"]
        if r.cpus:
            lines.append(f"#SBATCH --cpus-per-task={r.cpus}")
        if r.mem:
            lines.append(f"#SBATCH --mem={r.mem}")
        if r.time:
            lines.append(f"#SBATCH --time={r.time}")
        if r.gpus and sl.gres:
            lines.append(f"#SBATCH --gres={sl.gres.format(gpus=r.gpus)}")
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(sl, key):
                lines.append(f"#SBATCH --{key}={getattr(sl, key)}")
        if s.stage == "train":
            lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{sl.signal_s}"]
        lines += [f"#SBATCH {x}" if not x.startswith("#SBATCH") else x for x in sl.sbatch]
        if sl.setup:
            lines += ["", sl.setup.rstrip()]
        if r.nodes > 1:
            lines.append('export BYTELM_RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
        # exec: the job process itself gets Slurm's signals
        lines += ["", f"exec {shlex.join(s.command())}", ""]
        return "\n".join(lines)

    # -- job ids and states ---------------------------------------------------------

    @staticmethod
    def record_path(run_dir: Path, stage: str) -> Path:
        return run_dir / "stages" / f"{stage}.slurm.json"

    def job_id(self, run_dir: Path, stage: str) -> str | None:
        p = self.record_path(run_dir, stage)
        try:
            return json.loads(p.read_text())["job_id"] if p.is_file() else None
        except (ValueError, KeyError):
            return None

    def queue(self) -> dict[str, tuple[str, str]]:
        """job id -> (state, reason) of every job squeue knows (recently ended ones too)."""
        r = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r"], "reading the queue")
        if r.returncode != 0:
            raise UserError(f"squeue failed: {(r.stderr or r.stdout).strip()}")
        out = {}
        for line in r.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                out[parts[0]] = (parts[1], parts[2])
        return out

    def stage_status(self, run_dir: Path, stage: str, queue: dict) -> tuple[str, str | None]:
        """(state, job id): queued or running while Slurm holds the job, else what the
        job's marker says (finished, failed), failed for a job that ended without one."""
        job = self.job_id(run_dir, stage)
        q = queue.get(job) if job else None
        if q and q[0] in LIVE:
            return ("queued" if q[0] in QUEUED else "running"), job
        state = stage_state(run_dir, stage)
        if state in ("finished", "failed") or job is None:
            return state, job
        if q:  # ended without a marker: cancelled, timed out, out of memory, node failure
            return "failed", job
        return ("stopped" if state == "stopped" else "failed"), job

    def states(self, config: ConfigJobs, queue: dict | None = None) -> dict[str, str]:
        queue = self.queue() if queue is None else queue
        return {s.stage: self.stage_status(config.run_dir, s.stage, queue)[0] for s in config.stages}

    # -- submitting -----------------------------------------------------------------

    def submit(self, c: ConfigJobs, s: StageJob, after: str | None) -> str:
        script = self.script(c, s)
        path = c.run_dir / "stages" / f"{s.stage}.sbatch"
        write_text(path, script)
        (c.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{after}"] if after else []) + [str(path)]
        r = _run(cmd, "sbatch")
        if r.returncode != 0:
            raise UserError(f"sbatch refused run {c.name}'s {s.stage} job: {(r.stderr or r.stdout).strip()}")
        job = r.stdout.strip().split(";")[0]
        write_json(self.record_path(c.run_dir, s.stage), {"job_id": job, "submitted": time.time(), "after": after,
                                                          "script": str(path)})
        return job

    def launch(self, configs: list[ConfigJobs]) -> dict[str, dict[str, str]]:
        queue = self.queue()
        out: dict[str, dict[str, str]] = {}
        for c in configs:
            states: dict[str, str] = {}
            after = None  # the job of the stage before, when it is queued, running or new
            for s in c.stages:
                state, job = self.stage_status(c.run_dir, s.stage, queue)
                if state in ("queued", "running"):
                    states[s.stage], after = state, job
                    continue
                if after is None and stage_done(c.run_dir, s.stage):
                    states[s.stage] = "finished"
                    continue
                after = self.submit(c, s, after)
                states[s.stage] = "submitted"
                self.log(f"{c.name}: {s.stage} submitted as Slurm job {after}"
                         + (f" (was {state}{', job ' + job if job else ''})" if state not in ("not run",) else ""))
            out[c.name] = states
        return out

    def cancel(self, configs: list[ConfigJobs]) -> list[str]:
        queue = self.queue()
        ids = []
        for c in configs:
            for s in c.stages:
                job = self.job_id(c.run_dir, s.stage)
                if job and job in queue and queue[job][0] in LIVE:
                    ids.append(job)
        if ids:
            r = _run(["scancel", *ids], "scancel")
            if r.returncode != 0:
                raise UserError(f"scancel failed: {(r.stderr or r.stdout).strip()}")
        return ids

    def live_jobs(self, configs: list[ConfigJobs]) -> list[str]:
        queue = self.queue()
        return [j for c in configs for s in c.stages
                if (j := self.job_id(c.run_dir, s.stage)) and j in queue and queue[j][0] in LIVE]

