"""The synthetic studies end to end on CPU: `bytelm synth` data, then the smoke sweeps
(`bytelm sweep`: `bytelm train`, the same loop as every study, then `bytelm synth eval`),
with the metrics in the run directories and in a real MLflow store (SQLite in tmp_path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bytelm.fileio import read_jsonl
from bytelm.paths import config_path

pytestmark = pytest.mark.slow


def bytelm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # One torch thread per process: under `pytest -n 2` two threads per process oversubscribe
    # the 2 cores, and small CPU matmuls then spin (measured: a smoke eval 16 s -> 2.4 s).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "bytelm", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"bytelm {' '.join(args)} failed:\n{r.stderr[-3000:]}"
    return r


def bytelm_here(capsys, *args: str) -> tuple[int, str]:
    """`bytelm ARGS` in this process (no interpreter and torch to start again): its exit code
    and stderr. A traceback raises here."""
    from bytelm.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capsys.readouterr().err


def mlflow_metrics(cwd: Path, run_dir: Path) -> dict:
    from mlflow import MlflowClient

    info = json.loads((run_dir / "mlflow.json").read_text())
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}").get_run(info["run_id"]).data.metrics


def run_sweep(cwd: Path, name: str, runs: list[str], *extra: str) -> Path:
    """`bytelm sweep experiments/sweeps/NAME.yaml` (10 steps a run) that ends with `runs`
    trained and evaluated; its sweep folder."""
    bytelm(cwd, "sweep", str(config_path(f"sweeps/{name}.yaml")), "--set", "train.steps=10", *extra)
    summary = json.loads((cwd / "runs" / name / "summary.json").read_text())
    assert [(r["name"], r["stages"]) for r in summary["runs"]] == [
        (run, {"train": "finished", "synth": "finished"}) for run in runs], summary
    return cwd / "runs" / name


def test_poly_smoke_sweep_end_to_end(tmp_path, mlflow_store):
    """In calls, as a GPU machine with a time limit runs it: training stopped by its time limit, the stopped run
    evaluated, then training resumed to the end; the evaluation runs again on the newer
    checkpoint instead of counting as done (else the report would show the accuracies of
    checkpoints short of the end of training). One run of the spec's grid (n1-s0): the
    induction test below runs a spec's whole grid, n = 2 included."""
    bytelm(tmp_path, "synth", "poly", "--out", "data/synth/poly_smoke", "--n-train", "5000", "--test-per-m", "5")
    spec = str(config_path("sweeps/poly_smoke.yaml"))
    bytelm(tmp_path, "sweep", spec, "--only", "n1-s0", "--stages", "train", "--set", "train.steps=10",
           "--set", "train.time_limit_s=1e-6")
    bytelm(tmp_path, "sweep", spec, "--only", "n1-s0", "--stages", "synth")
    stopped = json.loads((tmp_path / "runs/poly_smoke/runs/n1-s0/eval/synth_poly.json").read_text())
    assert stopped["step"] == 1
    sweep = run_sweep(tmp_path, "poly_smoke", ["n1-s0"], "--only", "n1-s0")
    rows = read_jsonl(sweep / "runs/n1-s0/eval_metrics.jsonl")
    assert [r["step"] for r in rows if "poly/acc/m1" in r] == [1, 10]  # evaluated at both checkpoints
    names = {f"poly/acc/m{m}" for m in range(1, 11)} | {"poly/acc_in_domain", "poly/acc_ood"}
    run = sweep / "runs" / "n1-s0"
    out = json.loads((run / "eval" / "synth_poly.json").read_text())
    assert out["step"] == 10 and out["details"]["total"] == {str(m): 5 for m in range(1, 11)}
    assert set(out["metrics"]) == names | {"poly/m_train_max"} and all(0.0 <= out["metrics"][k] <= 1.0 for k in names)
    assert out["metrics"]["poly/m_train_max"] == 5  # the data set's training range (its manifest)
    logged = mlflow_metrics(tmp_path, run)
    assert names <= set(logged) and logged["poly/acc/m1"] == out["metrics"]["poly/acc/m1"]
    assert logged["poly/m_train_max"] == 5


