"""`bytelm demo`: the whole pipeline on the embedded default, on CPU, in minutes.

It runs exactly the commands a user would type (README), in order:

    bytelm prepare --preset smoke                       # a few MB of the stdlib, bytes + BPE
    bytelm sweep experiments/sweeps/smoke.yaml          # byte n=1/8, BPE n=1/2: train, pass@k, decoding bench
    bytelm report --experiment smoke --out OUT/report   # tables and plots from MLflow

and ends by printing where the MLflow store is and the `mlflow ui` command to look at it.
Models this small learn little: pass@k is zero and the speedups are those of barely
trained heads. The demo shows the machinery; the GPU studies (docs/results/) show what it finds at scale.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bytelm.paths import config_path, data_dir
from bytelm.tracking import mlflow_uri, read_mlflow_json


def run(command: list[str]) -> None:
    """Runs one `bytelm` subcommand in this process, as the CLI would."""
    from bytelm.cli import run_command

    print(f"\n$ bytelm {' '.join(command)}", flush=True)
    rc = run_command(command)
    if rc:
        raise SystemExit(rc)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs", help="folder for the sweep's runs and the report (default: runs)")
    p.add_argument("--data-dir", help="benchmark data folder (default: $BYTELM_DATA_DIR or ../shared/data)")


def main(args: argparse.Namespace) -> int:
    if args.data_dir:
        os.environ["BYTELM_DATA_DIR"] = str(Path(args.data_dir).resolve())
    data_dir()  # fail now, with the message that says how to point at the data
    spec = config_path("sweeps/smoke.yaml")
    began = time.time()
    out = Path(args.out)
    run(["prepare", "--preset", "smoke"])
    run(["sweep", str(spec), "--out", str(out / "smoke")])
    # the report of this sweep alone (the store may hold other runs of experiment smoke)
    sweep = read_mlflow_json(out / "smoke")
    only = ["--parent-run-id", sweep["run_id"]] if sweep else []
    run(["report", "--experiment", "smoke", "--out", str(out / "smoke" / "report"), *only])
    uri = mlflow_uri()
    if sweep:
        print("\nHeadline numbers per run (MLflow summary/ metrics; docs/tracking.md):\n")
        print(headline_table(uri, sweep["run_id"]))
    exp = f"#/experiments/{sweep['experiment_id']}?workflowType=machine_learning" if sweep else ""
    print(
        f"\nDemo finished in {(time.time() - began) / 60:.1f} min.\n"
        f"  report:       {out / 'smoke' / 'report' / 'report.md'}\n"
        f"  run folders:  {out / 'smoke'}\n"
        f"  MLflow store: {uri}\n"
        f"  look at it:   .venv/bin/mlflow ui --backend-store-uri {uri}\n"
        f"                then open http://127.0.0.1:5000/{exp}\n"
        "Models this small learn little (pass@k is 0 at this size); the GPU studies go in docs/results/."
    )
    return 0


def headline_table(uri: str, parent_run_id: str) -> str:
    """One line per run of the sweep: its summary metrics, with what pass@k rests on."""
    from tabulate import tabulate

    from bytelm.tracking import mlflow_client

    client = mlflow_client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  order_by=["attributes.run_name"])
    rows = []
    for r in children:
        m = r.data.metrics

        def num(key: str, fmt: str) -> str:
            return format(m[key], fmt) if key in m else "–"

        speed = num("summary/speedup_b1", ".2f")
        if speed == "–" and any(k.startswith("spec/code/b1/") and k.endswith("/flagged") and v for k, v in m.items()):
            speed = "flagged"  # every timing of the run was flagged (e.g. a busy machine): not a result
        samples = (f"{int(m['eval/humaneval/problems'])} problems × {int(m['eval/n_samples'])}"
                   if "eval/humaneval/problems" in m and "eval/n_samples" in m else "–")
        rows.append([r.info.run_name, r.info.status, num("summary/val_bpb", ".3f"),
                     num("summary/pass_at_1_humaneval", ".3f"), samples, speed])
    return tabulate(rows, headers=["run", "status", "val bpb (head 1)", "HumanEval pass@1", "on", "best speedup (b1)"],
                    disable_numparse=True)
