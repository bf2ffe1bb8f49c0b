"""Run tracking: a run directory that is always written, and an MLflow run beside it.

The run directory is the source of truth (it survives machines without MLflow):

    metrics.jsonl        one JSON object per logged training step
    eval_metrics.jsonl   one JSON object per later logging call (eval, decode bench)
    status.json          {"status": running|finished|failed|killed|stopped, "error", "step"}
    run_info.json        run name, experiment, tags and parent run, for a later import
    mlflow.json          {"tracking_uri", "experiment_id", "run_id", "eval_rows_logged"}
                         once the directory has an MLflow run

A run directory with `mlflow.json` always maps to that one MLflow run: a resumed training
run, an eval and a re-import all log into it, so nothing is ever duplicated. MLflow is
imported lazily because the GPU machine may not have it (`tracking.mlflow=false` there;
`bytelm track import` logs the directory later).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

from bytelm.config import flatten
from bytelm.errors import UserError
from bytelm.fileio import read_jsonl, write_json, write_text
from bytelm.paths import REPO_ROOT

# "stopped": ended by the trainer's time limit, resumable; MLflow has no such state and
# shows it as KILLED until the run resumes
STATUSES = ("running", "finished", "failed", "killed", "stopped")
# status.json -> MLflow RunStatus
_MLFLOW_STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED", "killed": "KILLED", "stopped": "KILLED"}


def mlflow_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store `mlflow.db` in the current directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def mlflow_client(uri: str | None = None):
    """An MlflowClient for `uri` (default: `mlflow_uri()`); a clear error without MLflow."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise UserError(
            "MLflow is not installed here: set tracking.mlflow=false (the run directory keeps "
            "everything) and log it later with `bytelm track import RUN_DIR`"
        ) from None
    uri = uri or mlflow_uri()
    if not uri.startswith("sqlite:///") or uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=uri)
    # The first use of a fresh SQLite store creates its tables; two processes doing it at
    # once (a sweep's first children) made one die with "table ... already exists".
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    _SQLITE_READY.add(uri)
    return client


_SQLITE_READY: set[str] = set()  # the SQLite stores this process has opened (their schema exists)


def _artifact_location(uri: str, experiment: str) -> str | None:
    # MLflow's default artifact root for a database store is ./mlruns relative to the
    # process's current directory; keep artifacts beside the database file instead, so
    # one store is one folder wherever the command ran. A server picks its own.
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


# MLflow 3's UI opens an experiment by its kind: without this tag it infers a GenAI
# experiment and opens "Overview / Traces"; with it, the training runs. The value is the
# one the UI's own kind selector writes ("Machine learning / custom model development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# MLflow's UI colours a run by its hash unless this tag names a colour: two runs of a
# study then often share one. Runs take the palette's colours in the order they are made.
RUN_COLOR_TAG = "mlflow.runColor"
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf", "#393b79", "#ad494a")


def next_run_color(client, experiment_id: str) -> str:
    """The palette's colour for the experiment's next run (by how many runs it has)."""
    n = len(client.search_runs([experiment_id], max_results=1000))
    return RUN_COLORS[n % len(RUN_COLORS)]


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id, created as a model-training experiment when it is new; one of
    ours made before the kind was set gets it now (a kind a user chose is left alone)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # another process (a parallel sweep child) created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted in {client.tracking_uri}: restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or pick another name"
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def check_parent_run(client, run_id: str) -> None:
    """A --parent-run-id must name a run of the store, else runs would hang off nothing."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"parent run {run_id!r} is not a run of the MLflow store {client.tracking_uri}") from None


# ----------------------------------------------------------------------------- run facts


def git_commit() -> str:
    """HEAD of the checkout the code runs from, with `-dirty` when it has local changes;
    `$BYTELM_GIT_COMMIT` when set, for a copy of the tree whose .git is missing or not
    the code's own (a copy of the tree sent to a GPU machine)."""
    if os.environ.get("BYTELM_GIT_COMMIT"):
        return os.environ["BYTELM_GIT_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"  # e.g. a copy of the tree without .git on a GPU machine
    return sha + ("-dirty" if dirty else "")


def hardware() -> str:
    """e.g. '2x NVIDIA H200' or 'cpu: AMD EPYC 7B13 (2 cores)'."""
    torch = sys.modules.get("torch")  # only describe GPUs when the caller already uses torch
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} cores)"


def system_tags() -> dict[str, str]:
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__ if torch is not None else "none",
        "hardware": hardware(),
    }


# Config keys every run logs as params, whatever their value: the axes a study compares
# and the size of what trained. Any other key is logged only where it differs from the
# default, so the runs table shows what sets runs apart (the whole config is the run's
# config.yaml artifact). eval.* are left out: they are the defaults of a later stage,
# which logs the settings it ran with.
KEY_PARAMS = ("data.root", "data.tokenizer", "model.n_future", "model.head_type", "model.context", "model.d_model",
              "model.n_layers", "train.steps", "train.batch_size", "train.lr", "train.mtp_schedule.kind", "train.seed")