def test_induction_smoke_sweep_end_to_end(tmp_path, mlflow_store, monkeypatch, capsys):
    bytelm(tmp_path, "synth", "induction", "--out", "data/synth/induction_smoke", "--train-copies", "1", "--n-test", "10")
    sweep = run_sweep(tmp_path, "induction_smoke", ["n1-s0", "n2-s0"])
    for run_name in ("n1-s0", "n2-s0"):
        run = sweep / "runs" / run_name
        out = json.loads((run / "eval" / "synth_induction.json").read_text())
        m = out["metrics"]
        assert set(m) == {"induction/acc", "induction/acc_name", "induction/acc_first", "induction/acc_n"}
        assert m["induction/acc_n"] > 10 and 0.0 <= m["induction/acc"] <= 1.0
        assert out["details"]["stories"] == 10 and out["step"] == 10
        assert mlflow_metrics(tmp_path, run)["induction/acc"] == m["induction/acc"]

    # a byte model is scored on the same stories, on bytes 2..len of each name; at every
    # kept checkpoint with --checkpoints all, and at the best (the paper's epoch oracle). The
    # sweep above ran training and evaluation as processes; these run in this one.
    monkeypatch.chdir(tmp_path)
    code, err = bytelm_here(capsys, "train", "--config", str(config_path("configs/induction_smoke.yaml")), "--run-dir",
                            "runs/bytes", "--set", "data.tokenizer=bytes", "--set", "model.context=1024",
                            "--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set", "train.keep_last=2",
                            "--set", "tracking.mlflow=false")
    assert code == 0, err
    code, err = bytelm_here(capsys, "synth", "eval", "--task", "induction", "--checkpoint", "runs/bytes",
                            "--checkpoints", "all", "--json", "b.json")
    assert code == 0, err
    out = json.loads((tmp_path / "b.json").read_text())
    mb = out["metrics"]
    assert set(mb) == {"induction/acc_bytes", "induction/acc_bytes_name", "induction/acc_bytes_first", "induction/acc_bytes_n"}
    assert mb["induction/acc_bytes_n"] > m["induction/acc_n"]  # several bytes per name, one token
    assert out["step"] == 3 and [r["step"] for r in out["by_step"]] == [2, 3] and out["by_step"][-1]["metrics"] == mb
    accs = [r["metrics"]["induction/acc_bytes"] for r in out["by_step"]]
    best = out["by_step"][accs.index(max(accs))]
    assert out["oracle"] == {"metric": "induction/acc_bytes", "step": best["step"], "metrics": best["metrics"]}
    # without MLflow the metrics stay in the run directory, for `bytelm track import`
    rows = read_jsonl(tmp_path / "runs/bytes/eval_metrics.jsonl")
    assert rows[-2] == {"step": 2, **out["by_step"][0]["metrics"]}
    assert rows[-1] == {"step": 3, **mb, **{f"oracle/{k}": v for k, v in best["metrics"].items()}, "oracle/step": best["step"]}
    # a single checkpoint folder has no others to choose from
    code, err = bytelm_here(capsys, "synth", "eval", "--task", "induction", "--checkpoint",
                            "runs/bytes/checkpoints/step_0000003", "--checkpoints", "all")
    assert code == 2 and "--checkpoints all needs a run directory" in err

    # the names are two tokens under the data set's BPE only: a model of another BPE is refused
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "data/synth/induction_smoke", other)
    with open(other / "bpe" / "tokenizer.json", "a") as f:
        f.write("\n")
    code, err = bytelm_here(capsys, "synth", "eval", "--task", "induction", "--checkpoint", str(sweep / "runs" / "n2-s0"),
                            "--data", str(other))
    assert code == 2 and "the model's BPE is not" in err
