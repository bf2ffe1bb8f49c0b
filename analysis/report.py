"""`bytelm report --experiment NAME --out DIR`: a study's tables, plots and report.md,
read from its MLflow experiment (or `--runs-csv FILE`: rebuilt from the runs.csv of an
earlier report, without the store; the training-curve plots need the store's metric
histories and are left out).

Writes DIR/runs.csv (one row per run: name, status, grid values, metrics), one section per
study found among the runs (analysis/sections.py picks it by the runs' `study` tag; the
n-ablation study writes table1.{md,tex,csv} and the PNG plots), after each section whose
runs report pass@k its confidence intervals and paired tests (analysis/passk_ci.py;
DIR/passk_ci.csv, DIR/passk_paired.csv), and DIR/report.md that puts them together. Plots and tables are also logged as artifacts to the sweep's parent run,
under report/<time>, when the report covers exactly that sweep's runs (--parent-run-id
reports one sweep alone).
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import replace
from pathlib import Path

import pandas as pd

from analysis.passk_ci import report_uncertainty, write_uncertainty
from analysis.runs import Experiment, load_runs, runs_from_csv
from analysis.sections import ReportContext, section_for
from bytelm.errors import UserError
from bytelm.fileio import write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment of the study (a sweep spec's experiment:)")
    p.add_argument("--runs-csv", type=Path, help="instead of --experiment: rebuild from a runs.csv an earlier report wrote "
                                                  "(e.g. docs/results/main/runs.csv; no MLflow needed)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--include-failed", action="store_true", help="also tabulate runs that did not finish")
    p.add_argument("--parent-run-id", help="report this sweep's runs only, and log the report to its run (default: all "
                                           "the experiment's runs, logged to a sweep's run only if they are exactly its runs)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as artifacts to MLflow")


def runs_csv(runs: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: identity, grid values, then every metric; config params at the end."""
    first = ["name", "run_id", "status", "train_status", "train_step", "study", "vocab", "n", "head_type", "mtp_schedule",
             "seed", "config_id", "git_commit", "hardware", "torch"]
    grid = sorted(c for c in runs.columns if c.startswith("grid."))
    params = sorted(c for c in runs.columns if c.startswith("params."))
    skip = {"start_time", "is_parent", "parent_run_id", *first, *grid, *params}
    metrics = sorted(c for c in runs.columns if c not in skip and runs[c].notna().any())
    return runs[[c for c in first if c in runs] + grid + metrics + params + ["parent_run_id"]]


def _step(run: pd.Series) -> str:
    """'last of planned' steps of a run, from its metrics."""
    last, plan = run.get("train_step"), pd.to_numeric(run.get("params.train.steps"), errors="coerce")
    fmt = lambda x: "?" if x is None or pd.isna(x) else f"{int(x)}"  # noqa: E731
    return f"{fmt(last)} of {fmt(plan)}"


def provenance(runs: pd.DataFrame, parents: pd.DataFrame) -> list[str]:
    """Where the tabulated runs come from: sweep specs, code, hardware, and the time they
    trained (`train/wall_s`, `train/gpu_s` of the trainer)."""
    def values(frame: pd.DataFrame, col: str) -> str:
        vals = sorted({str(v) for v in frame[col].dropna()}) if col in frame else []
        return ", ".join(f"`{v}`" for v in vals) or "not logged"

    lines = ["Provenance:\n",
             f"- sweep specs: {values(parents, 'params.sweep.spec')}",
             f"- code (git commit): {values(runs, 'git_commit')}",
             f"- hardware: {values(runs, 'hardware')}; torch {values(runs, 'torch')}"]
    for col, what in (("train/wall_s", "training wall time"), ("train/gpu_s", "training GPU time")):
        if col in runs and runs[col].notna().any():
            lines.append(f"- {what}: {runs[col].sum() / 3600:.2f} h over {int(runs[col].notna().sum())} run(s) "
                         f"(per run in `runs.csv`, column `{col}`)")
    return lines + [""]


