"""An MLflow experiment's runs as pandas: one row per run, and metric histories.

`load_runs` is MLflow's `search_runs` with tidy columns: `run_id`, `name`, `status`,
`parent_run_id`, `study`, the configuration (`vocab`, `n`, `head_type`, `mtp_schedule`, `seed` from the
sweep's `grid.*` tags, else from the run's config params), every `grid.<axis>`, every
metric under its own name, and `params.<key>` for the config. Analysis reads only this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bytelm.errors import UserError

# config param behind each axis, for runs that were not made by a sweep
AXIS_PARAMS = {"vocab": "data.tokenizer", "n": "model.n_future", "head_type": "model.head_type",
               "mtp_schedule": "train.mtp_schedule.kind", "seed": "train.seed"}
SPEC_KEY = re.compile(r"^spec/(?P<prompts>[^/]+)/b(?P<batch>\d+)/(?:k(?P<heads>\d+)|tree(?P<nodes>\d+))/(?P<what>[a-z_]+)$")
PASS_KEY = re.compile(r"^pass_at_(?P<k>\d+)/(?P<task>[^/]+)/(?P<temp>best|t[0-9.]+)$")


@dataclass
class Experiment:
    name: str
    experiment_id: str
    runs: pd.DataFrame  # configurations (child runs and plain runs), one row each
    parents: pd.DataFrame  # sweep parent runs


def load_runs(experiment: str, uri: str) -> Experiment:
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in mlflow.MlflowClient(uri).search_experiments())
        have = f"it has {', '.join(names)}" if names else "it has no experiments"
        raise UserError(f"no MLflow experiment {experiment!r} in {uri}: {have} (set MLFLOW_TRACKING_URI for another "
                        "store, or run the study first)")
    raw = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    if raw.empty:
        raise UserError(f"MLflow experiment {experiment!r} in {uri} has no runs")
    df = pd.DataFrame({
        "run_id": raw["run_id"],
        "name": raw.get("tags.mlflow.runName", raw["run_id"]),
        "status": raw["status"],
        "start_time": raw["start_time"],
        "parent_run_id": raw.get("tags.mlflow.parentRunId"),
        "study": raw.get("tags.study"),
        "error": raw.get("tags.error"),
        "train_status": raw.get("tags.bytelm.status"),  # finished, stopped (time limit), failed, killed
        "train_step": pd.to_numeric(raw.get("tags.bytelm.step"), errors="coerce") if "tags.bytelm.step" in raw else None,
        # where and with what code a run trained (the trainer's tags)
        "git_commit": raw.get("tags.git_commit"),
        "hardware": raw.get("tags.hardware"),
        "torch": raw.get("tags.torch_version"),
        "is_parent": raw.get("tags.sweep_parent") == "true" if "tags.sweep_parent" in raw else False,
    })
    df["study"] = df["study"].fillna("ablation")
    for axis, param in AXIS_PARAMS.items():
        grid = raw.get(f"tags.grid.{axis}")
        param_col = raw.get(f"params.{param}")
        values = grid if grid is not None else param_col
        if grid is not None and param_col is not None:
            values = grid.fillna(param_col)
        df[axis] = values if values is not None else None
    # the data set a run trained on: its prepared folder's name (e.g. smoke, python-env)
    root = raw.get("params.data.root")
    df["data"] = root.map(lambda r: Path(r).name if isinstance(r, str) else None) if root is not None else None
    df["n"] = pd.to_numeric(df["n"], errors="coerce").astype("Int64")
    # a run logs its schedule from when schedules existed; the ones before trained with constant weights
    df["mtp_schedule"] = df["mtp_schedule"].fillna("constant")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    extra = {c[len("tags."):]: raw[c] for c in raw.columns
             if c.startswith("tags.grid.") and c[len("tags.grid."):] not in AXIS_PARAMS}
    metrics = {c[len("metrics."):]: raw[c] for c in raw.columns if c.startswith("metrics.")}
    params = {c: raw[c] for c in raw.columns if c.startswith("params.")}
    df = pd.concat([df, pd.DataFrame(extra), pd.DataFrame(metrics), pd.DataFrame(params)], axis=1)
    df["config_id"] = raw["tags.config_id"] if "tags.config_id" in raw else None
    df["config_id"] = df["config_id"].fillna(params_config_id(df))
    parents = df[df["is_parent"]].reset_index(drop=True)
    runs = df[~df["is_parent"]].sort_values(["vocab", "n", "name"], na_position="last").reset_index(drop=True)
    return Experiment(experiment, exp.experiment_id, runs, parents)


def _config_defaults() -> dict[str, str]:
    from bytelm.config import RunConfig, flatten, to_dict

    return {k: str(v) for k, v in flatten(to_dict(RunConfig())).items()}


def config_params(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's config as far as its params tell, as strings: a key a run did not log
    has the default value (a run logs only the keys that differ from it, and a few more);
    the keys of a run's configuration identity only (no seed, name or eval defaults)."""
    from bytelm.tracking import IDENTITY_SKIP

    defaults = _config_defaults()
    # config keys only: a sweep's stage settings (stage.*) are params too, but not the config
    keys = sorted(k for k in defaults if not k.startswith(IDENTITY_SKIP))
    out = pd.DataFrame(index=runs.index)
    for k in keys:
        col = runs.get(f"params.{k}")
        default = defaults.get(k)
        out[k] = col.fillna(default) if col is not None else default
    return out


