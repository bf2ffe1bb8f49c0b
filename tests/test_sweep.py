"""The sweep runner: grid expansion, matching, the plan, and a real CPU sweep of tiny
models in MLflow (parent and child runs, a failing configuration, a re-run that skips
finished work)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bytelm.cli import main as bytelm_main
from bytelm.errors import UserError
from bytelm.fileio import read_jsonl
from bytelm.paths import config_path
from bytelm.sweep.local import device_env, resolve_devices
from bytelm.sweep.plan import plan_sweep
from bytelm.sweep.spec import expand_grid, load_spec
from bytelm.sweep.stages import stage_commands, stage_params

SMOKE_CONFIG = config_path("configs/smoke.yaml")
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


def test_mtp_options_are_grid_axes(tmp_path):
    """head_type and mtp_schedule (train.mtp_schedule.kind) are axes like n; a schedule's
    choices can carry its other settings."""
    combos = expand_grid({"head_type": ["unembed", "sequential"],
                          "mtp_schedule": {"constant": {}, "forward": {"set": {"train.mtp_schedule.share": 0.5}}}})
    assert [v for v, _ in combos] == [{"head_type": h, "mtp_schedule": s} for h in ("unembed", "sequential")
                                      for s in ("constant", "forward")]
    assert combos[1][1] == {"model.head_type": "unembed", "train.mtp_schedule.kind": "forward", "train.mtp_schedule.share": 0.5}
    grid = {"vocab": ["bytes"], "n": [4], "head_type": "unembed", "mtp_schedule": ["constant", "reverse"], "seed": [0]}
    plans = plan_sweep(load_spec(write_spec(tmp_path / "s.yaml", grid=grid)), [f"data.root={tmp_path}/none"])
    assert [p.name for p in plans] == ["bytes-n4-unembed-constant-s0", "bytes-n4-unembed-reverse-s0"]
    assert "train.mtp_schedule.kind=reverse" in plans[1].overrides


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
    assert device_env(["cpu"]) == {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_env(["cuda:3"]) == {"CUDA_VISIBLE_DEVICES": "3"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # cuda:i counts within what the sweep sees
    assert device_env(["cuda:1"]) == {"CUDA_VISIBLE_DEVICES": "5"}
    assert device_env(["cuda:0", "cuda:1"]) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(UserError, match="holds 2 GPU"):
        resolve_devices("cuda:2")


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
def test_cpu_sweep_in_mlflow_with_a_failing_run_and_a_rerun(smoke_data, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    uri = mlflow_store
    spec = write_spec(  # one run per vocabulary (the byte run is the match's reference), and one that fails
        tmp_path / "s.yaml", match={"by": "bytes", "reference": {"vocab": "bytes", "n": 4}},
        grid={"vocab": {"bytes": {"n": [4], "head_type": "unembed"}, "bpe": {"n": [2], "head_type": "transformer"}},
              "seed": [0]},
        include=[{"vocab": "bytes", "n": 2, "head_type": "linear", "name": "broken",
                  "set": {"model.vocab_size": 100}}],  # smaller than the byte vocabulary: the trainer refuses
        stages=["train", "eval", "bench"],
        # every stage for real, at the smallest size that still runs it
        eval={"tasks": ["humaneval"], "n_samples": 1, "temperatures": [0.8],
                       "args": ["--max-problems", "1", "--truncate-prompts"]},
        bench={"heads": [1, 2, 4], "batch_sizes": [1], "max_new": 4, "args": ["--n-prompts", "1"]},
    )
    r = run_sweep(spec, tmp_path, uri, "--set", f"data.root={smoke_data}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 of 3 runs ok" in r.stdout
    assert "FAILED broken: train exited with 2" in r.stdout and "vocab_size" in r.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parent = next(x for x in runs if x.data.tags.get("sweep_parent") == "true")
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 4 and set(children) == {"bytes-n4-unembed-s0", "bpe-n2-transformer-s0", "broken"}
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
    assert summary["bpe-n2-transformer-s0"]["stages"] == {"train": "skipped", "eval": "finished", "bench": "skipped"}
    assert summary["bytes-n4-unembed-s0"]["stages"] == {"train": "finished", "eval": "skipped", "bench": "skipped"}
    assert summary["broken"]["stages"] == {"train": "failed", "eval": "not run", "bench": "not run"}
    runs_after = client.search_runs([exp.experiment_id])
    assert sorted(x.info.run_id for x in runs_after) == sorted(x.info.run_id for x in runs)  # no duplicates
    resumed = client.get_run(children["bytes-n4-unembed-s0"].info.run_id)
    assert resumed.info.status == "FINISHED"


@pytest.mark.slow
def test_offline_sweep_then_one_import_of_the_whole_folder(smoke_data, tmp_path, empty_mlflow_db, monkeypatch, capsys):
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

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")  # MLflow now reachable: an empty store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for _ in range(2):  # in this process: no interpreter and imports to start again
        with pytest.raises(SystemExit) as e:
            bytelm_main(["track", "import", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        assert e.value.code == 0, err
    assert out.count("already in MLflow") == 2
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
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "eval"], eval={"tasks": ["humaneval", "mbpp"]}))
    plan = plan_sweep(spec)[0]
    alone = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False)["eval"]
    shared = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False, slots=3)["eval"]
    # one command per task, each with its own JSON (a stage cut short keeps the tasks it finished)
    assert [(c[c.index("--task") + 1], Path(c[c.index("--json") + 1]).name) for c in shared] == [
        ("humaneval", "humaneval.json"), ("mbpp", "mbpp.json")]
    assert all("--workers" not in c for c in alone) and all(c[c.index("--workers") + 1] == "10" for c in shared)
    spec.eval.args = ["--workers", "4"]
    own = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False, slots=3)["eval"][0]
    assert own.count("--workers") == 1 and own[own.index("--workers") + 1] == "4"


def test_bench_commands_cut_heads_to_the_model(tmp_path):
    """Without a heads list, decode-bench picks 1, 2, 4, ..., n; an n = 1 model (which
    decode-bench would refuse to speculate with) measures plain decoding alone."""
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
    spec = load_spec(config_path("sweeps/main_h200x2.yaml"))
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


def test_eval_flags_only_where_the_spec_sets_them(tmp_path):
    """`set: {eval.n_samples: 20}` reaches `bytelm eval` through the run's config: the
    runner passes --n-samples only when the spec's eval block sets it, and logs the
    settings that ran as the stage's params."""
    from bytelm.sweep.stages import stage_params

    grid = {"vocab": ["bytes"], "n": [1], "head_type": "unembed", "seed": [0]}
    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "eval"], grid=grid,
                                set={**TINY, "eval.n_samples": 20, "eval.temperatures": [0.3]}))
    (plan,) = plan_sweep(spec)
    (cmd,) = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False)["eval"][:1]
    assert "--n-samples" not in cmd and "--temperatures" not in cmd
    assert stage_params(spec, plan, "eval")["stage.eval.n_samples"] == "20"
    assert stage_params(spec, plan, "eval")["stage.eval.temperatures"] == "0.3"
    assert stage_params(spec, plan, "eval")["stage.eval.tasks"] == "humaneval,mbpp"  # EvalConfig's default

    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "eval"], grid=grid,
                                set={**TINY, "eval.n_samples": 20}, eval={"n_samples": 3, "tasks": "mbpp"}))
    (plan,) = plan_sweep(spec)
    (cmd,) = stage_commands(spec, plan, tmp_path / "r", parent_run_id=None, use_mlflow=False)["eval"]
    assert cmd[cmd.index("--n-samples") + 1] == "3" and cmd[cmd.index("--task") + 1] == "mbpp"
    assert stage_params(spec, plan, "eval")["stage.eval.n_samples"] == "3"
    for bad, msg in (({"n_samples": -1}, "n_samples must be ≥ 1"), ({"tasks": ["hummaneval"]}, "must come from"),
                     ({"n_samples": "many"}, "eval.n_samples must be int"), ({"samples": 3}, "unknown key")):
        with pytest.raises(UserError, match=msg):
            load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "eval"], eval=bad))