# left out of a run's configuration identity (config_id): its name, its evaluation settings
# (eval.*, and a sweep stage's stage.*), and the seed
IDENTITY_SKIP = ("tracking.", "eval.", "stage.", "train.seed")


def config_params(cfg_dict: dict) -> dict[str, str]:
    """The config keys a run logs as MLflow params (KEY_PARAMS and every key that differs
    from the default), values cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from bytelm.config import RunConfig, to_dict

    defaults = flatten(to_dict(RunConfig()))
    flat = flatten(cfg_dict)
    keep = {k: v for k, v in flat.items()
            if not k.startswith(("eval.", "tracking.")) and (k in KEY_PARAMS or k not in defaults or defaults[k] != v)}
    return {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in keep.items()}


def config_id(cfg_dict: dict) -> str:
    """A short hash of the resolved config apart from the seed, the run's name and the
    eval defaults: runs with the same id are seeds of one configuration."""
    import hashlib

    flat = {k: v for k, v in flatten(cfg_dict).items() if not k.startswith(IDENTITY_SKIP)}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def log_batched(client, run_id: str, metrics: Iterable = (), params: dict | None = None, tags: dict | None = None) -> None:
    """MLflow log_batch, split at MLflow's per-call limits (1000 entities, 100 params/tags)."""
    from mlflow.entities import Param, RunTag
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

    metrics = list(metrics)
    params = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in (tags or {}).items()]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH])
    for i in range(0, len(metrics), MAX_ENTITIES_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_ENTITIES_PER_BATCH])