def params_config_id(runs: pd.DataFrame) -> pd.Series:
    """A configuration identity from the params, for runs without a `config_id` tag (made
    before it existed): runs with equal params apart from the seed share it."""
    if runs.empty:
        return pd.Series(dtype=object)
    import hashlib

    # a param some runs lack (a sweep's parent run has sweep.*, its children not) is "":
    # astype(str) keeps NaN as missing under pandas' string dtype
    cfg = config_params(runs).astype(object).fillna("").astype(str)
    return cfg.apply(lambda r: "p" + hashlib.sha1("\0".join(r).encode()).hexdigest()[:11], axis=1)


def config_differences(runs: pd.DataFrame, ids: list[str]) -> dict[str, str]:
    """For configurations that a table would show as the same (vocab, n, ...), what sets
    each apart: config_id -> 'key=value, ...' over the keys whose values differ."""
    # a param some runs lack (a sweep's parent run has sweep.*, its children not) is "":
    # astype(str) keeps NaN as missing under pandas' string dtype
    cfg = config_params(runs).astype(object).fillna("").astype(str)
    cfg["config_id"] = runs["config_id"]
    first = cfg[cfg["config_id"].isin(ids)].drop_duplicates("config_id").set_index("config_id")
    differ = [c for c in first.columns if first[c].nunique() > 1]
    return {cid: ", ".join(f"{k}={first.loc[cid, k]}" for k in differ) for cid in first.index}


def runs_from_csv(path: Path) -> Experiment:
    """The runs of a `runs.csv` that `bytelm report` wrote, as `load_runs` gives them: a
    report rebuilt without the MLflow store (no sweep parents, no metric histories)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"--runs-csv {path}: cannot read it as CSV ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("name", "run_id", "status", "study", "vocab", "n") if c not in df]
    if missing:
        raise UserError(f"--runs-csv {path}: not a runs.csv of `bytelm report` (no column {', '.join(missing)})")
    if df.empty:
        raise UserError(f"--runs-csv {path} holds no runs")
    for col in ("n", "seed"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df = df.assign(**{c: None for c in ("train_status", "error", "parent_run_id", "data") if c not in df}, is_parent=False)
    df["config_id"] = (df["config_id"] if "config_id" in df else pd.Series(None, index=df.index, dtype=object)).fillna(
        params_config_id(df))
    return Experiment(Path(path).name, "", df, pd.DataFrame(columns=["run_id", "start_time"]))


def grid_axes(runs: pd.DataFrame) -> list[str]:
    """The grid axes beyond vocab/n/seed whose values differ between runs (e.g. head_type,
    mtp_schedule, size): they become extra label columns of a table."""
    cands = ["head_type", "mtp_schedule"] + [c for c in runs.columns if c.startswith("grid.")]
    return [c for c in cands if c in runs and runs[c].nunique(dropna=True) > 1]


def metric_history(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Long table run_id, key, step, value of the given metrics' full histories."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    rows = []
    for run_id in run_ids:
        for key in keys:
            for m in client.get_metric_history(run_id, key):
                rows.append({"run_id": run_id, "key": key, "step": m.step, "value": m.value, "timestamp": m.timestamp})
    df = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    # a resumed run logs the steps after its checkpoint twice: keep the later value
    return df.sort_values("timestamp").drop_duplicates(["run_id", "key", "step"], keep="last").sort_values(["run_id", "key", "step"])


def spec_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """Decode-bench metrics in long form: run_id, prompts, batch, decoder ("chain" or
    "tree"), heads (a chain's heads used; 0 for a tree), nodes (positions verified per row
    and step: a chain's heads, a tree's nodes), what, value."""
    rows = []
    for col in runs.columns:
        m = SPEC_KEY.match(col)
        if not m:
            continue
        chain = m["heads"] is not None
        for run_id, v in zip(runs["run_id"], runs[col]):
            if pd.notna(v):
                rows.append({"run_id": run_id, "prompts": m["prompts"], "batch": int(m["batch"]),
                             "decoder": "chain" if chain else "tree", "heads": int(m["heads"]) if chain else 0,
                             "nodes": int(m["heads"] if chain else m["nodes"]), "what": m["what"], "value": float(v)})
    df = pd.DataFrame(rows, columns=["run_id", "prompts", "batch", "decoder", "heads", "nodes", "what", "value"])
    # a bench row decode-bench flagged (repeats that disagree, a busy machine, a speedup
    # above tokens per forward): every metric of it carries the flag
    key = ["run_id", "prompts", "batch", "decoder", "nodes"]
    bad = df[(df["what"] == "flagged") & (df["value"] > 0)][key].drop_duplicates()
    df["flagged"] = df[key].merge(bad.assign(_bad=True), on=key, how="left")["_bad"].fillna(False).astype(bool).values
    return df[df["what"] != "flagged"].reset_index(drop=True)


def spec_results(runs: pd.DataFrame) -> pd.DataFrame:
    """`spec_metrics` without the flagged bench rows: the timings that are results."""
    spec = spec_metrics(runs)
    return spec[~spec["flagged"]].reset_index(drop=True)


def pass_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """pass@k metrics in long form: run_id, task, k, temp ('best' or the temperature), value."""
    rows = []
    for col in runs.columns:
        m = PASS_KEY.match(col)
        if not m:
            continue
        temp = m["temp"] if m["temp"] == "best" else float(m["temp"][1:])
        for run_id, v in zip(runs["run_id"], runs[col]):
            if pd.notna(v):
                rows.append({"run_id": run_id, "task": m["task"], "k": int(m["k"]), "temp": temp, "value": float(v)})
    return pd.DataFrame(rows, columns=["run_id", "task", "k", "temp", "value"])
