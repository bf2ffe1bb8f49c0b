"""`bytelm track import DIR...`: log run directories made without MLflow, once.

A run directory written with `tracking.mlflow=false` (e.g. on a GPU machine without
MLflow) has everything an MLflow run holds: config.yaml (params), metrics.jsonl and
eval_metrics.jsonl (metrics), status.json (the run's status), run_info.json (name, tags,
parent run) and eval/ and bench/ JSON outputs (artifacts). Importing creates the MLflow
run and writes mlflow.json; importing again only logs eval rows added since, so a run is
never duplicated.

A sweep folder (`bytelm sweep --out DIR`, recognised by its plan.json) is imported whole:
its parent run, then every run directory under DIR/runs as a child of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bytelm.config import read_yaml_mapping
from bytelm.errors import UserError
from bytelm.fileio import read_jsonl, write_json
from bytelm.tracking import (
    RUN_COLOR_TAG,
    config_id,
    config_params,
    get_or_create_experiment,
    log_artifact_under,
    log_batched,
    metric_entities,
    mlflow_client,
    next_run_color,
    pending_eval_metrics,
    read_mlflow_json,
    set_mlflow_status,
    start_parent_run,
    sync_eval_rows,
)

ARTIFACT_DIRS = ("eval", "bench")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="track_command", metavar="ACTION", required=True)
    p = sub.add_parser("import", help="log run directories (or sweep folders) made offline into MLflow, once")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="DIR", help="a run directory, or a sweep folder")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the run's tracking.experiment)")
    p.add_argument("--parent-run-id", default=None, help="nest the imported runs under this MLflow run")


def import_run_dir(run_dir: Path, experiment: str | None = None, parent_run_id: str | None = None) -> tuple[str, bool]:
    """Log one run directory into MLflow; returns (run_id, created). A directory that
    already has mlflow.json only gets its eval rows not logged yet."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    existing = read_mlflow_json(run_dir)
    if existing is not None:
        client = mlflow_client(existing["tracking_uri"])
        if existing.get("importing"):
            # an earlier import was cut short: drop its partial run and import again
            client.delete_run(existing["run_id"])
        else:
            sync_eval_rows(client, run_dir, existing)
            return existing["run_id"], False

    cfg = read_yaml_mapping(cfg_path, "run config")
    info_path = run_dir / "run_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{info_path} is not valid JSON ({e}); fix or remove it") from None
    tracking = cfg.get("tracking") if isinstance(cfg.get("tracking"), dict) else {}
    experiment = experiment or tracking.get("experiment") or info.get("experiment") or "bytelm"
    run_name = tracking.get("run_name") or info.get("run_name") or run_dir.name
    client = mlflow_client()
    experiment_id = get_or_create_experiment(client, experiment)
    tags = {"config_id": config_id(cfg), **info.get("tags", {}), "run_dir": str(run_dir.resolve()), "imported": "true"}
    parent = parent_run_id or info.get("parent_run_id")
    if parent and _run_exists(client, parent):
        tags["mlflow.parentRunId"] = parent

    tags[RUN_COLOR_TAG] = next_run_color(client, experiment_id)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    mlflow_info = {"tracking_uri": client.tracking_uri, "experiment_id": experiment_id, "run_id": run_id}
    write_json(run_dir / "mlflow.json", {**mlflow_info, "importing": True})
    log_batched(client, run_id, params=config_params(cfg), tags=tags)
    client.log_artifact(run_id, str(cfg_path))
    # metrics.jsonl rows carry only the step; the file's modification time is the best
    # timestamp left for them
    ts = int((run_dir / "metrics.jsonl").stat().st_mtime * 1000) if (run_dir / "metrics.jsonl").exists() else None
    metrics = []
    for row in read_jsonl(run_dir / "metrics.jsonl", appending=True):
        metrics += metric_entities(row, int(row["step"]), ts)
    log_batched(client, run_id, metrics=metrics)
    for sub in ARTIFACT_DIRS:
        for f in sorted((run_dir / sub).rglob("*.json")) if (run_dir / sub).is_dir() else []:
            log_artifact_under(client, run_id, f, run_dir)
    eval_metrics, n_eval_rows = pending_eval_metrics(run_dir, 0)
    log_batched(client, run_id, metrics=eval_metrics)
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {"status": "killed", "error": None}
    # a run dir still "running" was cut off without a chance to say so
    final = status["status"] if status["status"] != "running" else "killed"
    set_mlflow_status(client, run_id, final, status.get("error"), status.get("step"))
    write_json(run_dir / "mlflow.json", {**mlflow_info, "eval_rows_logged": n_eval_rows})
    return run_id, True


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def import_sweep_dir(sweep_dir: Path, experiment: str | None = None) -> list[tuple[Path, str, bool]]:
    """A sweep folder: its parent run (made once), then its run directories as children."""
    plan = json.loads((sweep_dir / "plan.json").read_text())
    p = plan["parent"]
    experiment = experiment or p["experiment"]
    parent = start_parent_run(sweep_dir, experiment, p["name"], tags=p["tags"], params=p["params"])
    done = []
    for run in plan["runs"]:
        run_dir = sweep_dir / "runs" / run["name"]
        if (run_dir / "config.yaml").is_file():
            done.append((run_dir, *import_run_dir(run_dir, experiment, parent)))
    client = mlflow_client(read_mlflow_json(sweep_dir)["tracking_uri"])
    summary_path = sweep_dir / "summary.json"
    failed = []
    if summary_path.exists():
        client.log_artifact(parent, str(summary_path))
        failed = [r for r in json.loads(summary_path.read_text())["runs"] if r.get("error")]
    error = "; ".join(f"{r['name']}: {r['error']}" for r in failed) or None
    set_mlflow_status(client, parent, "failed" if failed else "finished", error)
    return done


def main(args: argparse.Namespace) -> int:
    for d in args.run_dirs:
        if not d.is_dir():
            raise UserError(f"run directory {d} does not exist")
    for d in args.run_dirs:
        if (d / "plan.json").is_file():
            imported = import_sweep_dir(d, args.experiment)
        else:
            imported = [(d, *import_run_dir(d, args.experiment, args.parent_run_id))]
        for run_dir, run_id, created in imported:
            print(f"{run_dir}: {'imported as' if created else 'already in MLflow as'} run {run_id}")
    return 0