def build_report(experiment: str, uri: str | None, out: Path, include_failed: bool = False,
                 exp: Experiment | None = None) -> tuple[Path, list[Path], pd.DataFrame]:
    """Write the report; return report.md, the files to log, and the parent runs. `exp`:
    runs already loaded (from a runs.csv, with uri None), else the experiment's in MLflow."""
    exp = exp if exp is not None else load_runs(experiment, uri)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "runs.csv", runs_csv(exp.runs).to_csv(index=False))
    files = [out / "runs.csv"]
    # a run stopped at its time limit (train.time_limit_s) is a result at its last step: tabulated, and listed
    stopped = exp.runs["train_status"] == "stopped"
    done = exp.runs if include_failed else exp.runs[(exp.runs["status"] == "FINISHED") | stopped]
    left_out = exp.runs[~exp.runs["run_id"].isin(done["run_id"])]
    ctx = ReportContext(experiment, uri, out)

    source = (f"`bytelm report --experiment {experiment} --out {out}` from the store `{uri}`" if uri else
              f"`bytelm report --runs-csv {experiment} --out {out}` (no MLflow store: no training curves)")
    md = [f"# Report: {'MLflow experiment' if uri else 'runs of'} `{experiment}`\n",
          f"Generated {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by {source}; {len(done)} run(s) "
          f"tabulated, one row per run in `runs.csv`.\n"]
    md += provenance(done, exp.parents)
    if stopped.any():
        md.append("Runs stopped at their time limit, tabulated at their last step:\n")
        md += [f"- `{r['name']}`: step {_step(r)}" for _, r in exp.runs[stopped].iterrows()]
        md.append("")
    if len(left_out):
        md.append("Runs left out (not FINISHED):\n")
        md += [f"- `{r['name']}`: {r['status']}" + (f" — {r['error']}" if isinstance(r["error"], str) else "")
               for _, r in left_out.iterrows()]
        md.append("")
    if done.empty:
        md.append("No finished runs to tabulate yet.\n")
    uncertainties = {}
    for study, runs in done.groupby("study", sort=True):
        runs = runs.reset_index(drop=True)
        passk = report_uncertainty(uri, runs)  # every study's pass@k gets its intervals, whatever its section
        section = section_for(study)(replace(ctx, passk=passk), runs)
        md += [f"\n## {section.title}\n", section.markdown]
        if passk is not None:
            md += ["\n### pass@k with confidence intervals\n", passk.markdown]
            uncertainties[study] = passk
        files += section.files
    if uncertainties:
        files += write_uncertainty(uncertainties, out)
    report = out / "report.md"
    write_text(report, "\n".join(md) + "\n")
    return report, [report, *files], exp.parents


def sweep_of(exp: Experiment) -> tuple[str | None, str]:
    """The sweep parent run whose child runs are exactly the report's runs, or None and
    why not: a report goes into a sweep's run only when it covers that sweep and no more."""
    runs = set(exp.runs["run_id"])
    if exp.parents.empty:
        return None, "the experiment has no sweep run"
    for parent in exp.parents["run_id"]:
        if set(exp.runs.loc[exp.runs["parent_run_id"] == parent, "run_id"]) == runs:
            return parent, ""
    outside = exp.runs[~exp.runs["parent_run_id"].isin(exp.parents["run_id"])]
    sweeps = exp.runs["parent_run_id"].dropna().nunique()
    why = f"its runs come from {sweeps} sweep(s)" + (f" and {len(outside)} run(s) outside any sweep "
                                                      f"({', '.join(outside['name'].astype(str)[:4])})" if len(outside) else "")
    return None, why + "; --parent-run-id ID reports one sweep alone and logs the report to it"


def only_sweep(exp: Experiment, parent_run_id: str) -> Experiment:
    """The experiment cut to one sweep: its parent run and its child runs."""
    if parent_run_id not in set(exp.parents["run_id"]):
        have = ", ".join(f"{r['run_id']} ({r['name']})" for _, r in exp.parents.iterrows()) or "none"
        raise UserError(f"--parent-run-id {parent_run_id} is not a sweep run of experiment {exp.name!r} (its sweep runs: "
                        f"{have})")
    runs = exp.runs[exp.runs["parent_run_id"] == parent_run_id].reset_index(drop=True)
    if runs.empty:
        raise UserError(f"sweep run {parent_run_id} of experiment {exp.name!r} has no child runs yet")
    return replace(exp, runs=runs, parents=exp.parents[exp.parents["run_id"] == parent_run_id].reset_index(drop=True))


def log_to_parent(uri: str, parent_run_id: str, files: list[Path]) -> str:
    """Logs the report under its own folder, report/<time>, so that it never replaces an
    earlier report's files. Returns that folder."""
    from mlflow import MlflowClient

    folder = f"report/{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H-%M-%SZ}"
    client = MlflowClient(uri)
    for f in files:
        client.log_artifact(parent_run_id, str(f), folder)
    return folder


def main(args: argparse.Namespace) -> int:
    from bytelm.tracking import mlflow_uri

    if (args.experiment is None) == (args.runs_csv is None):
        raise UserError("give exactly one of --experiment NAME and --runs-csv FILE")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    if args.runs_csv is not None:
        if args.runs_csv.resolve() == (args.out / "runs.csv").resolve():
            raise UserError(f"--runs-csv {args.runs_csv} is the runs.csv the report writes: give another --out")
        exp = runs_from_csv(args.runs_csv)
        report, files, _ = build_report(str(args.runs_csv), None, args.out, args.include_failed, exp)
        print(f"wrote {report} and {len(files) - 1} table/plot files in {args.out}")
        return 0
    uri = mlflow_uri()
    exp = load_runs(args.experiment, uri)
    if args.parent_run_id:
        exp = only_sweep(exp, args.parent_run_id)
    report, files, _ = build_report(args.experiment, uri, args.out, args.include_failed, exp)
    print(f"wrote {report} and {len(files) - 1} table/plot files in {args.out}")
    if not args.no_log:
        parent, why = sweep_of(exp)
        if parent:
            folder = log_to_parent(uri, parent, files)
            print(f"logged them to the sweep's MLflow run {parent} (artifacts {folder})")
        else:
            print(f"not logged to a sweep run: {why}")
    return 0
