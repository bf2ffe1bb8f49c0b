"""What a user sees in `mlflow ui`: a real MLflow server on loopback, fed by the Tracker
through its HTTP API, and read back with MLflow's client and its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bytelm.tracking import Tracker, log_to_run

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path, mlflow_store):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--backend-store-uri", mlflow_store,
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        proc.wait(timeout=30)
        log.close()


def test_runs_logged_through_a_server_are_visible_to_its_client_and_rest_api(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    cfg = {"data": {"tokenizer": "bytes"}, "model": {"n_future": 8, "head_type": "unembed"}, "train": {"steps": 20}}
    with Tracker(tmp_path / "run", cfg, experiment="smoke", run_name="bytes-n8-unembed-s0", use_mlflow=True,
                 tags={"grid.n": "8", "study": "ablation"}) as t:
        for step in (10, 20):
            t.log_metrics({"loss": 3.0 / step, "val/bpb": 2.0 - step / 100}, step)
        t.set_status("finished", step=20)
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "passk.json").write_text('{"pass_at_1": 0.0}')
    assert log_to_run(tmp_path / "run", {"pass_at_1/humaneval/best": 0.0}, [tmp_path / "run" / "eval" / "passk.json"], step=20)

    client = MlflowClient(server)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["bytes-n8-unembed-s0"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.n_future"] == "8" and run.data.tags["grid.n"] == "8"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/bpb")] == pytest.approx([1.9, 1.8])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/passk.json"]

    # the UI's own REST API
    q = urllib.parse.urlencode({"experiment_name": "smoke"})
    assert get_json(f"{server}/api/2.0/mlflow/experiments/get-by-name?{q}")["experiment"]["experiment_id"] == exp.experiment_id
    body = json.dumps({"experiment_ids": [exp.experiment_id]}).encode()
    req = urllib.request.Request(f"{server}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        rest_run = json.loads(r.read())["runs"][0]
    assert {p["key"]: p["value"] for p in rest_run["data"]["params"]}["model.head_type"] == "unembed"
    assert {m["key"] for m in rest_run["data"]["metrics"]} >= {"loss", "val/bpb", "pass_at_1/humaneval/best"}
    hist = get_json(f"{server}/api/2.0/mlflow/metrics/get-history?" +
                    urllib.parse.urlencode({"run_id": run.info.run_id, "metric_key": "loss"}))
    assert [m["step"] for m in hist["metrics"]] == [10, 20]