def metric_entities(row: dict, step: int, timestamp_ms: int | None = None) -> list:
    """MLflow Metric objects for one metrics row (non-numeric values are skipped)."""
    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    return [
        Metric(k, float(v), ts, step)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def log_new_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet; MLflow refuses to change a logged value
    (a resumed run may extend e.g. train.steps), so those keep their first value."""
    have = client.get_run(run_id).data.params
    log_batched(client, run_id, params={k: v for k, v in params.items() if k not in have})


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_mlflow_json(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "mlflow.json"
    return json.loads(p.read_text()) if p.exists() else None


def write_status(run_dir: Path, status: str, error: str | None = None, step: int | None = None) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    write_json(Path(run_dir) / "status.json", {"status": status, "error": error, "step": step})


def set_mlflow_status(client, run_id: str, status: str, error: str | None = None, step: int | None = None) -> None:
    if error:
        log_batched(client, run_id, tags={"error": error})
    # the trainer's own status and step, since MLflow shows a run stopped at its time limit as KILLED
    log_batched(client, run_id, tags={"bytelm.status": status, **({"bytelm.step": str(step)} if step is not None else {})})
    if status == "running":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=_MLFLOW_STATUS[status])


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """Metrics, status and artifacts of one training run, to its run dir and MLflow.

    A run dir that already has `mlflow.json` continues that MLflow run (same run id).
    Use as a context manager: an exception marks the run failed (KeyboardInterrupt:
    killed) unless a status was set already.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg_dict: dict,
        *,
        experiment: str,
        run_name: str,
        use_mlflow: bool,
        tags: dict | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.client = None
        self.run_id: str | None = None
        self._final_status: str | None = None
        tags = {"config_id": config_id(cfg_dict), **{k: str(v) for k, v in (tags or {}).items()}}
        info_path = self.run_dir / "run_info.json"
        if not info_path.exists():
            # what a later `bytelm track import` needs to name, tag and nest the run
            write_json(info_path, {
                "experiment": experiment, "run_name": run_name, "parent_run_id": parent_run_id,
                "tags": {**system_tags(), "run_dir": str(self.run_dir.resolve()), **tags},
            })
        if not use_mlflow:
            return
        existing = read_mlflow_json(self.run_dir)
        if existing is not None:
            self.client = mlflow_client(existing["tracking_uri"])
            self.run_id = existing["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            log_new_params(self.client, self.run_id, config_params(cfg_dict))
            if tags:
                log_batched(self.client, self.run_id, tags=tags)
            return
        self.client = mlflow_client()
        experiment_id = get_or_create_experiment(self.client, experiment)
        run_tags = {**system_tags(), "run_dir": str(self.run_dir.resolve()), **tags}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run_tags[RUN_COLOR_TAG] = next_run_color(self.client, experiment_id)
        run = self.client.create_run(experiment_id, run_name=run_name or None)
        self.run_id = run.info.run_id
        log_batched(self.client, self.run_id, params=config_params(cfg_dict), tags=run_tags)
        if (self.run_dir / "config.yaml").is_file():  # the whole resolved config; params hold a part
            self.client.log_artifact(self.run_id, str(self.run_dir / "config.yaml"))
        write_json(self.run_dir / "mlflow.json", {
            "tracking_uri": self.client.tracking_uri, "experiment_id": experiment_id,
            "run_id": self.run_id, "eval_rows_logged": 0,
        })

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        _append_jsonl(self.metrics_path, {"step": step, **metrics})
        if self.client is not None:
            self.client.log_batch(self.run_id, metrics=metric_entities(metrics, step))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def rewind(self, step: int) -> None:
        """Drop metrics.jsonl rows past `step` (logged after the checkpoint a run resumes
        from), so the file holds each step once. MLflow cannot delete single metric values:
        there, those steps get a second value whose timestamp is later."""
        rows = [r for r in read_jsonl(self.metrics_path, appending=True) if r.get("step", 0) <= step]
        if self.metrics_path.exists():
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def set_status(self, status: str, error: str | None = None, step: int | None = None) -> None:
        write_status(self.run_dir, status, error, step)
        if status != "running":
            self._final_status = status
        if self.client is not None:
            set_mlflow_status(self.client, self.run_id, status, error, step)

    def close(self) -> None:
        self.client = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._final_status is None:
            status = "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed"
            self.set_status(status, error=f"{exc_type.__name__}: {exc}")
        self.close()


# ----------------------------------------------------------------------------- parent runs


def start_parent_run(folder: Path, experiment: str, name: str, *, tags: dict, params: dict, uri: str | None = None) -> str:
    """The MLflow parent run of a group of runs (a sweep), made once: `folder/mlflow.json`
    keeps its id, and a later call sets the same run RUNNING again."""
    folder = Path(folder)
    info = read_mlflow_json(folder)
    if info is not None:
        client = mlflow_client(info["tracking_uri"])
        client.update_run(info["run_id"], status="RUNNING")
        return info["run_id"]
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    run_id = client.create_run(experiment_id, run_name=name, tags={**tags, "sweep_parent": "true"}).info.run_id
    log_batched(client, run_id, params={k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()})
    write_json(folder / "mlflow.json", {"tracking_uri": client.tracking_uri, "experiment_id": experiment_id, "run_id": run_id})
    return run_id


# ----------------------------------------------------------------------------- later stages


def pending_eval_metrics(run_dir: Path, done: int) -> tuple[list, int]:
    """MLflow metrics of the eval_metrics.jsonl rows past the first `done`, and the
    file's row count."""
    rows = read_jsonl(Path(run_dir) / "eval_metrics.jsonl", appending=True)
    metrics = []
    for row in rows[done:]:
        metrics += metric_entities(row, int(row.get("step") or 0))
    return metrics, len(rows)


def sync_eval_rows(client, run_dir: Path, info: dict) -> None:
    """Log eval_metrics.jsonl rows that the MLflow run does not have yet (rows written
    where MLflow was unreachable), then record how many it has in mlflow.json."""
    done = int(info.get("eval_rows_logged", 0))
    metrics, n_rows = pending_eval_metrics(run_dir, done)
    if n_rows <= done:
        return
    log_batched(client, info["run_id"], metrics=metrics)
    write_json(Path(run_dir) / "mlflow.json", {**info, "eval_rows_logged": n_rows})


def log_to_run(run_dir: str | os.PathLike, metrics: dict, artifacts: Iterable = (), step: int | None = None,
               rows: Iterable[dict] = ()) -> bool:
    """For stages after training (eval, decode bench): append the metrics to
    run_dir/eval_metrics.jsonl, and log them and the artifacts into the run dir's MLflow
    run when it has one and MLflow is reachable. `rows`: more rows, each with its own
    "step" (a curve over something other than training steps, e.g. heads used). Returns
    whether MLflow got them; if not, `bytelm track import RUN_DIR` logs them later."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _append_jsonl(run_dir / "eval_metrics.jsonl", {"step": step, **metrics})
    for row in rows:
        _append_jsonl(run_dir / "eval_metrics.jsonl", row)
    info = read_mlflow_json(run_dir)
    if info is None:
        return False
    try:
        client = mlflow_client(info["tracking_uri"])
        client.get_run(info["run_id"])
    except Exception as e:  # no MLflow here, or its store is unreachable: keep the run dir
        print(f"bytelm: MLflow not reachable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"metrics kept in {run_dir}/eval_metrics.jsonl, log them later with `bytelm track import {run_dir}`",
              file=sys.stderr)
        return False
    sync_eval_rows(client, run_dir, info)
    for a in artifacts:
        log_artifact_under(client, info["run_id"], Path(a), run_dir)
    return True


def log_artifact_under(client, run_id: str, path: Path, run_dir: Path) -> None:
    """Log a file or folder; one inside the run dir keeps its relative folder
    (run_dir/eval/humaneval.json -> artifact eval/humaneval.json)."""
    try:
        rel_parent = path.resolve().parent.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        rel_parent = ""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), "/".join(x for x in (rel_parent, path.name) if x and x != "."))
    else:
        client.log_artifact(run_id, str(path), rel_parent if rel_parent not in ("", ".") else None)

