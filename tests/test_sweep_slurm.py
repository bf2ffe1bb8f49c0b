"""The slurm launcher on a real one-node Slurm cluster (scripts/slurm_cluster.sh, the
`slurm_cluster` fixture): stages as dependent jobs, the same report as the local
launcher, requeue with exact resume, idempotent re-submission, --cancel, and bad input
that submits nothing. Tiny CPU models; every wait polls states with a generous bound."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bytelm.cli import main as bytelm_main
from bytelm.fileio import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "experiments" / "configs" / "smoke.yaml"
TINY = {"model.n_layers": 3, "model.d_model": 32, "model.n_heads": 2, "model.context": 64, "train.batch_size": 4,
        "train.steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 4, "train.eval_batches": 1,
        "train.checkpoint_every": 4}
WAIT_S = 900  # the longest a test waits for a state: far above what any stage takes, even on a loaded machine
pytestmark = pytest.mark.slow


def write_spec(path: Path, data_root: Path, **fields) -> Path:
    spec = {"name": "t", "experiment": "slurm-test", "base": str(SMOKE_CONFIG),
            "set": {**TINY, "data.root": str(data_root)},
            "grid": {"vocab": {"bytes": {"n": [2], "head_type": "unembed"}}, "seed": [0]},
            "stages": ["train"], "launcher": "slurm", "resources": {"gpus": 0}}
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(spec: Path, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm", "sweep", str(spec), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=out.parent, env=env, timeout=WAIT_S)


def slurm_env(conf: Path, tmp: Path, **more) -> dict:
    return {**os.environ, "SLURM_CONF": str(conf), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", **more}


def wait_for(what: str, predicate, timeout: float = WAIT_S, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def marker(run_dir: Path, stage: str) -> dict:
    p = run_dir / "stages" / f"{stage}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def job_id(run_dir: Path, stage: str) -> str:
    return json.loads((run_dir / "stages" / f"{stage}.slurm.json").read_text())["job_id"]


def live_jobs(env: dict) -> dict[str, str]:
    r = subprocess.run(["squeue", "-h", "-o", "%i|%T"], capture_output=True, text=True, env=env, check=True)
    return dict(line.split("|") for line in r.stdout.split())


def last_row(run_dir: Path) -> dict | None:
    """The last training row of a run's metrics, or None before the first. The run may be
    appending to the file as we read (a cut-off last line is not a row yet)."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl", appending=True) if "loss" in r]
    return rows[-1] if rows else None


def table(report_dir: Path) -> pd.DataFrame:
    """table1.csv without the columns that time things (decoding speed differs run to run)."""
    t = pd.read_csv(report_dir / "table1.csv")
    return t[[c for c in t.columns if "speedup" not in c and "heads" not in c and "bytes_per_s" not in c]]


