"""Tracker and `bytelm track import` against a real SQLite MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from bytelm.fileio import read_jsonl
from bytelm.tracking import Tracker, log_to_run, mlflow_uri

CFG = {"model": {"n_future": 8, "head_type": "unembed"}, "train": {"steps": 30, "loss_weights": [1.0] * 8},
       "tracking": {"experiment": "imports", "run_name": "", "mlflow": False}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    # one database per module: creating MLflow's tables takes seconds
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def client(store, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return MlflowClient(store)


def bytelm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm", *args], capture_output=True, text=True, cwd=cwd)


def runs_named(client: MlflowClient, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")


def test_mlflow_uri_default_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert mlflow_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_uri() == "http://127.0.0.1:5000"


def test_tracker_logs_resumes_and_rewinds(tmp_path, client):
    run_dir = tmp_path / "run"
    t = Tracker(run_dir, CFG, experiment="tracker", run_name="bytes-n8", use_mlflow=True, tags={"grid.n": "8"})
    for step in range(0, 50, 10):
        t.log_metrics({"loss": 5.0 - step / 10, "loss/head_1": 0.6}, step)
    t.set_status("killed", step=40)
    first_id = t.run_id

    run = client.get_run(first_id)
    assert run.info.status == "KILLED"
    assert run.info.run_name == "bytes-n8"
    assert run.data.params["model.n_future"] == "8"
    assert run.data.params["train.loss_weights"] == str([1.0] * 8)
    for tag in ("git_commit", "torch_version", "hardware", "run_dir", "grid.n"):
        assert tag in run.data.tags
    assert [m.step for m in client.get_metric_history(first_id, "loss")] == [0, 10, 20, 30, 40]

    # resume from a checkpoint at step 20 with a longer schedule: same run, running again
    t2 = Tracker(run_dir, {**CFG, "train": {**CFG["train"], "steps": 60}}, experiment="tracker",
                 run_name="bytes-n8", use_mlflow=True)
    assert t2.run_id == first_id
    assert client.get_run(first_id).info.status == "RUNNING"
    t2.rewind(20)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 10, 20]
    t2.log_metrics({"loss": 1.5}, 30)
    t2.set_status("finished", step=60)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 10, 20, 30]
    assert json.loads((run_dir / "status.json").read_text()) == {"status": "finished", "error": None, "step": 60}
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "30"  # MLflow keeps a param's first value
    assert len(runs_named(client, "tracker", "bytes-n8")) == 1


def test_tracker_context_marks_failed(tmp_path, client):
    with pytest.raises(RuntimeError):
        with Tracker(tmp_path / "run", CFG, experiment="tracker", run_name="boom", use_mlflow=True) as t:
            t.log_metrics({"loss": 1.0}, 0)
            raise RuntimeError("loss is nan at step 0")
    run = client.get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: loss is nan at step 0"
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def make_offline_run(run_dir: Path) -> None:
    """A run dir as the trainer writes it with tracking.mlflow=false."""
    t = Tracker(run_dir, CFG, experiment="imports", run_name="bpe-n2-transformer-s0", use_mlflow=False,
                tags={"sweep": "offline"})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CFG))
    for step in range(5):
        t.log_metrics({"loss": 3.0 - step * 0.1, "lr": 1e-3}, step)
    t.set_status("finished", step=4)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "humaneval.json").write_text(json.dumps({"pass_at_1": 0.0}))
    (run_dir / "eval" / "passk_problems").mkdir()  # an evaluation's per-problem counts, one folder down
    (run_dir / "eval" / "passk_problems" / "humaneval_t0.8.json").write_text(json.dumps({"task_ids": ["HumanEval/0"]}))
    log_to_run(run_dir, {"pass_at_1/humaneval/best": 0.0, "val/bpb": 2.5}, step=4)


def test_offline_run_dir_then_import_once(tmp_path, client):
    run_dir = tmp_path / "offline"
    make_offline_run(run_dir)
    assert not (run_dir / "mlflow.json").exists()
    assert read_jsonl(run_dir / "eval_metrics.jsonl") == [{"step": 4, "pass_at_1/humaneval/best": 0.0, "val/bpb": 2.5}]

    r = bytelm("track", "import", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "imported as run" in r.stdout
    run_id = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "bpe-n2-transformer-s0"
    assert run.data.params["model.head_type"] == "unembed"
    assert run.data.tags["sweep"] == "offline"
    assert run.data.metrics["val/bpb"] == 2.5
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == pytest.approx([3.0, 2.9, 2.8, 2.7, 2.6])
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/humaneval.json", "eval/passk_problems"]
    assert [a.path for a in client.list_artifacts(run_id, "eval/passk_problems")] == [
        "eval/passk_problems/humaneval_t0.8.json"]

    # a second import is a no-op; an eval row added since is logged once
    log_to_run(run_dir, {"pass_at_10/humaneval/best": 0.1}, step=4)  # reachable now: logged directly
    r = bytelm("track", "import", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "already in MLflow" in r.stdout
    assert len(runs_named(client, "imports", "bpe-n2-transformer-s0")) == 1
    assert len(client.get_metric_history(run_id, "loss")) == 5
    assert len(client.get_metric_history(run_id, "pass_at_10/humaneval/best")) == 1
    assert len(client.get_metric_history(run_id, "val/bpb")) == 1


def test_import_rejects_a_folder_that_is_not_a_run(tmp_path, client):
    r = bytelm("track", "import", str(tmp_path))
    assert r.returncode == 2
    assert "not a run directory" in r.stderr and "Traceback" not in r.stderr
    r = bytelm("track", "import", str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_rewind_drops_a_line_cut_off_by_a_kill(tmp_path):
    t = Tracker(tmp_path / "run", CFG, experiment="x", run_name="r", use_mlflow=False)
    t.log_metrics({"loss": 2.0}, 1)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # SIGKILL in the middle of a write
    t.rewind(1)
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_git_commit_can_be_given_for_a_copy_without_its_own_git(monkeypatch):
    from bytelm.tracking import git_commit

    monkeypatch.delenv("BYTELM_GIT_COMMIT", raising=False)
    assert git_commit().split("-")[0] != "0123abc"
    monkeypatch.setenv("BYTELM_GIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc"


def test_experiments_open_as_training_runs_and_params_are_what_ran(tmp_path, client):
    """The experiment is a model-training one for MLflow 3's UI (one made before gets the
    tag too); a run's params are its config's values: the study's axes and sizes always,
    other keys where they differ from the default, never the eval defaults; runs whose
    configs differ only in the seed share a config_id."""
    from bytelm.config import RunConfig, config_from_dict, flatten, to_dict
    from bytelm.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KEY_PARAMS, get_or_create_experiment

    old = client.create_experiment("made-before")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert get_or_create_experiment(client, "made-before") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    def run(name: str, overrides: dict) -> tuple[dict, object]:
        cfg = to_dict(config_from_dict({"model": {"n_future": 4, "head_type": "unembed"}, **overrides}))
        t = Tracker(tmp_path / name, cfg, experiment="workspace", run_name=name, use_mlflow=True)
        t.set_status("finished")
        return cfg, client.get_run(t.run_id)

    cfg, r0 = run("s0", {"train": {"seed": 0}})
    exp = client.get_experiment_by_name("workspace")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    flat, defaults = flatten(cfg), flatten(to_dict(RunConfig()))
    params = r0.data.params
    assert set(KEY_PARAMS) <= set(params)
    assert {k for k in params if k not in KEY_PARAMS} == {"model.n_future", "model.head_type"} - set(KEY_PARAMS)
    assert all(params[k] == str(flat[k]) for k in params)  # the values that ran
    assert not any(k.startswith(("eval.", "tracking.")) for k in params)
    assert len(params) < len(defaults) / 3
    _, r1 = run("s1", {"train": {"seed": 1}})
    _, r2 = run("long", {"train": {"seed": 0}, "model": {"n_future": 4, "head_type": "unembed", "context": 512}})
    assert r0.data.tags["config_id"] == r1.data.tags["config_id"] != r2.data.tags["config_id"]
    # each run its own colour in MLflow's charts
    assert len({r.data.tags["mlflow.runColor"] for r in (r0, r1, r2)}) == 3