def test_spec_stays_inside_the_output_root_and_refuses_empty_budgets(tmp_path):
    for name in ("../../../tmp/escape", "a/b", ".hidden", ""):
        with pytest.raises(UserError, match="plain folder name"):
            load_spec(write_spec(tmp_path / "s.yaml", name=name))
    with pytest.raises(UserError, match="run name '../x' must be a plain folder name"):
        plan_sweep(load_spec(write_spec(tmp_path / "s.yaml", include=[{"vocab": "bytes", "n": 1, "name": "../x"}])))
    for target in (0, -5):
        with pytest.raises(UserError, match="match.target must be > 0"):
            load_spec(write_spec(tmp_path / "s.yaml", match={"by": "bytes", "target": target}))
    with pytest.raises(UserError, match="resources.gpus must be ≥ 0"):
        load_spec(write_spec(tmp_path / "s.yaml", resources={"gpus": -1}))
    # resources: the spec's, a grid choice's over it, an include's over that
    spec = load_spec(write_spec(tmp_path / "s.yaml", resources={"gpus": 2, "time": 90},
                                grid={"vocab": {"bytes": {"n": [1], "resources": {"gpus": 4}}, "bpe": {"n": [1]}}},
                                include=[{"vocab": "bpe", "n": 2, "resources": {"nodes": 2, "time": {"train": "1-00:00:00"}}}]))
    res = {p.name: p.resources for p in plan_sweep(spec, [f"data.root={tmp_path}/none"])}
    assert (res["bytes-n1"].gpus, res["bpe-n1"].gpus, res["bpe-n2"].gpus, res["bpe-n2"].nodes) == (4, 2, 2, 2)
    assert res["bytes-n1"].time["eval"] == "1:30:00" and res["bpe-n2"].time["train"] == "1-00:00:00"
    assert res["bpe-n2"].for_stage("eval").gpus == 1 and res["bpe-n2"].for_stage("eval").nodes == 1