def test_train_eval_bench_as_dependent_jobs_and_the_same_report_as_local(smoke_data, slurm_cluster, tmp_path,
                                                                         mlflow_store, empty_mlflow_db):
    stages = {"stages": ["train", "eval", "bench"],
              "eval": {"tasks": ["humaneval"], "n_samples": 1, "temperatures": [0.8],
                       "args": ["--max-problems", "1", "--truncate-prompts"]},
              "bench": {"heads": [1, 2], "batch_sizes": [1], "max_new": 4, "args": ["--n-prompts", "1"]}}
    env = slurm_env(slurm_cluster, tmp_path)
    spec = write_spec(tmp_path / "s.yaml", smoke_data, **stages)
    r = sweep(spec, tmp_path / "out", env)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "out" / "runs" / "bytes-n2-unembed-s0"
    ids = {s: job_id(run_dir, s) for s in ("train", "eval", "bench")}
    records = {s: json.loads((run_dir / "stages" / f"{s}.slurm.json").read_text()) for s in ids}
    assert records["train"]["after"] is None and records["eval"]["after"] == ids["train"]
    assert records["bench"]["after"] == ids["eval"]

    # while the cluster runs them, the same spec on the local launcher, into another experiment
    # of its own store (one SQLite file is not written by two sweeps at once): the same tables below
    local_env = slurm_env(slurm_cluster, tmp_path / "local")
    (tmp_path / "local").mkdir()
    shutil.copyfile(empty_mlflow_db, tmp_path / "local" / "mlflow.db")
    local = write_spec(tmp_path / "local" / "s.yaml", smoke_data, **stages, launcher="local", experiment="local-test",
                       devices="cpu")
    r = sweep(local, tmp_path / "local" / "out", local_env)
    assert r.returncode == 0, r.stdout + r.stderr

    def finished():
        states = {s: marker(run_dir, s).get("status") for s in ids}
        assert "failed" not in states.values(), {s: marker(run_dir, s) for s in ids}
        return all(v == "finished" for v in states.values())

    wait_for("the three jobs to finish", finished)
    assert all(marker(run_dir, s)["device"] == f"slurm job {ids[s]}" for s in ids)
    assert (run_dir / "logs" / f"train.slurm-{ids['train']}.out").is_file()
    wait_for("the jobs to leave the queue", lambda: not set(ids.values()) & set(live_jobs(env)))

    # a second sweep submits nothing; --status shows each stage's job and finishes the parent run
    r = sweep(spec, tmp_path / "out", env)
    assert r.returncode == 0 and "submitted as Slurm job" not in r.stdout, r.stdout + r.stderr
    assert {s: job_id(run_dir, s) for s in ids} == ids
    r = sweep(spec, tmp_path / "out", env, "--status")
    assert r.returncode == 0, r.stderr
    assert all(f"finished ({ids[s]})" in r.stdout for s in ids), r.stdout

    for experiment, uri in (("slurm-test", env["MLFLOW_TRACKING_URI"]), ("local-test", local_env["MLFLOW_TRACKING_URI"])):
        with pytest.MonkeyPatch.context() as m, pytest.raises(SystemExit) as e:  # in this process: no start-up again
            m.setenv("MLFLOW_TRACKING_URI", uri)
            bytelm_main(["report", "--experiment", experiment, "--out", str(tmp_path / experiment), "--no-log"])
        assert e.value.code == 0
    a, b = table(tmp_path / "slurm-test"), table(tmp_path / "local-test")
    assert len(a) == 1 and "val/bpb" in a.columns and "pass_at_1/humaneval/best" in a.columns
    pd.testing.assert_frame_equal(a, b)
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("slurm-test").experiment_id])
    parent = next(x for x in runs if x.data.tags.get("sweep_parent") == "true")
    child = next(x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert child.data.params["stage.eval.n_samples"] == "1" and child.data.params["stage.bench.heads"] == "1,2"


def test_a_training_job_interrupted_by_slurm_resumes_to_the_uninterrupted_loss(smoke_data, slurm_cluster, tmp_path):
    """Two identical runs as Slurm jobs; one is told its time limit is near (USR1, as
    `--signal` does) and later requeued (`scontrol requeue`, as preemption does). Each
    time it checkpoints, requeues and resumes; it ends at the other run's loss."""
    env = slurm_env(slurm_cluster, tmp_path)
    steps = {**TINY, "data.root": str(smoke_data), "train.steps": 40, "train.log_every": 1, "train.checkpoint_every": 5,
             "train.eval_every": 1000}
    spec = write_spec(tmp_path / "s.yaml", smoke_data, set=steps, grid={"vocab": ["bytes"], "n": [2], "seed": [0]},
                      include=[{"vocab": "bytes", "n": 2, "seed": 0, "name": "plain"}])
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow")
    assert r.returncode == 0, r.stdout + r.stderr
    hit, plain = tmp_path / "out" / "runs" / "bytes-n2-s0", tmp_path / "out" / "runs" / "plain"
    job = job_id(hit, "train")

    def at_step(n):
        return lambda: (row := last_row(hit)) is not None and row["step"] >= n and live_jobs(env).get(job) == "RUNNING"

    wait_for("training past step 7", at_step(7), every=0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for("the requeued job to resume past step 22", at_step(22), every=0.2)
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    wait_for("both runs to finish", lambda: all(marker(d, "train").get("status") == "finished" for d in (hit, plain)))
    log = (hit / "logs" / "train.log").read_text()
    assert log.count("$ ") >= 3 and "(stopped by signal 10; scontrol requeue" in log  # USR1 = 10
    assert job_id(hit, "train") == job  # the same job, requeued
    assert last_row(hit)["step"] == last_row(plain)["step"] == 40
    assert last_row(hit)["loss"] == pytest.approx(last_row(plain)["loss"], rel=1e-6)


def test_cancel_leaves_no_job(smoke_data, slurm_cluster, tmp_path):
    env = slurm_env(slurm_cluster, tmp_path)
    spec = write_spec(tmp_path / "s.yaml", smoke_data, stages=["train", "bench"],
                      set={**TINY, "data.root": str(smoke_data), "train.steps": 100000, "train.checkpoint_every": 1000})
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "out" / "runs" / "bytes-n2-unembed-s0"
    train, bench = job_id(run_dir, "train"), job_id(run_dir, "bench")
    # cancelled while it trains: the job gets SIGTERM and must not requeue itself
    wait_for("training to log a step", lambda: (run_dir / "metrics.jsonl").is_file())
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow", "--cancel")
    assert r.returncode == 0 and "cancelled 2 Slurm job(s)" in r.stdout, r.stdout + r.stderr
    wait_for("the train job to end", lambda: all_jobs(env).get(train) == "CANCELLED")
    assert all_jobs(env).get(bench) == "CANCELLED" and not {train, bench} & set(live_jobs(env))
    assert "scontrol requeue" not in (run_dir / "logs" / "train.log").read_text()
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow", "--status")
    assert f"failed ({train})" in r.stdout and f"failed ({bench})" in r.stdout, r.stdout
    # submitted again: the failed (cancelled) stages go back in the queue, chained as before
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow")
    assert r.returncode == 0 and "2 job(s) submitted now" in r.stdout, r.stdout + r.stderr
    assert f"train submitted as Slurm job {job_id(run_dir, 'train')} (was failed, job {train})" in r.stdout
    again = {job_id(run_dir, "train"), job_id(run_dir, "bench")}
    assert not again & {train, bench} and again <= set(live_jobs(env))
    r = sweep(spec, tmp_path / "out", env, "--no-mlflow", "--cancel")
    assert r.returncode == 0 and "cancelled 2 Slurm job(s)" in r.stdout, r.stdout + r.stderr
    wait_for("no job left", lambda: not again & set(live_jobs(env)))


def all_jobs(env: dict) -> dict[str, str]:
    """Every job squeue still knows, ended ones too, with its state."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T"], capture_output=True, text=True, env=env, check=True)
    return dict(line.split("|") for line in r.stdout.split())


def test_bad_input_is_one_line_and_submits_nothing(slurm_cluster, tmp_path):
    """No data is prepared: every check comes before planning touches shards, MLflow or
    the queue. Each case ends with one line on stderr, exit 2, and no job."""
    env = slurm_env(slurm_cluster, tmp_path)
    spec = write_spec(tmp_path / "s.yaml", tmp_path / "no-data")
    before = set(live_jobs(env))

    def refused(spec_path, message, *extra, run_env=env):
        r = sweep(spec_path, tmp_path / "out", run_env, *extra)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stdout + r.stderr
        assert not list((tmp_path / "out").glob("runs/*/stages/*.slurm.json"))
        # the worker's cluster may still hold an earlier test's job, which can end meanwhile
        assert set(live_jobs(env)) <= before

    refused(write_spec(tmp_path / "g.yaml", tmp_path / "no-data", resources={"gpus": 2}),
            "asks for 2 GPU(s) per node, and the nodes of partition default have at most 0", "--no-mlflow")
    refused(spec, "slurm.partition 'nope' is not a partition", "--no-mlflow", "--set", "slurm.partition=nope")
    refused(spec, "sbatch is not on PATH", "--no-mlflow", run_env={**env, "PATH": str(tmp_path / "empty")})
    refused(spec, "the MLflow tracking server http://127.0.0.1:9 is not reachable",
            run_env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    partition = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, env=env).stdout.split()[0]
    subprocess.run(["scontrol", "update", f"PartitionName={partition}", "Default=NO"], env=env, check=True)
    try:
        refused(spec, "this cluster has no default partition: set slurm.partition", "--no-mlflow")
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={partition}", "Default=YES"], env=env, check=True)
