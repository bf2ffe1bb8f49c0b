"""A sweep over one output folder: plan.json, the MLflow parent run, each stage's job file,
the launcher, and summary.json.

    out/plan.json, out/summary.json, out/mlflow.json (the parent run)
    out/runs/<run>/                  one run directory per configuration
    out/runs/<run>/stages/<stage>.job.json   what the stage runs (bytelm/sweep/job.py)
    out/runs/<run>/stages/<stage>.json       its marker once it ended (bytelm/sweep/state.py)
    out/runs/<run>/logs/<stage>.log

One `bytelm sweep` at a time works on a folder: it holds the folder's lock
(`bytelm.folderlock`, which the operating system drops when its process dies, so a killed
sweep leaves none behind).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bytelm.fileio import write_json
from bytelm.sweep.launcher import ConfigJobs, Launcher, StageJob
from bytelm.sweep.plan import RunPlan
from bytelm.sweep.spec import STAGES, SweepSpec, expand_grid
from bytelm.sweep.stages import run_tags, stage_commands, stage_params
from bytelm.sweep.state import train_status


@dataclass
class RunResult:
    name: str
    stages: dict[str, str]  # stage -> finished | skipped | stopped | failed | not run | queued | running
    error: str | None = None


def merge_by_name(earlier: list[dict], now: list[dict]) -> list[dict]:
    """The run entries (plan.json, summary.json) of earlier invocations over one sweep
    folder, this invocation's replacing theirs by name: a sweep run in parts (`--only`,
    one run at a time) keeps every run in its plan, so one import brings them all."""
    now_by_name = {r["name"]: r for r in now}
    kept = [now_by_name.pop(r["name"], r) for r in earlier]
    return kept + list(now_by_name.values())


class SweepRunner:
    def __init__(self, spec: SweepSpec, plans: list[RunPlan], out: Path, launcher: Launcher, use_mlflow: bool,
                 uri: str | None, stages: list[str] | None = None, log=print) -> None:
        self.spec, self.plans, self.out, self.launcher = spec, plans, out, launcher
        self.stages = stages or spec.stages  # the spec's stages this invocation runs (--stages)
        self.use_mlflow, self.uri = use_mlflow, uri
        self.parent_run_id: str | None = None
        self.log = log

    def run_dir(self, plan: RunPlan) -> Path:
        return self.out / "runs" / plan.name

    # -- MLflow -------------------------------------------------------------------

    def parent_info(self) -> dict:
        """Name, experiment, tags and params of the sweep's parent run (also in plan.json,
        from which `bytelm track import` makes it for a sweep that ran without MLflow)."""
        s = self.spec
        return {"name": s.name, "experiment": s.experiment, "tags": {"sweep": s.name, "study": s.study},
                "params": {"sweep.spec": str(s.path), "sweep.base": str(s.base), "sweep.match": s.match.by,
                           "sweep.stages": ",".join(s.stages), "sweep.n_runs": str(len(expand_grid(s.grid)) + len(s.include)),
                           "sweep.grid": json.dumps(s.grid), "sweep.launcher": s.launcher}}

    def start_parent(self) -> None:
        """The sweep's parent run, made once (out/mlflow.json keeps its id)."""
        from bytelm.tracking import mlflow_client, read_mlflow_json, start_parent_run

        fresh = read_mlflow_json(self.out) is None
        p = self.parent_info()
        self.parent_run_id = start_parent_run(self.out, p["experiment"], p["name"], tags=p["tags"], params=p["params"],
                                              uri=self.uri)
        if fresh:
            mlflow_client(self.uri).log_artifact(self.parent_run_id, str(self.spec.path))

    def end_parent(self, summary: list[dict]) -> None:
        from bytelm.tracking import log_batched, metric_entities, mlflow_client, set_mlflow_status

        client = mlflow_client(self.uri)
        failed = [r for r in summary if r["error"]]
        log_batched(client, self.parent_run_id, metrics=metric_entities(
            {"sweep/runs": len(summary), "sweep/failed": len(failed)}, 0))
        client.log_artifact(self.parent_run_id, str(self.out / "summary.json"))
        error = "; ".join(f"{r['name']}: {r['error']}" for r in failed) or None
        set_mlflow_status(client, self.parent_run_id, "failed" if failed else "finished", error)

    def adopt_offline_run(self, run_dir: Path) -> None:
        """A run dir trained without MLflow (e.g. an earlier --no-mlflow sweep) joins the
        parent run through an import, before any stage logs into it."""
        from bytelm.tracking_cli import import_run_dir

        if (run_dir / "config.yaml").is_file() and not (run_dir / "mlflow.json").exists():
            import_run_dir(run_dir, self.spec.experiment, self.parent_run_id)

    # -- the stages of each configuration -------------------------------------------

    def config_jobs(self, plan: RunPlan, slots: int, write: bool = True) -> ConfigJobs:
        """The stages this call runs for one run, each with its job file (written unless
        `write` is false: a dry run, or the launcher's check before anything starts)."""
        run_dir = self.run_dir(plan)
        cmds = stage_commands(self.spec, plan, run_dir, parent_run_id=self.parent_run_id, use_mlflow=self.use_mlflow,
                              slots=slots)
        jobs = []
        for stage, stage_cmds in cmds.items():
            if stage not in self.stages:
                continue
            res = plan.resources.for_stage(stage)
            if stage == "train":
                stage_cmds = [self.launcher.train_command(c, res) for c in stage_cmds]
            job_file = run_dir / "stages" / f"{stage}.job.json"
            log = run_dir / "logs" / f"{stage}.log"
            job = {"run": plan.name, "stage": stage, "run_dir": str(run_dir), "commands": stage_cmds, "log": str(log),
                   "requeue": stage == "train", "expand_env": self.launcher.expand_env, "params": stage_params(self.spec, plan, stage),
                   "env": {"MLFLOW_TRACKING_URI": self.uri} if self.uri else {},
                   "mlflow": {"experiment": self.spec.experiment, "parent_run_id": self.parent_run_id,
                              "tags": run_tags(self.spec, plan), "base": plan.base,
                              "overrides": plan.overrides} if self.use_mlflow else None}
            if stage == "train":
                planned = {"plan/steps": plan.steps}
                if plan.train_bytes is not None:
                    planned["plan/train_bytes"] = plan.train_bytes
                if plan.train_flops is not None:
                    planned["plan/train_flops"] = plan.train_flops
                job["planned"] = planned
            if write:
                write_json(job_file, job)
            jobs.append(StageJob(stage, job_file, res, log, stage_cmds))
        return ConfigJobs(plan.name, run_dir, jobs)

    def prepare(self, slots: int) -> list[ConfigJobs]:
        """plan.json, the parent run, and every configuration's job files; the runs that
        cannot run now (later stages of a run never trained) are left out, with a line."""
        self.out.mkdir(parents=True, exist_ok=True)
        plan_path = self.out / "plan.json"
        earlier = json.loads(plan_path.read_text())["runs"] if plan_path.is_file() else []
        write_json(plan_path, {"spec": str(self.spec.path), "parent": self.parent_info(),
                               "runs": merge_by_name(earlier, [p.to_json() for p in self.plans])})
        if self.use_mlflow:
            self.start_parent()
        configs = []
        for plan in self.plans:
            run_dir = self.run_dir(plan)
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.use_mlflow:
                self.adopt_offline_run(run_dir)
            if "train" not in self.stages and train_status(run_dir) is None:
                # --stages without train: later stages need a trained (finished or stopped) run
                self.log(f"{plan.name}: not trained yet; {', '.join(self.stages)} not run")
                configs.append(ConfigJobs(plan.name, run_dir, []))
                continue
            configs.append(self.config_jobs(plan, slots))
        return configs

    def summarize(self, configs: list[ConfigJobs], states: dict[str, dict[str, str]]) -> list[RunResult]:
        from bytelm.sweep.state import read_marker

        results = []
        for c in configs:
            st = {s: states.get(c.name, {}).get(s, "not run") for s in self.stages}
            error = next((read_marker(c.run_dir, s).get("error") for s, v in st.items() if v == "failed"), None)
            if any(v == "failed" for v in st.values()) and error is None:
                error = "failed (see its log)"
            results.append(RunResult(c.name, st, error))
        return results

    def merged_summary(self, results: list[RunResult]) -> list[dict]:
        """This invocation's results, over the summary.json of earlier ones: a run keeps
        the outcome of the stages it did not run now (`--stages` splits a study into
        calls, or two sweeps over one folder run different stages), and their error; the
        runs this invocation left out (`--only`) keep their entries."""
        path = self.out / "summary.json"
        earlier = {r["name"]: r for r in json.loads(path.read_text())["runs"]} if path.is_file() else {}
        runs = []
        for r in map(asdict, results):
            e = earlier.get(r["name"])
            if e is not None:
                kept = {s: v for s, v in e["stages"].items() if s not in r["stages"]}
                stages = {**kept, **r["stages"]}
                r["stages"] = {s: stages[s] for s in STAGES if s in stages}
                if r["error"] is None and "failed" in kept.values():
                    r["error"] = e["error"]
            runs.append(r)
        return merge_by_name(list(earlier.values()), runs)

    def check(self) -> None:
        """The launcher's check of every run's resources, before anything is written."""
        self.launcher.check([self.config_jobs(p, 1, write=False) for p in self.plans])

    def run(self, slots: int = 1) -> list[RunResult]:
        self.check()
        configs = self.prepare(slots)
        states = self.launcher.launch([c for c in configs if c.stages])
        results = self.summarize(configs, states)
        summary = self.merged_summary(results)
        write_json(self.out / "summary.json", {"sweep": self.spec.name, "parent_run_id": self.parent_run_id,
                                               "runs": summary})
        if self.use_mlflow and self.launcher.waits:
            self.end_parent(summary)
        return results

    def finish_parent_if_done(self, states: dict[str, dict[str, str]]) -> None:
        """Under a scheduler, the parent run ends when a look at the study (`--status`)
        finds every stage of every run ended."""
        from bytelm.tracking import read_mlflow_json

        info = read_mlflow_json(self.out)
        if not self.use_mlflow or info is None:
            return
        if any(v not in ("finished", "failed", "stopped") for st in states.values() for v in st.values()):
            return
        self.parent_run_id = info["run_id"]
        results = self.summarize([self.config_jobs(p, 1, write=False) for p in self.plans], states)
        summary = self.merged_summary(results)
        write_json(self.out / "summary.json", {"sweep": self.spec.name, "parent_run_id": self.parent_run_id,
                                               "runs": summary})
        self.end_parent(summary)