@pytest.mark.parametrize("args,message", [
    (["--stages", "bench"], "the spec t has the stages train"),
    (["--devices", "gpu0"], "device 'gpu0' is not cpu or cuda:N"),
    (["--set", "resources.nodes=2"], "needs a cluster (launcher: slurm)"),
    (["--devices", "cuda:0,cuda:0", "--set", "resources.gpus=2"], "this host's devices are cuda:0 (1 GPU(s))"),
    (["--set", "launcher=pbs"], "launcher must be one of local, slurm"),
])
def test_dry_run_checks_what_a_run_would_refuse(tmp_path, args, message):
    spec = write_spec(tmp_path / "s.yaml")
    r = subprocess.run([sys.executable, "-m", "bytelm", "sweep", str(spec), "--dry-run", "--set",
                        f"data.root={tmp_path}/none", *args], capture_output=True, text=True, cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.slow
def test_two_gpu_config_trains_under_torchrun_and_matches_one_process(smoke_data, tmp_path):
    """`resources: {gpus: 2}` on the local launcher, on CPU: training runs as two torchrun
    processes (gloo) and ends at the loss of the one-process run (the same global batch,
    accumulated). The sweep reports each stage's start and its progress as it goes."""
    spec = write_spec(tmp_path / "s.yaml", grid={"vocab": ["bytes"], "n": [2], "seed": [0]},
                      set={**TINY, "train.steps": 6, "train.log_every": 1, "train.micro_batch_size": 2},
                      resources={"gpus": 2}, include=[{"vocab": "bytes", "n": 2, "seed": 0, "name": "one",
                                                        "resources": {"gpus": 1}}])
    r = run_sweep(spec, tmp_path, "unused", "--set", f"data.root={smoke_data}", "--no-mlflow", "--progress-every", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    two, one = tmp_path / "out" / "runs" / "bytes-n2-s0", tmp_path / "out" / "runs" / "one"
    assert "-m torch.distributed.run --nproc_per_node 2 --standalone" in (two / "logs" / "train.log").read_text()
    assert "torch.distributed.run" not in (one / "logs" / "train.log").read_text()
    assert "bytes-n2-s0: train started on cpu, 2 processes (torchrun)" in r.stdout
    assert "one: train started on cpu (log:" in r.stdout
    # a progress report while a stage ran (each stage outlasts the 1 s; whether a report falls
    # after a training row is up to the scheduler: test_progress_reads_what_a_trainer_is_appending)
    assert "run(s) with stages left; ETA about" in r.stdout

    def losses(d):
        return {x["step"]: x["loss"] for x in read_jsonl(d / "metrics.jsonl") if "loss" in x}

    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def test_progress_reads_what_a_trainer_is_appending(tmp_path):
    """The lines a sweep prints every --progress-every seconds: a training stage's step,
    speed and ETA from its metrics.jsonl, read as the trainer appends to it (a line cut
    off mid-append is no row yet); a stage with no step logged yet says so."""
    from bytelm.sweep.local import LocalLauncher
    from bytelm.sweep.progress import Progress
    from bytelm.sweep.runner import SweepRunner

    spec = load_spec(write_spec(tmp_path / "s.yaml", grid={"vocab": ["bytes"], "n": [1, 4], "head_type": "unembed"}))
    plans = plan_sweep(spec, [f"data.root={tmp_path}/none"])
    runner = SweepRunner(spec, plans, tmp_path / "out", LocalLauncher(["cpu"]), use_mlflow=False, uri=None)
    first, second = configs = [runner.config_jobs(p, 1, write=False) for p in plans]
    first.run_dir.mkdir(parents=True)
    row = {"step": 1, "loss": 5.5, "bytes_per_s": 2048.0, "train/wall_s": 2.0}
    (first.run_dir / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "step": 2})[:20])
    progress = Progress(plans, configs, parallel=1)
    for c in configs:
        progress.started(c.name, "train")
    lines = []
    progress.report([(c, c.stages[0]) for c in configs], lines.append)
    assert lines[0].startswith(f"  {first.name}: train running for 0s, step 1 of 4, 2.05kB/s, ETA 6s"), lines
    assert lines[1] == f"  {second.name}: train running for 0s, starting (no step logged yet)"
    assert lines[2] == "sweep: 2 run(s) with stages left; ETA about 6s (not counting train: no time measured yet)"


