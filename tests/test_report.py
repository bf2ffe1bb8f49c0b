"""`bytelm report` on a small MLflow store made here.

The runs are logged the way a sweep logs them (a parent run, child runs tagged with
their grid values, the trainer's and eval's and decode-bench's metric names), with
made-up but plausible values: they are the report's input, and the test checks that the
tables and plots say exactly what the store holds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis.report import build_report
from analysis.sections import SECTIONS, ReportContext, Section
from bytelm.tracking import get_or_create_experiment

# (vocab, n, seed) -> pass@1/10 on humaneval and mbpp, val bpb, speedups by heads
RUNS = {
    ("bytes", 1, 0): dict(he=(0.10, 0.30), mbpp=(0.20, 0.40), bpb=1.20, spec={}),
    ("bytes", 1, 1): dict(he=(0.12, 0.34), mbpp=(0.22, 0.42), bpb=1.22, spec={}),
    ("bytes", 8, 0): dict(he=(0.15, 0.35), mbpp=(0.30, 0.50), bpb=1.18, spec={2: (1.9, 1.97), 4: (3.5, 3.8), 8: (6.1, 7.0)}),
    ("bytes", 8, 1): dict(he=(0.17, 0.37), mbpp=(0.32, 0.52), bpb=1.16, spec={2: (1.9, 1.97), 4: (3.6, 3.8), 8: (6.3, 7.1)}),
    ("bpe", 1, 0): dict(he=(0.20, 0.40), mbpp=(0.25, 0.45), bpb=1.10, spec={}),
    ("bpe", 4, 0): dict(he=(0.22, 0.41), mbpp=(0.24, 0.46), bpb=1.12, spec={2: (1.8, 1.9), 4: (2.9, 3.4)}),
}
TEMPS = (0.2, 0.8)


def log_study(client: MlflowClient, experiment: str) -> str:
    exp_id = get_or_create_experiment(client, experiment)  # artifacts beside the test's database
    parent = client.create_run(exp_id, run_name="study", tags={"sweep": "study", "study": "ablation",
                                                                "sweep_parent": "true"}).info.run_id
    for (vocab, n, seed), r in RUNS.items():
        head = "unembed" if vocab == "bytes" else "transformer"
        name = f"{vocab}-n{n}-{head}-s{seed}"
        run_id = client.create_run(exp_id, run_name=name, tags={
            "mlflow.parentRunId": parent, "sweep": "study", "study": "ablation",
            "grid.vocab": vocab, "grid.n": str(n), "grid.head_type": head, "grid.seed": str(seed)}).info.run_id
        params = {"data.root": "data/python-env", "data.tokenizer": vocab, "model.n_future": str(n),
                  "eval.n_samples": "200",  # the config's default: the caption must not take it
                  "model.head_type": head, "train.seed": str(seed)}
        metrics = []
        for step in (100, 200, 300):  # a validation curve, and the trainer's counters
            metrics += [Metric("val/bpb", r["bpb"] + (300 - step) / 1000, 0, step),
                        Metric("train/bytes_seen", step * 1e6, 0, step),
                        Metric("train/flops", step * 1e13 * (1 + n / 10), 0, step)]
        metrics.append(Metric("model/params", 1.2e6, 0, 0))
        for task in ("humaneval", "mbpp"):
            for k, v in zip((1, 10), r["he" if task == "humaneval" else "mbpp"]):
                metrics.append(Metric(f"pass_at_{k}/{task}/best", v, 0, 300))
                for t in TEMPS:  # the oracle is the best of these
                    metrics.append(Metric(f"pass_at_{k}/{task}/t{t}", v if t == 0.8 else v / 2, 0, 300))
        metrics.append(Metric("pass_at_1/apps/best", 0.0, 0, 300))  # solved by none: a column without a best
        metrics.append(Metric("eval/n_samples", 20, 0, 300))
        for heads, (speedup, bpf) in r["spec"].items():
            metrics += [Metric(f"spec/code/b1/k{heads}/speedup", speedup, 0, 300),
                        Metric(f"spec/code/b1/k{heads}/bytes_per_forward", bpf, 0, 300),
                        Metric(f"spec/code/b1/k{heads}/tokens_per_forward", bpf, 0, 300)]
            if vocab == "bytes":  # a batch-16 benchmark of the byte runs: its own column of Table S3
                metrics += [Metric(f"spec/code/b16/k{heads}/speedup", speedup / 2, 0, 300),
                            Metric(f"spec/code/b16/k{heads}/tokens_per_forward", bpf, 0, 300)]
        if vocab == "bytes":  # a tree of 16 nodes beside the chains, with its efficiency and step cost
            metrics += [Metric(f"spec/code/b1/tree16/{what}", v, 0, 300) for what, v in
                        (("speedup", 5.0), ("tokens_per_forward", 8.0), ("bytes_per_forward", 8.0),
                         ("efficiency", 0.625), ("step_cost", 1.5))]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, "FINISHED")
    failed = client.create_run(exp_id, run_name="bpe-n8-transformer-s0",
                               tags={"mlflow.parentRunId": parent, "study": "ablation", "grid.vocab": "bpe", "grid.n": "8"})
    client.log_batch(failed.info.run_id, tags=[RunTag("error", "train exited with 1: CUDA out of memory")])
    client.set_terminated(failed.info.run_id, "FAILED")
    client.set_terminated(parent, "FINISHED")
    return parent


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = log_study(client, "study")
    return uri, root, parent


def test_table1_rows_columns_values_and_bold(study):
    uri, root, _ = study
    out = root / "out"
    report, files, _ = build_report("study", uri, out)

    csv = pd.read_csv(out / "table1.csv")
    assert list(csv[["vocab", "n"]].itertuples(index=False, name=None)) == [("bytes", 1), ("bytes", 8), ("bpe", 1), ("bpe", 4)]
    assert list(csv["seeds"]) == [2, 2, 1, 1]
    assert list(csv.columns[:3]) == ["data", "vocab", "n"] and set(csv["data"]) == {"python-env"}
    # mean over the two seeds, and their sample standard deviation
    b8 = csv[(csv["vocab"] == "bytes") & (csv["n"] == 8)].iloc[0]
    assert b8["pass_at_1/humaneval/best"] == pytest.approx(0.16)
    assert b8["pass_at_1/humaneval/best:std"] == pytest.approx(0.01414, abs=1e-4)
    assert b8["val/bpb"] == pytest.approx(1.17)
    assert b8["speedup"] == pytest.approx(6.2) and b8["speedup_heads"] == 8
    assert b8["train_bytes"] == pytest.approx(3e8)
    assert pd.isna(csv[(csv["vocab"] == "bpe") & (csv["n"] == 1)].iloc[0]["speedup"])

    md = (out / "table1.md").read_text()
    header = md.splitlines()[0]
    for col in ("MBPP @1", "MBPP @10", "HumanEval @1", "HumanEval @10", "val bpb", "train bytes", "train FLOPs", "speedup"):
        assert col in header
    assert "@100" not in header and "APPS-Intro @10" not in header  # not evaluated: no empty columns
    assert "APPS-Intro @1" in header
    rows = {tuple(c.strip() for c in line.split("|")[2:4]): line for line in md.splitlines()[2:] if line.startswith("|")}
    assert "| 16.0 ± 1.4 " in rows[("bytes", "8")]   # HumanEval@1: mean ± std over seeds, not the best
    assert "**22.0**" in rows[("BPE", "4")]           # the best HumanEval@1
    assert "**31.0 ± 1.4**" in rows[("bytes", "8")]   # the best MBPP@1
    assert "**1.100**" in rows[("BPE", "1")]          # the lowest bits per byte
    assert "**6.20 ± 0.14 (k=8)**" in rows[("bytes", "8")]
    # one bold cell per compared column, none in APPS-Intro @1 where every run has 0.0
    assert sum(line.count("**") for line in rows.values()) == 2 * 6
    assert "from 20 samples per problem" in md and "T ∈ {0.2, 0.8}" in md and "standard deviation" in md

    tex = (out / "table1.tex").read_text()
    assert r"\textbf{22.0}" in tex and r"\begin{tabular}" in tex and r"\caption{" in tex

    text = report.read_text()
    assert "bpe-n8-transformer-s0`: FAILED — train exited with 1: CUDA out of memory" in text
    assert "Beside the paper's Table 1" in text and "32.3 / 50.0 / 69.6" in text  # paper's byte n=8 MBPP
    assert "6.39 / 7.04" in text  # paper Table S3, n=8 model with 8 heads
    s3 = {tuple(c.strip() for c in line.split("|")[1:5]): [c.strip() for c in line.split("|")[5:-1]]
          for line in text.split("beside the paper's Table S3")[1].splitlines() if line.startswith("| ")}
    assert s3[("vocab", "n", "decoder", "nodes")] == ["code, batch 1", "code, batch 16", "paper (code, batch 16)"]
    assert s3[("bytes", "8", "8 heads", "8")] == ["6.20 / 7.05", "3.10 / 7.05", "6.39 / 7.04"]  # means over the two seeds
    assert s3[("BPE", "4", "4 heads", "4")] == ["2.90 / 3.40 [3.40]", "–", "–"]
    assert s3[("bytes", "8", "tree", "16")] == ["5.00 / 8.00, eff. 0.62, step 1.50", "–", "–"]
    for png in ("passk_vs_k.png", "vs_n.png", "speedup_vs_heads.png", "bpb_vs_bytes.png", "bpb_vs_flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in text
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 7 and {"name", "status", "vocab", "n", "seed", "val/bpb", "spec/code/b1/k8/speedup"} <= set(runs.columns)


def report_cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bytelm", "report", *args], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def test_report_cli_logs_artifacts_to_the_parent_run(study, tmp_path):
    """A report that covers exactly one sweep goes into that sweep's run, each report in a
    folder of its own: a second report leaves the first one's files as they were."""
    uri, _, parent = study
    client = MlflowClient(uri)
    folders = []
    for out in ("rep1", "rep2"):
        r = report_cli(uri, "--experiment", "study", "--out", str(tmp_path / out))
        assert r.returncode == 0, r.stderr
        assert f"logged them to the sweep's MLflow run {parent}" in r.stdout
        new = {a.path for a in client.list_artifacts(parent, "report")} - set(folders)
        assert len(new) == 1
        folders += new
    first, second = folders
    assert first != second
    logged = {a.path.removeprefix(first + "/") for a in client.list_artifacts(parent, first)}
    assert {"report.md", "table1.tex", "runs.csv", "vs_n.png"} <= logged

    r = report_cli(uri, "--experiment", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no MLflow experiment 'nope'" in r.stderr and "it has " in r.stderr
    assert "study" in r.stderr.split("it has ")[1]  # the experiments that exist


def test_runs_of_other_configs_are_not_seeds_and_the_report_stays_out_of_the_sweep(tmp_path):
    """A run outside the sweep with the same vocabulary and n but another context (the
    sweep's runs have the default, 256) is its own row, named by what differs; the report of both is not logged to the sweep's run,
    and --parent-run-id reports the sweep alone and logs it there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = log_study(client, "mixed")
    exp_id = client.get_experiment_by_name("mixed").experiment_id
    alone = client.create_run(exp_id, run_name="b8").info.run_id
    client.log_batch(alone, params=[Param(k, v) for k, v in {
        "data.root": "data/python-env", "data.tokenizer": "bytes", "model.n_future": "8", "model.head_type": "unembed",
        "train.seed": "0", "model.context": "1024", "eval.n_samples": "200"}.items()],
        metrics=[Metric("val/bpb", 4.0, 0, 150), Metric("pass_at_1/humaneval/best", 0.0, 0, 150)])
    client.set_terminated(alone, "FINISHED")

    r = report_cli(uri, "--experiment", "mixed", "--out", str(tmp_path / "all"))
    assert r.returncode == 0, r.stderr
    assert "not logged to a sweep run" in r.stdout and "1 run(s) outside any sweep (b8)" in r.stdout
    assert not client.list_artifacts(parent, "report")
    csv = pd.read_csv(tmp_path / "all" / "table1.csv")
    b8 = csv[(csv["vocab"] == "bytes") & (csv["n"] == 8)]
    assert sorted(b8["seeds"]) == [1, 2]  # the sweep's two seeds, and the other config alone
    assert sorted(b8["config"]) == ["model.context=1024", "model.context=256"]
    assert b8[b8["config"] == "model.context=1024"]["val/bpb"].item() == 4.0
    text = (tmp_path / "all" / "report.md").read_text()
    assert "averaged as seeds only when their resolved configs are equal apart from the seed" in text

    r = report_cli(uri, "--experiment", "mixed", "--out", str(tmp_path / "sweep"), "--parent-run-id", parent)
    assert r.returncode == 0, r.stderr
    assert f"logged them to the sweep's MLflow run {parent}" in r.stdout
    assert "b8" not in set(pd.read_csv(tmp_path / "sweep" / "runs.csv")["name"])


def test_study_tag_dispatches_to_its_section(study, tmp_path, monkeypatch):
    """A study without a registered section gets the generic one; registering a section
    (as the synthetic studies do) puts its own markdown in the report."""
    uri, _, _ = study
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, "induction-test")
    run = client.create_run(exp_id, run_name="ind-n2", tags={"study": "induction-test"})
    client.log_batch(run.info.run_id, metrics=[Metric("induction/acc", 0.75, 0, 1)])
    client.set_terminated(run.info.run_id, "FINISHED")

    report, _, _ = build_report("induction-test", uri, tmp_path / "a")
    assert "No report section is registered" in report.read_text() and "0.75" in report.read_text()

    def induction_section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
        return Section("Induction", f"induction accuracy of {len(runs)} run(s): {runs['induction/acc'].iloc[0]}")

    monkeypatch.setitem(SECTIONS, "induction-test", induction_section)
    report, _, _ = build_report("induction-test", uri, tmp_path / "b")
    assert "## Induction" in report.read_text() and "induction accuracy of 1 run(s): 0.75" in report.read_text()


def test_a_run_stopped_at_its_time_limit_is_tabulated_and_flagged(tmp_path):
    """MLflow shows a run stopped by train.time_limit_s as KILLED; the report still
    tabulates it at its last step and says so, and leaves out a run that failed."""
    from bytelm.tracking import set_mlflow_status

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, "stops")
    for name, n, status, step, bpb in (("bytes-n1", 1, "finished", 300, 1.1), ("bytes-n8", 8, "stopped", 250, 1.3),
                                       ("bytes-n16", 16, "failed", 40, 3.0)):
        run_id = client.create_run(exp_id, run_name=name, tags={
            "study": "ablation", "grid.vocab": "bytes", "grid.n": str(n), "grid.head_type": "unembed",
            "git_commit": "abc123", "hardware": "2x NVIDIA H200", "torch_version": "2.11.0"}).info.run_id
        client.log_batch(run_id, metrics=[Metric("val/bpb", bpb, 0, step), Metric("train/wall_s", 900.0, 0, step),
                                          Metric("train/gpu_s", 1800.0, 0, step)], params=[Param("train.steps", "300")])
        set_mlflow_status(client, run_id, status, "boom" if status == "failed" else None, step)
    assert {r.info.run_name: r.info.status for r in client.search_runs([exp_id])}["bytes-n8"] == "KILLED"
    report, _, _ = build_report("stops", uri, tmp_path / "out")
    text = report.read_text()
    assert "- `bytes-n8`: step 250 of 300" in text and "- `bytes-n16`: FAILED — boom" in text
    # provenance of the two tabulated runs (the failed one is not counted)
    assert "- code (git commit): `abc123`" in text and "- hardware: `2x NVIDIA H200`; torch `2.11.0`" in text
    assert "- training GPU time: 1.00 h over 2 run(s)" in text
    table = text.split("## n-ablation")[1]
    assert "| bytes   | 8   | 1.300     |" in table and "3.000" not in table
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert dict(zip(runs["name"], runs["train_status"])) == {"bytes-n1": "finished", "bytes-n8": "stopped", "bytes-n16": "failed"}


def test_report_rebuilt_from_its_runs_csv_without_mlflow(study, tmp_path):
    """`bytelm report --runs-csv` gives the same tables from a published runs.csv, with no
    store (so no training curves); a file that is not one gets one clear error."""
    uri, _, _ = study
    build_report("study", uri, tmp_path / "from_store")
    r = subprocess.run([sys.executable, "-m", "bytelm", "report", "--runs-csv", str(tmp_path / "from_store" / "runs.csv"),
                        "--out", str(tmp_path / "from_csv")], capture_output=True, text=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"})
    assert r.returncode == 0, r.stderr
    for name in ("table1.md", "table1.csv", "table1.tex"):
        assert (tmp_path / "from_csv" / name).read_text() == (tmp_path / "from_store" / name).read_text()
    assert (tmp_path / "from_csv" / "vs_n.png").is_file() and not (tmp_path / "from_csv" / "bpb_vs_bytes.png").exists()
    assert "no MLflow store: no training curves" in (tmp_path / "from_csv" / "report.md").read_text()

    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    for extra in (["--runs-csv", str(tmp_path / "bad.csv")], ["--runs-csv", str(tmp_path / "bad.csv"), "--experiment", "x"]):
        r = subprocess.run([sys.executable, "-m", "bytelm", "report", *extra, "--out", str(tmp_path / "y")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not a runs.csv of `bytelm report`" in subprocess.run(
        [sys.executable, "-m", "bytelm", "report", "--runs-csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "y")],
        capture_output=True, text=True).stderr


def test_a_flagged_bench_row_is_marked_not_a_result(tmp_path):
    """decode-bench's flag on a row (here a speedup above its tokens per forward) marks its
    Table S3 cell and keeps it out of the table's best speedup."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, "flags")
    run_id = client.create_run(exp_id, run_name="bytes-n4", tags={"grid.vocab": "bytes", "grid.n": "4"}).info.run_id
    metrics = [Metric("val/bpb", 2.0, 0, 10)]
    for heads, speedup, tpf, flagged in ((2, 1.5, 1.8, 0.0), (4, 9.0, 3.0, 1.0)):
        metrics += [Metric(f"spec/code/b1/k{heads}/speedup", speedup, 0, 10),
                    Metric(f"spec/code/b1/k{heads}/tokens_per_forward", tpf, 0, 10),
                    Metric(f"spec/code/b1/k{heads}/flagged", flagged, 0, 10)]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    report, _, _ = build_report("flags", uri, tmp_path / "out")
    text = report.read_text()
    csv = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert csv["speedup"].item() == 1.5 and csv["speedup_heads"].item() == 2
    assert "⚠ 9.00 / 3.00" in text and "| 1.50 / 1.80" in text and "is not a result" in text


def test_one_style_per_configuration_in_every_figure():
    """Seeds of a configuration share its colour and marker; configurations differ in
    both, and their hollow markers shrink so that coinciding points stay visible."""
    from analysis.plots import styles

    runs = pd.DataFrame({"name": ["bytes-n8-s0", "bytes-n8-s1", "bytes-n1-s0", "bpe-n2-s0"]})
    st = styles(runs)
    assert set(st) == {"bytes-n8", "bytes-n1", "bpe-n2"}
    assert len({s["color"] for s in st.values()}) == 3 and len({s["marker"] for s in st.values()}) == 3
    assert len({s["ms"] for s in st.values()}) == 3 and all(s["mfc"] == "none" for s in st.values())
