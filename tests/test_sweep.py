"""The sweep runner: grid expansion, matching, the plan, and a real CPU sweep of tiny
models in MLflow (parent and child runs, a failing configuration, a re-run that skips
finished work)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bytelm.errors import UserError
from experiments.sweep import _device_env, expand_grid, load_spec, plan_sweep, resolve_devices

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "experiments" / "configs" / "smoke.yaml"
# a model small enough that a trainer subprocess is mostly its start-up
TINY = {"model.n_layers": 3, "model.d_model": 32, "model.n_heads": 2, "model.context": 64, "train.batch_size": 4,
        "train.steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 4, "train.eval_batches": 1,
        "train.checkpoint_every": 4}


def write_spec(path: Path, **fields) -> Path:
    spec = {"name": "t", "experiment": "sweep-test", "base": str(SMOKE_CONFIG), "set": dict(TINY),
            "grid": {"vocab": {"bytes": {"n": [1, 4], "head_type": "unembed"},
                               "bpe": {"n": [1, 2], "head_type": "transformer"}},
                     "seed": [0]},
            "stages": ["train"], "devices": "cpu"}
    spec.update(fields)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expands_per_vocabulary_n_lists_and_named_choices():
    combos = expand_grid({"vocab": {"bytes": {"n": [1, 8, 16, 32]}, "bpe": {"n": [1, 2]}},
                          "size": {"small": {"set": {"model.d_model": 64}}, "big": {"set": {"model.d_model": 128}}},
                          "seed": [0, 1]})
    assert len(combos) == (4 + 2) * 2 * 2
    values, overrides = combos[0]
    assert values == {"vocab": "bytes", "n": 1, "size": "small", "seed": 0}
    assert overrides == {"data.tokenizer": "bytes", "model.n_future": 1, "model.d_model": 64, "train.seed": 0}
    assert {v["n"] for v, _ in combos if v["vocab"] == "bpe"} == {1, 2}
    with pytest.raises(UserError, match="axis 'size' is neither"):
        expand_grid({"size": ["small"]})


def test_spec_names_runs_and_refuses_mistakes(tmp_path):
    plans = plan_sweep(load_spec(write_spec(tmp_path / "s.yaml")), [f"data.root={tmp_path}/none"])
    assert [p.name for p in plans] == ["bytes-n1-unembed-s0", "bytes-n4-unembed-s0",
                                       "bpe-n1-transformer-s0", "bpe-n2-transformer-s0"]
    assert "model.n_future=4" in plans[1].overrides and plans[1].n_future == 4
    with pytest.raises(UserError, match="unknown key"):
        load_spec(write_spec(tmp_path / "s.yaml", sweeps=1))
    with pytest.raises(UserError, match="not unique"):
        plan_sweep(load_spec(write_spec(tmp_path / "s.yaml", grid={"n": [1, 2]}, run_name="same")))
    with pytest.raises(UserError, match="sweep run bytes-n4-transformer-s0: config key 'model.n_future'"):
        # 4 transformer heads on a 3-block model leave no trunk: caught before anything runs
        plan_sweep(load_spec(write_spec(tmp_path / "s.yaml", grid={"vocab": ["bytes"], "n": [4],
                                                                    "head_type": "transformer", "seed": [0]})))


def test_devices_one_gpu_per_run(monkeypatch):
    assert resolve_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(UserError, match="not cpu or cuda:N"):
        resolve_devices("gpu0")
    assert _device_env("cpu") == {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _device_env("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # cuda:i counts within what the sweep sees
    assert _device_env("cuda:1") == {"CUDA_VISIBLE_DEVICES": "5"}


@pytest.mark.parametrize("by", ["bytes", "flops"])
def test_match_sets_steps_for_equal_bytes_or_flops(smoke_data, tmp_path, by):
    spec = load_spec(write_spec(tmp_path / "s.yaml", match={"by": by, "reference": {"vocab": "bytes", "n": 1}}))
    plans = {p.name: p for p in plan_sweep(spec, [f"data.root={smoke_data}", "train.steps=40"])}
    ref = plans["bytes-n1-unembed-s0"]
    assert ref.steps == 40
    meta = json.loads((smoke_data / "bpe" / "train" / "meta.json").read_text())
    for p in plans.values():
        per_step = p.tokens_per_step * (p.bytes_per_token if by == "bytes" else p.flops_per_token)
        ref_per_step = ref.tokens_per_step * (ref.bytes_per_token if by == "bytes" else ref.flops_per_token)
        assert p.steps == math.ceil(40 * ref_per_step / per_step)
        assert p.train_bytes == pytest.approx(p.steps * p.tokens_per_step * p.bytes_per_token)
    bpe = plans["bpe-n1-transformer-s0"]
    assert bpe.bytes_per_token == pytest.approx(meta["n_text_bytes"] / meta["n_tokens"])
    if by == "bytes":  # a BPE token holds ~3 bytes: a third of the steps
        assert bpe.steps < ref.steps / 2
    else:  # more heads cost more per token: fewer steps
        assert plans["bytes-n4-unembed-s0"].steps < ref.steps


def test_dry_run_prints_the_plan(smoke_data, tmp_path):
    spec = write_spec(tmp_path / "s.yaml")
    r = subprocess.run([sys.executable, "-m", "bytelm", "sweep", str(spec), "--dry-run", "--set", f"data.root={smoke_data}"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert r.returncode == 0, r.stderr
    assert "4 runs" in r.stdout and "bpe-n2-transformer-s0" in r.stdout and "total training FLOPs" in r.stdout
    assert "bytelm train --config" in r.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()  # nothing ran, nothing logged


def run_sweep(spec: Path, cwd: Path, uri: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm", "sweep", str(spec), "--out", str(cwd / "out"), *extra],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


@pytest.mark.slow
def test_cpu_sweep_in_mlflow_with_a_failing_run_and_a_rerun(smoke_data, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = write_spec(
        tmp_path / "s.yaml", match={"by": "bytes", "reference": {"vocab": "bytes", "n": 1}},
        grid={"vocab": {"bytes": {"n": [1, 4], "head_type": "unembed"}, "bpe": {"n": [2], "head_type": "transformer"}},
              "seed": [0]},
        include=[{"vocab": "bytes", "n": 2, "head_type": "linear", "name": "broken",
                  "set": {"model.vocab_size": 100}}],  # smaller than the byte vocabulary: the trainer refuses
        stages=["train", "eval", "bench"],
        # every stage for real, at the smallest size that still runs it
        eval={"tasks": ["humaneval"], "n_samples": 1, "temperatures": [0.8], "args": ["--max-problems", "1"]},
        bench={"heads": [1, 2, 4], "batch_sizes": [1], "max_new": 4, "args": ["--n-prompts", "1"]},
    )
    r = run_sweep(spec, tmp_path, uri, "--set", f"data.root={smoke_data}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "3 of 4 runs ok" in r.stdout
    assert "FAILED broken: train exited with 2" in r.stdout and "vocab_size" in r.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if x.data.tags.get("sweep_parent") == "true")
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 5 and set(children) == {"bytes-n1-unembed-s0", "bytes-n4-unembed-s0", "bpe-n2-transformer-s0",
                                                "broken"}
    ok = children["bpe-n2-transformer-s0"]
    assert ok.info.status == "FINISHED"
    assert ok.data.tags["grid.vocab"] == "bpe" and ok.data.tags["grid.n"] == "2" and ok.data.tags["study"] == "ablation"
    assert ok.data.params["model.n_future"] == "2" and ok.data.params["model.head_type"] == "transformer"
    # bytes matched: the BPE runs take fewer steps, and both the plan and the count are logged
    assert int(ok.data.params["train.steps"]) < 4
    assert ok.data.metrics["plan/train_bytes"] == pytest.approx(ok.data.metrics["train/bytes_seen"], rel=0.25)
    assert "train/flops" in ok.data.metrics and "plan/train_flops" in ok.data.metrics
    # the eval and bench stages logged into the same child run
    assert "pass_at_1/humaneval/best" in ok.data.metrics and ok.data.metrics["eval/n_samples"] == 1
    assert {"spec/code/b1/k1/speedup", "spec/code/b1/k2/speedup"} <= set(ok.data.metrics)
    assert "spec/code/b1/k4/speedup" in children["bytes-n4-unembed-s0"].data.metrics
    broken = children["broken"]
    assert broken.info.status == "FAILED" and "vocab_size" in broken.data.tags["error"]
    assert parent.info.status == "FAILED" and "broken" in parent.data.tags["error"]

    # an interrupted run: its train stage must run again (the trainer resumes it)
    run_dir = tmp_path / "out" / "runs" / "bytes-n4-unembed-s0"
    (run_dir / "stages" / "train.json").unlink()
    (run_dir / "status.json").write_text(json.dumps({"status": "killed", "error": None, "step": 4}))
    # an eval stage cut short after its tasks' JSON was written: the task does not run again
    bpe_dir = tmp_path / "out" / "runs" / "bpe-n2-transformer-s0"
    (bpe_dir / "stages" / "eval.json").unlink()
    written = (bpe_dir / "eval" / "humaneval.json").stat().st_mtime_ns
    r = run_sweep(spec, tmp_path, uri, "--set", f"data.root={smoke_data}")
    assert r.returncode == 1
    assert (bpe_dir / "eval" / "humaneval.json").stat().st_mtime_ns == written
    assert f"(done: {bpe_dir / 'eval' / 'humaneval.json'})" in (bpe_dir / "logs" / "eval.log").read_text()
    summary = {x["name"]: x for x in json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]}
    assert summary["bpe-n2-transformer-s0"]["stages"]["eval"] == "finished"
    assert summary["bytes-n1-unembed-s0"]["stages"] == {"train": "skipped", "eval": "skipped", "bench": "skipped"}
    assert summary["bytes-n4-unembed-s0"]["stages"] == {"train": "finished", "eval": "skipped", "bench": "skipped"}
    assert summary["broken"]["stages"] == {"train": "failed", "eval": "not run", "bench": "not run"}
    runs_after = client.search_runs([exp.experiment_id])
    assert sorted(x.info.run_id for x in runs_after) == sorted(x.info.run_id for x in runs)  # no duplicates
    resumed = client.get_run(children["bytes-n4-unembed-s0"].info.run_id)
    assert resumed.info.status == "FINISHED"


@pytest.mark.slow
def test_offline_sweep_then_one_import_of_the_whole_folder(smoke_data, tmp_path):
    """Where MLflow is absent (the GPU machine), a sweep writes run dirs only; `bytelm
    track import` of its folder later makes the parent and child runs, once. The sweep
    ran in two parts (`--only`, as the GPU scripts benchmark one run at a time): its
    plan.json and summary.json keep both, so the one import brings both."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = write_spec(tmp_path / "s.yaml")
    for only in ("bytes-n1*", "bpe-n1*"):
        r = run_sweep(spec, tmp_path, uri, "--set", f"data.root={smoke_data}", "--no-mlflow", "--only", only)
        assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "mlflow.db").exists()
    run_dir = tmp_path / "out" / "runs" / "bytes-n1-unembed-s0"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert not (run_dir / "mlflow.json").exists()
    names = ["bytes-n1-unembed-s0", "bpe-n1-transformer-s0"]
    for part in ("plan", "summary"):
        assert [x["name"] for x in json.loads((tmp_path / "out" / f"{part}.json").read_text())["runs"]] == names

    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "bytelm", "track", "import", str(tmp_path / "out")],
                           capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        assert r.returncode == 0, r.stderr
    assert r.stdout.count("already in MLflow") == 2
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep-test").experiment_id])
    parent = next(x for x in runs if x.data.tags.get("sweep_parent") == "true")
    assert parent.info.run_name == "t" and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.n_runs"] == "4"  # the spec's runs, not this part's
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and sorted(x.info.run_name for x in children) == sorted(names)
    child = next(x for x in children if x.info.run_name == names[0])
    assert child.info.status == "FINISHED" and child.data.tags["grid.vocab"] == "bytes"
    assert "val/bpb" in child.data.metrics and "plan/steps" in child.data.metrics