def _processes_with(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_one_sweep_per_folder_and_stages_die_with_a_killed_sweep(smoke_data, tmp_path):
    """A second sweep on a busy folder stops with one line naming the holder; kill -9 of
    the sweep takes its stage processes down; the lock it held is gone with it."""
    import signal
    import socket
    import time

    from bytelm.folderlock import lock_folder

    spec = write_spec(tmp_path / "s.yaml", grid={"vocab": ["bytes"], "n": [1], "seed": [0]},
                      set={**TINY, "train.steps": 100000, "train.checkpoint_every": 100000, "train.eval_every": 100000})
    cmd = [sys.executable, "-m", "bytelm", "sweep", str(spec), "--out", str(tmp_path / "out"), "--no-mlflow",
           "--set", f"data.root={smoke_data}"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    run_dir = str(tmp_path / "out" / "runs" / "bytes-n1-s0")
    try:
        deadline = time.monotonic() + 600
        while len(_processes_with(run_dir)) < 2:  # the stage's job and its trainer
            assert time.monotonic() < deadline and first.poll() is None, "the sweep did not start its stage"
            time.sleep(0.5)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert f"in use by `bytelm sweep` (pid {first.pid} on host {socket.gethostname()}" in lines[0]
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 300
        while _processes_with(run_dir):
            assert time.monotonic() < deadline, f"stage processes outlived the sweep: {_processes_with(run_dir)}"
            time.sleep(0.5)
    finally:
        if first.poll() is None:
            first.kill()
    with lock_folder(tmp_path / "out", "bytelm sweep"):  # the dead sweep's lock is not held
        pass


def test_slurm_scripts_and_multi_node_training_commands(tmp_path):
    """What the slurm launcher would submit (no cluster needed): the slurm: block's lines,
    per-stage resources, requeue and the time-limit signal on training, and on 2 nodes an
    srun of one torchrun per node meeting at the first node."""
    from bytelm.sweep.runner import SweepRunner
    from bytelm.sweep.slurm import SlurmLauncher

    spec = load_spec(write_spec(
        tmp_path / "s.yaml", stages=["train", "eval"], launcher="slurm", grid={"vocab": ["bytes"], "n": [1]},
        resources={"gpus": 4, "nodes": 2, "cpus": 16, "mem": "64G", "time": {"train": "2:00:00", "eval": 30}},
        slurm={"partition": "gpu", "account": "lab", "qos": "high", "constraint": "h100", "sbatch": ["--exclusive"],
               "setup": "module load cuda"}), ["--set", "slurm.qos=low"])
    (plan,) = plan_sweep(spec, [f"data.root={tmp_path}/none"])
    launcher = SlurmLauncher(spec.slurm, spec.name)
    runner = SweepRunner(spec, [plan], tmp_path / "out", launcher, use_mlflow=False, uri=None)
    config = runner.config_jobs(plan, 1, write=False)
    train, ev = config.stages
    script = launcher.script(config, train)
    for line in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64G",
                 "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=low",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                 "module load cuda", "export BYTELM_RDZV_HOST=", f"exec {sys.executable} -m bytelm.sweep.job"):
        assert line in script, line
    (cmd,) = train.commands
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[4:12] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2",
                         "--rdzv_backend"]
    assert "${BYTELM_RDZV_HOST}:29500" in cmd and cmd[cmd.index("-m", 6):][:3] == ["-m", "bytelm", "train"]
    script = launcher.script(config, ev)  # evaluation: one GPU on one node, no requeue
    assert "#SBATCH --nodes=1" in script and "#SBATCH --gres=gpu:1" in script and "#SBATCH --time=0:30:00" in script
    assert "--requeue" not in script and ev.commands[0][1:4] == ["-m", "bytelm", "eval"]


