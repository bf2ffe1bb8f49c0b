"""The small-MTP study end to end on CPU: a sweep built from experiments/sweeps/small_mtp.yaml
(its recipes, sizes, seeds and bench stage with trees), shrunk to tiny models and a few
steps, run into a real MLflow store (SQLite), then `bytelm report`: the section's tables
and the numbers its figures draw are the metrics the runs logged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from analysis.report import build_report
from analysis.runs import load_runs
from analysis.sections import ReportContext
from analysis.small_mtp import section
from bytelm.paths import config_path

SPEC = config_path("sweeps/small_mtp.yaml")
TINY = {"model.n_heads": 2, "model.context": 64, "train.batch_size": 2, "train.steps": 4, "train.warmup_steps": 1,
        "train.log_every": 2, "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 4,
        "train.compile": "false", "eval.batch_size": 2}
SHAPES = {"100m": {"model.n_layers": 2, "model.d_model": 32}, "25m": {"model.n_layers": 1, "model.d_model": 16}}


def tiny_spec(path: Path, data: Path) -> Path:
    """The study's spec, tiny: its own n = 1 (two seeds) and equal-weight recipes, the
    second at two of its sizes; its bench stage on CPU (a tree fitted first; batch 1
    with its own prompts); four steps of tiny models."""
    raw = yaml.safe_load(SPEC.read_text())
    sizes = raw["grid"]["size"]
    recipes = sizes["100m"]["recipe"]
    for size, shape in SHAPES.items():
        body = sizes[size]
        if "base" in body:  # the size's own config, from the spec's folder
            body["base"] = str((SPEC.parent / body["base"]).resolve())
        body["set"] = shape
        body["recipe"] = {r: recipes[r] for r in (("n1", "equal") if size == "100m" else ("equal",))}
    raw["grid"]["size"] = {s: sizes[s] for s in SHAPES}
    raw["include"] = [{"size": {"100m": {"set": SHAPES["100m"]}}, "recipe": {"n1": recipes["n1"]}, "seed": 1}]
    raw["base"] = str((SPEC.parent / raw["base"]).resolve())
    raw["set"] = {**raw["set"], **TINY, "data.root": str(data), "train.device": "cpu"}
    raw["stages"] = ["train", "bench"]
    raw["bench"] = {**raw["bench"], "n_prompts": {1: 2}, "max_new": 6, "trees": [4],
                    "tree_fit_args": ["--n-prompts", "2", "--prompt-len", "16", "--max-new", "8"],
                    "args": ["--prompt-len", "16"]}
    raw["devices"] = "cpu"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow
def test_small_mtp_sweep_and_its_report_section(smoke_data, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec(tmp_path / "small_mtp.yaml", smoke_data)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, "-m", "bytelm", "sweep", str(spec), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 of 4 runs ok" in r.stdout

    out = tmp_path / "report"
    report, files, _ = build_report("small-mtp", uri, out)
    text = report.read_text()
    assert "## small MTP: better and faster at ~100M parameters?" in text
    assert "4 run(s); 4 of them trained on the study's budget of 512 tokens" in text  # 4 steps x 2 x 64
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("small-mtp")
    logged = {x.info.run_name: x.data.metrics for x in client.search_runs([exp.experiment_id])
              if x.data.tags.get("sweep_parent") != "true"}
    assert sorted(logged) == ["100m-equal-s0", "100m-n1-s0", "100m-n1-s1", "25m-equal-s0"]

    # the run table: every run, its logged head-1 bpb and the trees benchmarked after tree-fit
    runs = pd.read_csv(out / "small_mtp_runs.csv").set_index("run")
    for name, m in logged.items():
        assert runs.loc[name, "val_bpb"] == pytest.approx(m["val/bpb"])
        assert runs.loc[name, "compared"] == "yes"
    equal = logged["100m-equal-s0"]
    assert runs.loc["100m-equal-s0", "val_bpb_heads_2_n"] == " ".join(f"{equal[f'val/bpb/head_{h}']:.3f}"
                                                                      for h in range(2, 9))
    assert runs.loc["100m-equal-s0", "train_accepted_bytes"] == pytest.approx(equal["val/spec/accepted_bytes_k8"])
    assert {"spec/code/b1/tree4/speedup", "spec/code/b1/tree4/bytes_per_forward"} <= set(equal)
    assert not any(k.startswith("spec/code/b1/tree") for k in logged["100m-n1-s0"])  # n = 1: no tree fitted
    assert (tmp_path / "out" / "runs" / "100m-equal-s0" / "bench" / "decode_code_b1.json").is_file()

    # the Pareto plot draws each configuration's chain and tree of most bytes per forward:
    # the logged numbers
    pareto = pd.read_csv(out / "pareto.csv")
    assert set(pareto["batch"]) == {1} and set(pareto["configuration"]) == {"100m-n1", "100m-equal", "25m-equal"}
    n1 = pareto[(pareto["configuration"] == "100m-n1") & (pareto["batch"] == 1)].iloc[0]
    seeds = [logged["100m-n1-s0"]["val/bpb"], logged["100m-n1-s1"]["val/bpb"]]
    assert (n1["decoder"], n1["nodes"], n1["seeds"]) == ("chain", 1, 2)
    assert n1["bpb"] == pytest.approx(np.mean(seeds)) and n1["bpb_std"] == pytest.approx(np.std(seeds, ddof=1))
    assert n1["bytes_per_forward"] == pytest.approx(1.0)
    rows = pareto[pareto["configuration"] == "100m-equal"].set_index("decoder")
    for decoder, prefix, sizes in (("chain", "k", (2, 4, 8)), ("tree", "tree", (4,))):
        counts = {k: equal[f"spec/code/b1/{prefix}{k}/bytes_per_forward"] for k in sizes}
        best = max(counts, key=counts.get)  # the first of the largest, as the report breaks ties
        assert rows.loc[decoder, "nodes"] == best
        assert rows.loc[decoder, "bytes_per_forward"] == pytest.approx(counts[best])
        assert rows.loc[decoder, "bpb"] == pytest.approx(equal["val/bpb"])
    # speedups: the fastest decoder among the timings decode-bench did not flag (a busy
    # machine flags them all: then the table says so and no speedup figure is drawn)
    configs = pd.read_csv(out / "small_mtp_configs.csv").set_index("configuration")
    timings = {k.split("/")[3]: v for k, v in equal.items() if k.startswith("spec/code/b1/") and k.endswith("/speedup")
               and not equal[k.replace("/speedup", "/flagged")]}
    if timings:
        best = max(timings, key=timings.get)
        assert configs.loc["100m-equal", "b1_fastest_speedup"] == pytest.approx(timings[best])
        assert configs.loc["100m-equal", "b1_fastest_decoder"] == (f"k={best[1:]}" if best[0] == "k" else
                                                                   f"tree {best[4:]}")
    else:
        assert np.isnan(configs.loc["100m-equal", "b1_fastest_speedup"])
    any_timing = any(not m[k] for m in logged.values() for k in m if k.startswith("spec/code/b1/") and
                     k.endswith("/flagged"))
    assert ((out / "speedup_vs_heads_b1.png") in files) == ("](speedup_vs_heads_b1.png)" in text) == any_timing

    # the scale trend: each recipe at both sizes, at the parameters the trainer counted
    scale = pd.read_csv(out / "scale_trend.csv")  # n = 1 at one size only: no line
    assert sorted(zip(scale["recipe"], scale["size"])) == [("equal", "100m"), ("equal", "25m")]
    for _, p in scale.iterrows():
        names = [n for n in logged if n.startswith(f"{p['size']}-{p['recipe']}-")]
        assert p["params"] == pytest.approx(np.mean([logged[n]["model/params"] for n in names]))
        assert p["bpb"] == pytest.approx(np.mean([logged[n]["val/bpb"] for n in names]))
    assert scale.set_index(["recipe", "size"]).loc[("equal", "25m"), "params"] < \
        scale.set_index(["recipe", "size"]).loc[("equal", "100m"), "params"]
    for png in ("pareto.png", "bpb_vs_bytes.png", "scale_trend.png"):
        assert (out / png) in files and (out / png).stat().st_size > 1000 and f"]({png})" in text

    # a run of another budget is listed with the reason, kept out of every comparison
    loaded = load_runs("small-mtp", uri).runs
    short = loaded["name"] == "100m-n1-s1"
    loaded.loc[short, "train_step"] = 2
    loaded.loc[short, "train_status"] = "stopped"
    other = tmp_path / "other"
    other.mkdir()
    sec = section(ReportContext("small-mtp", uri, other), loaded)
    assert "- `100m-n1-s1`: trained 2 of 4 steps (stopped)" in sec.markdown
    guarded = pd.read_csv(other / "pareto.csv")
    n1 = guarded[(guarded["configuration"] == "100m-n1") & (guarded["batch"] == 1)].iloc[0]
    assert n1["seeds"] == 1 and n1["bpb"] == pytest.approx(logged["100m-n1-s0"]["val/bpb"]) and np.isnan(n1["bpb_std"])
    assert pd.read_csv(other / "small_mtp_runs.csv").set_index("run").loc["100m-n1-s1", "compared"].startswith("no:")