def test_stages_in_separate_calls_and_a_bench_per_prompt_set(smoke_data, tmp_path):
    """`--stages train` then `--stages bench`, as a GPU session splits a study into calls;
    the bench stage runs once per prompt set. An untrained run is left alone."""
    spec = write_spec(tmp_path / "s.yaml", stages=["train", "bench"],
                      bench={"heads": [1, 4], "batch_sizes": [2], "prompts": ["code", "stories"],
                             "args": ["--n-prompts", "2", "--max-new", "4", "--prompt-len", "16"]})
    base, uri = ["--set", f"data.root={smoke_data}", "--no-mlflow"], f"sqlite:///{tmp_path / 'unused.db'}"
    r = run_sweep(spec, tmp_path, uri, *base, "--only", "bytes-n4*", "--stages", "bench")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "not trained yet" in r.stdout + r.stderr
    run_dir = tmp_path / "out" / "runs" / "bytes-n4-unembed-s0"
    assert not (run_dir / "bench").exists()

    r = run_sweep(spec, tmp_path, uri, *base, "--only", "bytes-n4*", "--stages", "train")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run_dir / "stages" / "train.json").is_file() and not (run_dir / "bench").exists()
    r = run_sweep(spec, tmp_path, uri, *base, "--only", "bytes-n4*", "--stages", "bench")
    assert r.returncode == 0, r.stdout + r.stderr
    for prompts in ("code", "stories"):
        rows = json.loads((run_dir / "bench" / f"decode_{prompts}_cpu_float32.json").read_text())["rows"]
        assert [(x["heads_used"], x["batch_size"]) for x in rows] == [(1, 2), (4, 2)]
        assert all(x["mismatched_sequences"] == 0 for x in rows)
    assert json.loads((run_dir / "stages" / "bench.json").read_text())["status"] == "finished"
    # the summary keeps what each call did: train from the first, bench from the second
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"]
    assert [(x["name"], x["stages"], x["error"]) for x in summary] == [
        ("bytes-n4-unembed-s0", {"train": "finished", "bench": "finished"}, None)]
    r = run_sweep(spec, tmp_path, uri, *base, "--only", "bytes-n4*", "--stages", "eval")
    assert r.returncode == 2 and "the spec t has the stages train, bench" in r.stderr