def test_bench_per_batch_prompt_counts_and_trees_fitted_first(tmp_path):
    """bench.n_prompts gives each batch size its own prompts (and JSON); bench.trees runs
    tree-fit for the largest tree first and benchmarks the trees beside the chains, cut to
    the trees a model's heads can fill (n = 2: one draft of 10 candidates, 11 nodes)."""
    bench = {"heads": [1, 2, 4, 8], "n_prompts": {1: 16, 16: 240}, "trees": [8, 16, 64], "prompts": ["code"],
             "tree_fit_args": ["--n-prompts", "32"], "args": ["--cuda-graphs"]}
    spec = load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "bench"], bench=bench,
                                grid={"vocab": {"bytes": {"n": [1, 2, 8], "head_type": "unembed"}}, "seed": [0]}))
    cmds = {p.n_future: stage_commands(spec, p, tmp_path / p.name, parent_run_id=None, use_mlflow=False)["bench"]
            for p in plan_sweep(spec)}

    def flag(cmd, name):
        return cmd[cmd.index(name) + 1] if name in cmd else None

    assert [c[3] for c in cmds[1]] == ["decode-bench", "decode-bench"]  # n = 1: no tree to fit
    assert [(flag(c, "--heads"), flag(c, "--tree")) for c in cmds[1]] == [("1", None), ("1", None)]
    fit, *benches = cmds[8]
    assert fit[3] == "tree-fit" and flag(fit, "--nodes") == "64" and flag(fit, "--n-prompts") == "32"
    assert [(flag(c, "--batch-sizes"), flag(c, "--n-prompts"), flag(c, "--tree"), Path(flag(c, "--json")).name)
            for c in benches] == [("1", "16", "8,16,64", "decode_code_b1.json"), ("16", "240", "8,16,64", "decode_code_b16.json")]
    assert all(flag(c, "--heads") == "1,2,4,8" and "--cuda-graphs" in c for c in benches)
    assert flag(cmds[2][0], "--nodes") == "8" and flag(cmds[2][1], "--tree") == "8" and flag(cmds[2][1], "--heads") == "1,2"
    # sequential heads draft one after another: chains only, no tree to fit
    seq = load_spec(write_spec(tmp_path / "q.yaml", stages=["train", "bench"], bench=bench,
                               grid={"vocab": {"bytes": {"n": [2], "head_type": "sequential"}}, "seed": [0]}))
    (plan,) = plan_sweep(seq)
    seq_cmds = stage_commands(seq, plan, tmp_path / plan.name, parent_run_id=None, use_mlflow=False)["bench"]
    assert [(c[3], flag(c, "--heads"), flag(c, "--tree")) for c in seq_cmds] == [("decode-bench", "1,2", None)] * 2
    params = stage_params(spec, plan_sweep(spec)[1], "bench")
    assert params["stage.bench.trees"] == "8" and params["stage.bench.n_prompts"] == "b1:16,b16:240"
    assert params["stage.bench.batch_sizes"] == "1,16"
    for bad, message in (({"n_prompts": {1: 16}, "batch_sizes": [1, 16]}, "names batch sizes"),
                         ({"n_prompts": {"x": 1}}, "keys are batch sizes"), ({"n_prompts": {1: 0}}, "must be ≥ 1"),
                         ({"trees": [1]}, "node counts ≥ 2")):
        with pytest.raises(UserError, match=message):
            load_spec(write_spec(tmp_path / "s.yaml", stages=["train", "bench"], bench=bad))


