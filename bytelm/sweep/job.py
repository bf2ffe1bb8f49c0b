"""One stage of one run, as a launcher starts it: `python -m bytelm.sweep.job JOB.json`.

Every launcher runs a stage through this, so a stage does the same on a laptop and in a
Slurm job: it runs the stage's commands in turn (skipping an evaluation task whose JSON
is there for this checkpoint), appends their output to the stage's log, writes the stage
marker (bytelm/sweep/state.py) and keeps the MLflow child run's status right. Exit codes:
0 finished, 1 failed, 75 training stopped before its last step (run the stage again to
resume; under Slurm the job requeues itself).

Signals: SIGTERM, SIGINT and SIGUSR1 (Slurm's warning before a time limit, see
`--signal` in the sbatch script) are passed on to the running command as SIGTERM (a
trainer keeps its checkpoints); only after USR1 does a Slurm job requeue itself; the
command is also told to die with this process (PR_SET_PDEATHSIG), so a stage never
outlives a killed launcher.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bytelm.sweep.state import evaluated_step, last_error, output_exists, train_status, write_marker

STOPPED = 75  # EX_TEMPFAIL: training stopped early; the next call resumes it
KILL_AFTER_S = 60  # how long a command may take to end after SIGTERM (a checkpoint) before SIGKILL


def die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when the process that started it dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own handler still passes signals on
        pass


def _mlflow_failed(job: dict, run_dir: Path, error: str) -> None:
    """The MLflow child run of a failed stage says FAILED and why; a run whose trainer died
    before making one gets one here."""
    from bytelm.config import load_config, to_dict
    from bytelm.tracking import Tracker, mlflow_client, read_mlflow_json, set_mlflow_status

    m = job["mlflow"]
    info = read_mlflow_json(run_dir)
    if info is not None:
        set_mlflow_status(mlflow_client(info["tracking_uri"]), info["run_id"], "failed", error)
        return
    cfg_dict = to_dict(load_config(m["base"], m["overrides"]))
    cfg_dict["tracking"].update(experiment=m["experiment"], run_name=job["run"], mlflow=True)
    tracker = Tracker(run_dir, cfg_dict, experiment=m["experiment"], run_name=job["run"], use_mlflow=True,
                      tags=m["tags"], parent_run_id=m["parent_run_id"])
    tracker.set_status("failed", error=error)


def _mlflow_finished(job: dict, run_dir: Path) -> None:
    """After a stage that logged into the run (its params too), the run is FINISHED again."""
    from bytelm.tracking import log_new_params, log_to_run, mlflow_client, read_mlflow_json, set_mlflow_status

    if job["stage"] == "train" and job.get("planned"):
        # the planned budget beside what the trainer counted (train/bytes_seen, train/flops)
        log_to_run(run_dir, job["planned"], step=job["planned"]["plan/steps"])
    info = read_mlflow_json(run_dir)
    if info is None:
        return
    client = mlflow_client(info["tracking_uri"])
    if job.get("params"):
        log_new_params(client, info["run_id"], job["params"])
    set_mlflow_status(client, info["run_id"], "finished")


def run_job(job: dict) -> int:
    run_dir, stage = Path(job["run_dir"]), job["stage"]
    log_path = Path(job["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    where = job.get("where") or os.environ.get("SLURM_JOB_ID") and f"slurm job {os.environ['SLURM_JOB_ID']}" or "local"
    proc: list[subprocess.Popen] = []
    signalled: list[int] = []

    def forward(signum, frame):
        signalled.append(signum)
        if proc and proc[0].poll() is None:
            proc[0].send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, forward)
    t0 = time.time()
    step = evaluated_step(run_dir)  # what an evaluation stage reads
    rc = 0
    with open(log_path, "a") as f:
        for cmd in job["commands"]:
            if job.get("expand_env"):
                cmd = [os.path.expandvars(a) for a in cmd]
            if signalled:
                break
            if output_exists(cmd, step):  # done by an earlier, interrupted call of this stage
                f.write(f"\n(done: {cmd[cmd.index('--json') + 1]}) {' '.join(cmd)}\n")
                continue
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc[:] = [subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **job.get("env", {})},
                                        preexec_fn=die_with_parent)]
            while True:
                try:
                    rc = proc[0].wait(timeout=KILL_AFTER_S if signalled else None)
                    break
                except subprocess.TimeoutExpired:
                    proc[0].kill()
            if rc != 0:
                break
    seconds = time.time() - t0
    use_mlflow = job.get("mlflow") is not None
    status = train_status(run_dir)
    if stage == "train" and status != "finished" and (signalled or (rc != 0 and status in ("stopped", "killed", "running"))):
        # stopped by a signal (however the trainer ended), or killed mid-run: its checkpoint resumes it
        return _stopped(job, run_dir, signalled)
    if signalled and rc == 0 and stage != "train":
        return _stopped(job, run_dir, signalled)  # cut short between commands: the next call goes on
    if rc != 0:
        error = f"{stage} exited with {rc}: {last_error(log_path)}"
        if signalled:
            error = f"{stage} stopped by signal {signalled[0]}: {last_error(log_path)}"
        write_marker(run_dir, stage, "failed", step=step, seconds=seconds, where=where, error=error)
        if use_mlflow:
            _mlflow_failed(job, run_dir, error)
        print(error, file=sys.stderr)
        return 1
    if stage == "train" and train_status(run_dir) != "finished":
        return _stopped(job, run_dir, signalled)  # the trainer's train.time_limit_s ended it early
    write_marker(run_dir, stage, "finished", step=evaluated_step(run_dir), seconds=seconds, where=where)
    if use_mlflow:
        _mlflow_finished(job, run_dir)
    elif stage == "train" and job.get("planned"):
        from bytelm.tracking import log_to_run

        log_to_run(run_dir, job["planned"], step=job["planned"]["plan/steps"])
    return 0


def _stopped(job: dict, run_dir: Path, signalled: list[int]) -> int:
    """Training (or a stage) stopped before its end, its checkpoint kept. Under Slurm a job
    that stopped on its own (the trainer's train.time_limit_s) or on USR1 (the warning
    before the job's time limit) puts itself back in the queue, where it resumes. After
    SIGTERM it does not: Slurm sends that both to cancel a job (scancel) and to preempt or
    requeue one, and in the second case Slurm requeues the job itself. Elsewhere the next
    sweep call resumes it."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id and job.get("requeue") and not set(signalled) & {signal.SIGTERM, signal.SIGINT}:
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        with open(job["log"], "a") as f:
            f.write(f"\n(stopped{' by signal ' + str(signalled[0]) if signalled else ''}; "
                    f"scontrol requeue {job_id}: {(r.stdout + r.stderr).strip() or 'ok'})\n")
    return STOPPED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