def test_concurrent_evaluations_share_the_cores(tmp_path, monkeypatch):
    """With several configurations at once, each evaluation's sandbox takes its share of
    the cores (a flag of the spec's own wins)."""
    from experiments.sweep import stage_commands

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "eval"], eval={"tasks": ["humaneval", "mbpp"]}))
    plan = plan_sweep(spec)[0]
    alone = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False)["eval"]
    shared = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False, slots=3)["eval"]
    # one command per task, each with its own JSON (a stage cut short keeps the tasks it finished)
    assert [(c[c.index("--task") + 1], Path(c[c.index("--json") + 1]).name) for c in shared] == [
        ("humaneval", "humaneval.json"), ("mbpp", "mbpp.json")]
    assert all("--workers" not in c for c in alone) and all(c[c.index("--workers") + 1] == "10" for c in shared)
    spec.eval["args"] = ["--workers", "4"]
    own = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False, slots=3)["eval"][0]
    assert own.count("--workers") == 1 and own[own.index("--workers") + 1] == "4"


def test_bench_commands_cut_heads_to_the_model(tmp_path):
    """Without a heads list, decode-bench picks 1, 2, 4, ..., n; an n = 1 model (which
    decode-bench would refuse to speculate with) measures plain decoding alone."""
    from experiments.sweep import stage_commands

    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "bench"], bench={"batch_sizes": [1, 16]},
                                grid={"vocab": {"bytes": {"n": [1, 8], "head_type": "unembed"}}, "seed": [0]}))
    heads = {}
    for plan in plan_sweep(spec):
        (cmd,) = stage_commands(spec, plan, tmp_path / plan.name, parent_run_id=None, use_mlflow=False)["bench"]
        heads[plan.n_future] = cmd[cmd.index("--heads") + 1] if "--heads" in cmd else None
    assert heads == {1: "1", 8: None}


def test_the_main_study_spec_plans_its_runs_and_second_seeds(smoke_data):
    """experiments/sweeps/main_h200x2.yaml: nine seed-0 runs matched on bytes, and the
    second seed (its `include`, YAML anchors for each arm's settings) of the four runs
    that decide a finding, selected alone with --only '*-s1'."""
    spec = load_spec(REPO / "experiments" / "sweeps" / "main_h200x2.yaml")
    plans = plan_sweep(spec, [f"data.root={smoke_data}"])
    assert len(plans) == 13 and len({p.train_bytes for p in plans}) == 2  # one per arm (steps round up)
    seconds = plan_sweep(spec, [f"data.root={smoke_data}"], only="*-s1")
    assert [p.name for p in seconds] == ["bytes-n1-unembed-s1", "bytes-n8-unembed-s1", "bpe-n1-transformer-s1",
                                         "bpe-n4-transformer-s1"]
    first = {p.name: p for p in plans}
    for p in seconds:  # the same configuration as its seed-0 twin but for the seed
        twin = first[p.name[:-1] + "0"]
        assert [o for o in p.overrides if not o.startswith("train.seed=")] == \
            [o for o in twin.overrides if not o.startswith("train.seed=")] and "train.seed=1" in p.overrides