def test_a_grid_choice_or_include_brings_its_own_base_config(tmp_path):
    """`base:` in a grid choice (one config per model size) or an include: the plan checks
    and counts that config, and the run trains from it; the spec's base elsewhere."""
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"model": {"n_layers": 2, "d_model": 16, "n_heads": 2}}))
    grid = {"size": {"spec": {}, "small": {"base": "small.yaml"}}, "n": [1], "seed": [0]}
    include = [{"size": {"small": {}}, "n": 2, "seed": 0, "base": "small.yaml", "name": "small-n2"}]
    spec = load_spec(write_spec(tmp_path / "s.yaml", grid=grid, include=include))
    plans = {p.name: p for p in plan_sweep(spec, ["model.context=64"])}
    assert {n: Path(p.base).name for n, p in plans.items()} == {"spec-n1-s0": SMOKE_CONFIG.name,
                                                                "small-n1-s0": "small.yaml", "small-n2": "small.yaml"}
    train = stage_commands(spec, plans["small-n1-s0"], tmp_path / "r", parent_run_id=None, use_mlflow=False)["train"][0]
    assert train[train.index("--config") + 1] == str(small)
    with pytest.raises(UserError, match="base config .*missing.yaml not found"):
        plan_sweep(load_spec(write_spec(tmp_path / "s.yaml", grid={"size": {"x": {"base": "missing.yaml"}}})))
    with pytest.raises(UserError, match="different base configs"):
        expand_grid({"size": {"a": {"base": "a.yaml"}}, "arm": {"b": {"base": "b.yaml"}}})


def test_the_small_mtp_spec_plans_every_run_on_one_budget(smoke_data):
    """experiments/sweeps/small_mtp.yaml: nine recipes at ~100M, three at ~50M and ~25M
    (their own base configs), four second seeds; the same steps, batch and context for
    every run, so the same text; the sizes as the model code counts them."""
    spec = load_spec(config_path("sweeps/small_mtp.yaml"))
    plans = {p.name: p for p in plan_sweep(spec, [f"data.root={smoke_data}"])}
    assert len(plans) == 19
    assert {p.steps for p in plans.values()} == {2000} and {p.tokens_per_step for p in plans.values()} == {32 * 2048}
    assert len({p.train_bytes for p in plans.values()}) == 1
    recipes = ["n1", "equal", "down03", "down01", "forward", "reverse", "ramp", "seq2", "seq4"]
    assert [n for n in plans if n.startswith("100m") and n.endswith("-s0")] == [f"100m-{r}-s0" for r in recipes]
    assert sorted(n for n in plans if n.endswith("-s1")) == sorted(f"100m-{r}-s1" for r in ("n1", "equal", "down01", "forward"))
    for size, lo, hi in (("100m", 95e6, 105e6), ("50m", 47e6, 53e6), ("25m", 24e6, 28e6)):
        sized = [p for n, p in plans.items() if n.startswith(size + "-")]
        assert all(lo < p.params < hi for p in sized), [(p.name, p.params) for p in sized]
        assert {Path(p.base).name for p in sized} == {f"bytes_{size}.yaml"}
    for seed1 in (p for n, p in plans.items() if n.endswith("-s1")):  # the seed-0 twin's config but for the seed
        twin = plans[seed1.name[:-1] + "0"]
        assert [o for o in seed1.overrides if not o.startswith("train.seed=")] == \
            [o for o in twin.overrides if not o.startswith("train.seed=")]
    assert "train.mtp_schedule.extra_scale=0.1" in plans["25m-down01-s0"].overrides
    assert (plans["100m-seq4-s0"].n_future, plans["100m-seq4-s0"].grid["head_type"]) == (4, "sequential")
    trees = {}
    for name in ("100m-n1-s0", "100m-seq2-s0", "100m-equal-s0"):
        cmds = stage_commands(spec, plans[name], Path("r"), parent_run_id=None, use_mlflow=False)["bench"]
        fit = [c[c.index("--nodes") + 1] for c in cmds if c[3] == "tree-fit"]
        benches = [c for c in cmds if c[3] == "decode-bench"]
        assert [(c[c.index("--batch-sizes") + 1], c[c.index("--n-prompts") + 1]) for c in benches] == [("1", "16"), ("16", "240")]
        trees[name] = (fit, {c[c.index("--tree") + 1] if "--tree" in c else None for c in benches})
    # sequential heads draft one after another, so they decode chains only (no tree to fit)
    assert trees == {"100m-n1-s0": ([], {None}), "100m-seq2-s0": ([], {None}), "100m-equal-s0": (["64"], {"8,32,64"})}
