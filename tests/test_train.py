"""The training loop on real smoke shards: learning, exact resume, checkpoints, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bytelm import checkpoint as ckpt
from bytelm.config import load_config
from bytelm.errors import UserError
from bytelm.fileio import read_jsonl
from bytelm.model import MTPTransformer
from bytelm.paths import config_path
from bytelm.train import train
from tests.killed_training import kill_and_resume

SMOKE = config_path("configs/smoke.yaml")


def cfg_for(smoke_data, *overrides):
    return load_config(SMOKE, [f"data.root={smoke_data}", "tracking.mlflow=false", *overrides])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("tokenizer,head_type,n", [("bytes", "unembed", 4), ("bpe", "transformer", 2)])
def test_loss_falls_on_real_shards(smoke_data, tmp_path, tokenizer, head_type, n):
    cfg = cfg_for(smoke_data, f"data.tokenizer={tokenizer}", f"model.head_type={head_type}", f"model.n_future={n}",
                  "train.steps=40", "train.log_every=5", "train.eval_every=40", "train.batch_size=8", "model.context=128")
    train(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    for i in range(1, n + 1):  # every head learns
        assert steps[-1][f"loss/head_{i}"] < steps[0][f"loss/head_{i}"]
    val = [r for r in rows if "val/bpb" in r][-1]
    assert 0 < val["val/bpb"] < 8 and 0 < val["val/acc/head_1"] <= 1
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


def test_exact_resume_after_sigkill(smoke_data, tmp_path):
    """A run killed with SIGKILL and restarted logs the same losses, step for step, as
    one that was never interrupted (CPU, float32, same seed)."""
    common = [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=30", "train.log_every=1",
              "train.checkpoint_every=5", "train.eval_every=1000", "model.n_future=2", "train.batch_size=8",
              "model.context=128"]
    train(load_config(SMOKE, common), tmp_path / "straight")

    run = tmp_path / "killed"
    kill_and_resume(SMOKE, run, common, after=12, before=30)
    a, b = losses(tmp_path / "straight"), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert a == b  # exact equality, including the steps after the restart


def test_checkpoint_round_trip_restores_every_head(smoke_data, tmp_path):
    cfg = cfg_for(smoke_data, "model.n_future=3", "model.head_type=linear", "train.steps=3", "train.eval_every=3")
    train(cfg, tmp_path / "run")
    model, tok, saved = ckpt.load_model(tmp_path / "run")
    assert saved.model.n_future == 3 and tok.kind == "bytes"
    ref = MTPTransformer(saved.model)
    ckpt.load_weights(ref, ckpt.resolve_checkpoint(tmp_path / "run"))
    for (k, v), (_, w) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(v, w), k
    assert any(k.startswith("heads.maps.2") for k in model.state_dict())

    # a model with one head fewer (or more) must not load silently
    fewer = MTPTransformer(load_config(None, ["model.n_future=2", "model.head_type=linear",
                                              f"model.vocab_size={tok.vocab_size}", "model.d_model=128", "model.context=256"]).model)
    with pytest.raises(UserError, match="heads.maps.2"):
        ckpt.load_weights(fewer, ckpt.resolve_checkpoint(tmp_path / "run"))


def test_corrupted_checkpoint_is_a_clear_error(smoke_data, tmp_path):
    args = [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=2", "train.eval_every=2"]
    train(load_config(SMOKE, args), tmp_path / "run")
    f = ckpt.resolve_checkpoint(tmp_path / "run") / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt.load_model(tmp_path / "run")
    cmd = [sys.executable, "-m", "bytelm", "train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "run")]
    for o in args + ["train.steps=4"]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "corrupt or truncated" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override,key", [("model.head_type=medusa", "model.head_type"), ("model.n_future=0", "model.n_future"),
                                          ("model.n_futur=2", "n_futur"), ("train.steps=abc", "train.steps")])
def test_bad_config_is_one_clear_message(tmp_path, override, key):
    r = subprocess.run([sys.executable, "-m", "bytelm", "train", "--config", str(SMOKE), "--run-dir", str(tmp_path / "r"), "--set", override],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert key in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_resume_continues_the_same_mlflow_run(smoke_data, tmp_path, monkeypatch, mlflow_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    cfg = load_config(SMOKE, [f"data.root={smoke_data}", "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=2"])
    train(cfg, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]
    cfg.train.steps = 8
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"] == first
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first, "loss")] == list(range(1, 9))
    assert run.data.params["model.n_future"] == "1"


def test_two_processes_match_one_with_the_same_global_batch(smoke_data, tmp_path):
    """torchrun with 2 processes (gloo, CPU): each takes half of every global batch and
    gradients are averaged; one process does the same with 2 accumulation steps. The
    data order and the losses match (up to float32 summation order)."""
    common = [f"data.root={smoke_data}", "tracking.mlflow=false", "train.steps=6", "train.log_every=1",
              "train.eval_every=1000", "train.batch_size=8", "train.micro_batch_size=4", "model.n_future=2",
              "model.context=128"]
    train(load_config(SMOKE, common), tmp_path / "one")
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: torchrun takes a free port (a fixed one collides with another test session on the host)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--standalone", "-m", "bytelm", "train",
           "--config", str(SMOKE), "--run-dir", str(tmp_path / "two")]
    for o in common:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
