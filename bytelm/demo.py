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
from bytelm.tracking import mlflow_uri


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
    run(["report", "--experiment", "smoke", "--out", str(out / "smoke" / "report")])
    uri = mlflow_uri()
    print(
        f"\nDemo finished in {(time.time() - began) / 60:.1f} min.\n"
        f"  report:       {out / 'smoke' / 'report' / 'report.md'}\n"
        f"  run folders:  {out / 'smoke'}\n"
        f"  MLflow store: {uri}\n"
        f"  look at it:   .venv/bin/mlflow ui --backend-store-uri {uri}\n"
        "Models this small learn little (pass@k is 0 at this size); the GPU studies go in docs/results/."
    )
    return 0
