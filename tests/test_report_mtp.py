"""`bytelm report` takes the MTP options as axes: runs that differ by head type or by
head-weight schedule are separate rows of the ablation table, labelled by them."""

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis.report import build_report
from analysis.runs import grid_axes, load_runs
from bytelm.tracking import get_or_create_experiment

# (head type, schedule or None for a run made before schedules were logged, val bpb)
RUNS = [("unembed", "constant", 1.20), ("unembed", "forward", 1.15), ("sequential", "constant", 1.18),
        ("unembed", None, 1.30)]


def test_head_type_and_schedule_are_report_axes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "mtp")
    for i, (head, schedule, bpb) in enumerate(RUNS):
        run = client.create_run(exp, run_name=f"r{i}", tags={"study": "ablation"}).info.run_id
        params = {"data.root": "data/python-env", "data.tokenizer": "bytes", "model.n_future": "4", "model.head_type": head,
                  "train.seed": "0"}
        if schedule:
            params["train.mtp_schedule.kind"] = schedule
        if i == 3:
            params["train.steps"] = "50"  # an older, shorter run: a configuration of its own
        client.log_batch(run, metrics=[Metric("val/bpb", bpb, 0, 100)], params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run, "FINISHED")
    runs = load_runs("mtp", uri).runs
    assert sorted(zip(runs["head_type"], runs["mtp_schedule"])) == sorted(
        [("unembed", "constant"), ("unembed", "forward"), ("sequential", "constant"), ("unembed", "constant")])
    assert grid_axes(runs) == ["head_type", "mtp_schedule"]
    build_report("mtp", uri, tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert {"head_type", "mtp_schedule"} <= set(table.columns)
    assert len(table) == 4
    forward = table[(table["head_type"] == "unembed") & (table["mtp_schedule"] == "forward")]
    assert forward["val/bpb"].tolist() == [1.15]
    assert table[table["head_type"] == "sequential"]["val/bpb"].tolist() == [1.18]
