"""`bytelm sweep SPEC.yaml`: run a study, a grid of configurations, as MLflow runs.

A sweep spec (experiments/sweeps/*.yaml; docs/sweeps.md has the full format):

    name: smoke                      # also the output folder runs/<name> (--out changes it)
    experiment: smoke                # MLflow experiment of the study
    study: ablation                  # what `bytelm report` makes of it
    base: ../configs/smoke.yaml      # relative to the spec file
    set: {train.steps: 150}          # overrides for every run
    grid:                            # the product of the axes
      vocab:                         # data.tokenizer; a mapping gives each choice a sub-grid
        bytes: {n: [1, 8], head_type: unembed}
        bpe: {n: [1, 2], head_type: transformer}
      seed: [0]                      # train.seed
    include: []                      # single extra configurations: {vocab: .., n: .., set: {..}}
    match: {by: bytes, reference: {vocab: bytes, n: 1}}   # or by: flops, or target: NUMBER
    stages: [train, eval, bench]
    eval: {tasks: [humaneval, mbpp], n_samples: 4, temperatures: [0.8], args: []}
    bench: {heads: [1, 2, 4, 8], batch_sizes: [1], max_new: 64, prompts: [code], args: [--n-prompts, 8]}
    synth: {task: induction, args: []}   # stage synth: `bytelm synth eval` (synthetic studies)
    devices: auto                    # cpu, or cuda:0..3 (slots: a GPU listed twice runs two at once)

Each configuration is one run directory (runs/<name>/runs/<run name>) and one MLflow
child run under the sweep's parent run, tagged `sweep`, `study` and `grid.<axis>`. Every
stage is a `bytelm` subprocess (train, synth eval, eval, decode-bench), so the runner
depends only on their command lines. A finished stage leaves `stages/<stage>.json` in the
run directory and is skipped when the sweep runs again; an interrupted training run
resumes from its checkpoint; an evaluation stage (and each of its --json outputs) counts
for the checkpoint step it read, so one that evaluated a stopped run runs again once
training has resumed; the run directory's mlflow.json keeps its MLflow run the same one.
A stage that fails marks its run FAILED with the error and the sweep goes on with the
others.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bytelm.config import load_config, read_yaml_mapping, to_dict
from bytelm.errors import UserError
from bytelm.fileio import write_json

STAGES = ("train", "synth", "eval", "bench")  # in the order they run
# grid axis -> config key; any other axis is a dotted config key, or a name (like `size`)
# whose choices are mappings with a `set:` of overrides
SHORTCUTS = {"vocab": "data.tokenizer", "n": "model.n_future", "head_type": "model.head_type", "seed": "train.seed"}
# how each axis appears in a default run name, in this order (others follow, then seed)
NAME_PARTS = {"size": "{}", "vocab": "{}", "n": "n{}", "head_type": "{}"}
SPEC_KEYS = {"name", "experiment", "study", "base", "set", "grid", "include", "match", "stages", "eval", "bench",
             "synth", "devices", "run_name"}


# ----------------------------------------------------------------------------- the spec


@dataclass
class Match:
    by: str = "none"  # none | bytes | flops
    target: float | None = None  # bytes of text, or training FLOPs
    reference: dict = field(default_factory=dict)  # or: the target of the run with these grid values


@dataclass
class SweepSpec:
    path: Path
    name: str
    experiment: str
    study: str
    base: Path
    set: dict
    grid: dict
    include: list
    match: Match
    stages: list[str]
    eval: dict
    bench: dict
    synth: dict
    devices: str | list[str]
    run_name: str | None


def load_spec(path: str | os.PathLike) -> SweepSpec:
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep spec")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise UserError(f"sweep spec {path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("name", "base", "grid"):
        if key not in raw:
            raise UserError(f"sweep spec {path}: missing key '{key}'")
    base = (path.parent / raw["base"]).resolve()
    if not base.is_file():
        raise UserError(f"sweep spec {path}: base config {base} not found")
    match = raw.get("match") or {}
    if isinstance(match, str):
        match = {"by": match}
    try:
        match = Match(**match)
    except TypeError:
        raise UserError(f"sweep spec {path}: match takes by, target, reference; got {sorted(match)}") from None
    if match.by not in ("none", "bytes", "flops"):
        raise UserError(f"sweep spec {path}: match.by must be none, bytes or flops, got {match.by!r}")
    if match.by != "none" and (match.target is None) == (not match.reference):
        raise UserError(f"sweep spec {path}: match.by={match.by} needs exactly one of match.target or match.reference")
    stages = list(raw.get("stages", ["train"]))
    bad = [s for s in stages if s not in STAGES]
    if bad or "train" not in stages:
        raise UserError(f"sweep spec {path}: stages must include train and come from {', '.join(STAGES)}; got {stages}")
    if "synth" in stages and not (raw.get("synth") or {}).get("task"):
        raise UserError(f"sweep spec {path}: the synth stage needs synth: {{task: induction|poly}}")
    return SweepSpec(
        path=path.resolve(), name=str(raw["name"]), experiment=str(raw.get("experiment", raw["name"])),
        study=str(raw.get("study", "ablation")), base=base, set=dict(raw.get("set") or {}), grid=dict(raw["grid"]),
        include=list(raw.get("include") or []), match=match, stages=[s for s in STAGES if s in stages],
        eval=dict(raw.get("eval") or {}), bench=dict(raw.get("bench") or {}), synth=dict(raw.get("synth") or {}),
        devices=raw.get("devices", "auto"),
        run_name=raw.get("run_name"),
    )


def _config_key(axis: str) -> str | None:
    return SHORTCUTS.get(axis) or (axis if "." in axis else None)


def expand_grid(grid: dict, where: str = "grid") -> list[tuple[dict, dict]]:
    """All (grid values, config overrides) of a grid. An axis is a list of values (a
    scalar is a list of one), or a mapping from each value to a body: its `set:`
    overrides and any further axes (a sub-grid that applies to that value only)."""
    combos: list[tuple[dict, dict]] = [({}, {})]
    for axis, spec in grid.items():
        key = _config_key(axis)
        options: list[tuple[dict, dict]] = []
        if isinstance(spec, dict):
            for value, body in spec.items():
                body = dict(body or {})
                sets = dict(body.pop("set", None) or {})
                if key:
                    sets[key] = value
                for sub_vals, sub_sets in expand_grid(body, f"{where}.{axis}.{value}"):
                    options.append(({axis: value, **sub_vals}, {**sets, **sub_sets}))
        else:
            if key is None:
                raise UserError(
                    f"sweep spec {where}: axis '{axis}' is neither {', '.join(SHORTCUTS)} nor a dotted config key; "
                    f"give its choices as a mapping of name -> {{set: {{...}}}}"
                )
            for value in spec if isinstance(spec, list) else [spec]:
                options.append(({axis: value}, {key: value}))
        if not options:
            raise UserError(f"sweep spec {where}: axis '{axis}' has no values")
        combos = [({**v1, **v2}, {**s1, **s2}) for (v1, s1), (v2, s2) in itertools.product(combos, options)]
    return combos


def default_run_name(values: dict) -> str:
    parts = [fmt.format(values[a]) for a, fmt in NAME_PARTS.items() if a in values]
    parts += [f"{a.split('.')[-1]}{v}" for a, v in values.items() if a not in NAME_PARTS and a != "seed"]
    if "seed" in values:
        parts.append(f"s{values['seed']}")
    return "-".join(str(p) for p in parts) or "run"


# ----------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    name: str
    grid: dict
    overrides: list[str]  # KEY=VALUE for `bytelm train --set`, in order
    n_future: int
    steps: int
    data_root: str
    vocab_size: int | None = None
    params: int | None = None
    flops_per_token: int | None = None
    bytes_per_token: float | None = None  # of the training split (1 for bytes, less the EOS)
    tokens_per_step: int = 0
    train_bytes: float | None = None
    train_flops: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _shard_meta(cfg) -> dict | None:
    p = Path(cfg.data.root) / cfg.data.tokenizer / "train" / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _model_counts(cfg) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the model the trainer would build,
    counted by bytelm.model itself on the meta device (no memory, no weights)."""
    import torch

    from bytelm.model import MTPTransformer

    with torch.device("meta"):
        model = MTPTransformer(cfg.model)
    return model.param_counts()["params"], model.flops_per_token(cfg.model.context)


def plan_sweep(spec: SweepSpec, cli_overrides: list[str] = (), only: str | None = None) -> list[RunPlan]:
    combos = expand_grid(spec.grid)
    for i, entry in enumerate(spec.include):
        if not isinstance(entry, dict):
            raise UserError(f"sweep spec: include[{i}] must be a mapping of axis values (and set:, name:)")
        entry = dict(entry)
        name = entry.pop("name", None)
        sets = dict(entry.pop("set", None) or {})
        expanded = expand_grid(entry, f"include[{i}]")
        if len(expanded) != 1:
            raise UserError(f"sweep spec: include[{i}] must name one configuration (one value per axis)")
        values, overrides = expanded[0]
        combos.append(({**values, **({"_name": name} if name else {})}, {**overrides, **sets}))

    plans: list[RunPlan] = []
    for values, overrides in combos:
        name = values.pop("_name", None) or (
            spec.run_name.format(**{k.replace(".", "_"): v for k, v in values.items()}) if spec.run_name else default_run_name(values)
        )
        items = [f"{k}={v}" for k, v in {**spec.set, **overrides}.items()] + list(cli_overrides)
        try:
            cfg = load_config(spec.base, items)
        except UserError as e:
            raise UserError(f"sweep run {name}: {e}") from None
        plan = RunPlan(name=name, grid=values, overrides=items, n_future=cfg.model.n_future, steps=cfg.train.steps,
                       data_root=cfg.data.root, tokens_per_step=cfg.train.batch_size * cfg.model.context)
        meta = _shard_meta(cfg)
        if meta is not None:
            plan.vocab_size = cfg.model.vocab_size or int(meta["tokenizer"]["vocab_size"])
            plan.bytes_per_token = meta["n_text_bytes"] / meta["n_tokens"]
            cfg.model.vocab_size = plan.vocab_size
            plan.params, plan.flops_per_token = _model_counts(cfg)
        plans.append(plan)

    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"sweep spec: run names are not unique ({', '.join(dup)}); set run_name: to a template using every axis")
    _apply_match(spec.match, plans)
    for p in plans:
        if p.bytes_per_token is not None:
            p.train_bytes = p.steps * p.tokens_per_step * p.bytes_per_token
        if p.flops_per_token is not None:
            p.train_flops = float(p.steps) * p.tokens_per_step * p.flops_per_token
    if only:
        plans = [p for p in plans if fnmatch.fnmatch(p.name, only)]
        if not plans:
            raise UserError(f"--only {only!r} matches none of the sweep's runs ({', '.join(names)})")
    return plans


def _per_step(p: RunPlan, by: str) -> float:
    if p.bytes_per_token is None:  # both rules need the shards' meta.json (bytes per token, vocabulary size)
        raise UserError(f"match by {by} needs the prepared shards of run {p.name}, and {p.data_root} has none "
                        "(run `bytelm prepare` first, or set data.root with --set)")
    return p.tokens_per_step * (p.bytes_per_token if by == "bytes" else p.flops_per_token)


def _apply_match(match: Match, plans: list[RunPlan]) -> None:
    """Set each run's train.steps so that it sees the target bytes of text, or spends the
    target training FLOPs (rounded up to whole steps)."""
    if match.by == "none":
        return
    target = match.target
    if target is None:
        refs = [p for p in plans if all(str(p.grid.get(k)) == str(v) for k, v in match.reference.items())]
        if not refs:
            raise UserError(f"match.reference {match.reference} matches no run of the sweep")
        target = refs[0].steps * _per_step(refs[0], match.by)
    for p in plans:
        p.steps = max(1, math.ceil(float(target) / _per_step(p, match.by)))
        p.overrides.append(f"train.steps={p.steps}")


# ----------------------------------------------------------------------------- devices


def resolve_devices(devices: str | list[str]) -> list[str]:
    if isinstance(devices, str):
        if devices == "auto":
            n = _visible_gpus()
            return [f"cuda:{i}" for i in range(n)] or ["cpu"]
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    for d in devices:
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise UserError(f"device {d!r} is not cpu or cuda:N")
    if "cpu" in devices and len(devices) > 1:
        raise UserError("devices: cpu runs one configuration at a time; list either cpu or cuda:N devices")
    return devices


def _visible_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    n = sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return min(n, len([v for v in visible.split(",") if v.strip()])) if visible is not None else n


def _device_env(device: str) -> dict[str, str]:
    """Each run sees one GPU, as its cuda:0 (or none on CPU). cuda:i is the i-th GPU this
    process sees, so it counts within a CUDA_VISIBLE_DEVICES the sweep was started with."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    i = int(device.split(":")[1])
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and i >= len(visible):
        raise UserError(f"device {device}: CUDA_VISIBLE_DEVICES={','.join(visible)} holds {len(visible)} GPU(s)")
    return {"CUDA_VISIBLE_DEVICES": visible[i] if visible else str(i)}


# ----------------------------------------------------------------------------- stages


def _fmt(xs) -> str:
    return ",".join(str(x) for x in (xs if isinstance(xs, list) else [xs]))


def stage_commands(spec: SweepSpec, plan: RunPlan, run_dir: Path, *, parent_run_id: str | None,
                   use_mlflow: bool, slots: int = 1) -> dict[str, list[list[str]]]:
    """Each stage's commands. `slots`: configurations running at once; their evaluations
    share the machine's cores for the sandboxed programs (each takes cores // slots),
    so that no evaluation's decoding loop starves behind another's programs."""
    bytelm = [sys.executable, "-m", "bytelm"]
    tracking = [f"tracking.experiment={spec.experiment}", f"tracking.run_name={plan.name}",
                f"tracking.mlflow={'true' if use_mlflow else 'false'}"]
    train = [*bytelm, "train", "--config", str(spec.base), "--run-dir", str(run_dir)]
    for o in [*plan.overrides, *tracking]:
        train += ["--set", o]
    tags = {"sweep": spec.name, "study": spec.study, "match": spec.match.by,
            **{f"grid.{k}": v for k, v in plan.grid.items()}}
    for k, v in tags.items():
        train += ["--tag", f"{k}={v}"]
    if parent_run_id:
        train += ["--parent-run-id", parent_run_id]
    cmds = {"train": [train]}  # each stage: a list of commands, run in turn
    if "synth" in spec.stages:  # synthetic tasks (data_prep/synthetic_cli.py), on the test sets beside the run's data
        t = spec.synth
        cmds["synth"] = [[*bytelm, "synth", "eval", "--task", str(t["task"]), "--checkpoint", str(run_dir),
                          "--data", plan.data_root, *map(str, t.get("args", []))]]
    if "eval" in spec.stages:
        # one command per task, each with its own JSON: a stage cut short by a time limit
        # keeps (and has logged) the tasks it finished
        e = spec.eval
        workers = [] if slots == 1 or "--workers" in map(str, e.get("args", [])) else \
            ["--workers", str(max(1, (os.cpu_count() or 1) // slots))]
        cmds["eval"] = [[*bytelm, "eval", "--checkpoint", str(run_dir), "--task", task,
                         "--n-samples", str(e.get("n_samples", 200)),
                         "--temperatures", _fmt(e.get("temperatures", [0.1, 0.2, 0.4, 0.8])),
                         "--json", str(run_dir / "eval" / f"{task}.json"), *map(str, e.get("args", [])), *workers]
                        for task in e.get("tasks", ["humaneval", "mbpp"])]
    if "bench" in spec.stages:
        b = spec.bench
        bench = [*bytelm, "decode-bench", "--checkpoint", str(run_dir), "--batch-sizes", _fmt(b.get("batch_sizes", [1]))]
        # the spec's list cut to the heads this model has, else decode-bench's 1, 2, 4, ..., n;
        # an n = 1 model runs plain decoding alone (its throughput)
        if "heads" in b or plan.n_future == 1:
            bench += ["--heads", _fmt([h for h in b.get("heads", [1]) if h <= plan.n_future] or [1])]
        if "max_new" in b:
            bench += ["--max-new", str(b["max_new"])]
        # one benchmark per prompt set (the paper's code vs text comparison), each its own JSON
        cmds["bench"] = [[*bench, "--prompts", str(p), *map(str, b.get("args", []))]
                         for p in (b["prompts"] if isinstance(b.get("prompts"), list) else [b.get("prompts", "code")])]
    return {s: cmds[s] for s in STAGES if s in cmds}


def _train_status(run_dir: Path) -> str | None:
    status = run_dir / "status.json"
    return json.loads(status.read_text()).get("status") if status.is_file() else None


def evaluated_step(run_dir: Path) -> int | None:
    """The training step of the checkpoint that the later stages read (`--checkpoint RUN_DIR`
    is its latest), None before the first checkpoint."""
    from bytelm.checkpoint import checkpoint_step

    try:
        return checkpoint_step(run_dir)
    except UserError:
        return None


def stage_done(run_dir: Path, stage: str) -> bool:
    """Whether a stage need not run again. An evaluation counts only for the checkpoint it
    read: a run stopped at its time limit is evaluated there, and once a later call has
    resumed its training, its evaluations run again on the newer checkpoint."""
    marker = run_dir / "stages" / f"{stage}.json"
    record = json.loads(marker.read_text()) if marker.is_file() else {}
    if stage == "train":
        # trained before the sweep knew of it (or its marker was lost)
        return record.get("status") == "finished" or _train_status(run_dir) == "finished"
    return record.get("status") == "finished" and record.get("step") == evaluated_step(run_dir)


def _output_exists(cmd: list[str], step: int | None) -> bool:
    """Whether a stage command's --json output is there for this checkpoint step: such
    outputs are written whole at the command's end, so an evaluation task that finished
    before its stage was cut short does not run again."""
    if "--json" not in cmd:
        return False
    out = Path(cmd[cmd.index("--json") + 1])
    if not out.is_file():
        return False
    record = json.loads(out.read_text())
    return record.get("step", record.get("setup", {}).get("step")) == step


def last_error(log: Path) -> str:
    """The line of a stage's log that says what went wrong: the last error-looking line
    (a `bytelm ...: error:` line, an exception), else the last line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [l.strip() for l in text.replace("\r", "\n").splitlines() if l.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower() or line.startswith("Killed"):
            return line[:1000]
    return lines[-1][:1000] if lines else "no output"


@dataclass
class RunResult:
    name: str
    stages: dict[str, str]  # stage -> finished | skipped | failed | not run
    error: str | None = None
    seconds: float = 0.0


def merge_by_name(earlier: list[dict], now: list[dict]) -> list[dict]:
    """The run entries (plan.json, summary.json) of earlier invocations over one sweep
    folder, this invocation's replacing theirs by name: a sweep run in parts (`--only`,
    one run at a time) keeps every run in its plan, so one import brings them all."""
    now_by_name = {r["name"]: r for r in now}
    kept = [now_by_name.pop(r["name"], r) for r in earlier]
    return kept + list(now_by_name.values())


class SweepRunner:
    def __init__(self, spec: SweepSpec, plans: list[RunPlan], out: Path, devices: list[str], use_mlflow: bool,
                 uri: str | None, stages: list[str] | None = None) -> None:
        self.spec, self.plans, self.out, self.devices = spec, plans, out, devices
        self.stages = stages or spec.stages  # the spec's stages this invocation runs (--stages)
        self.use_mlflow, self.uri = use_mlflow, uri
        self.parent_run_id: str | None = None

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
                           "sweep.grid": json.dumps(s.grid)}}

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

    def mark_failed(self, plan: RunPlan, run_dir: Path, error: str) -> None:
        """The MLflow child run of a failed stage says FAILED and why; a run whose trainer
        died before making one gets one here."""
        from bytelm.tracking import Tracker, mlflow_client, read_mlflow_json, set_mlflow_status

        info = read_mlflow_json(run_dir)
        if info is not None:
            set_mlflow_status(mlflow_client(info["tracking_uri"]), info["run_id"], "failed", error)
            return
        cfg_dict = to_dict(load_config(self.spec.base, plan.overrides))
        cfg_dict["tracking"].update(experiment=self.spec.experiment, run_name=plan.name, mlflow=True)
        tracker = Tracker(run_dir, cfg_dict, experiment=self.spec.experiment, run_name=plan.name, use_mlflow=True,
                          tags={"sweep": self.spec.name, "study": self.spec.study,
                                **{f"grid.{k}": v for k, v in plan.grid.items()}},
                          parent_run_id=self.parent_run_id)
        tracker.set_status("failed", error=error)

    # -- running ----------------------------------------------------------------------

    def run_one(self, plan: RunPlan, device: str, log) -> RunResult:
        from bytelm.tracking import log_to_run

        run_dir = self.run_dir(plan)
        run_dir.mkdir(parents=True, exist_ok=True)
        result = RunResult(plan.name, {s: "not run" for s in self.stages})
        began = time.time()
        if self.use_mlflow:
            self.adopt_offline_run(run_dir)
        cmds = stage_commands(self.spec, plan, run_dir, parent_run_id=self.parent_run_id, use_mlflow=self.use_mlflow,
                              slots=min(len(self.devices), len(self.plans)))
        env = {**os.environ, **_device_env(device)}
        if self.uri:
            env["MLFLOW_TRACKING_URI"] = self.uri
        if "train" not in self.stages and _train_status(run_dir) is None:
            # --stages without train: later stages need a trained (finished or stopped) run
            log(f"{plan.name}: not trained yet; {', '.join(self.stages)} not run")
            result.seconds = time.time() - began
            return result
        for stage, stage_cmds in cmds.items():
            if stage not in self.stages:
                continue
            if stage_done(run_dir, stage):
                result.stages[stage] = "skipped"
                continue
            log_path = run_dir / "logs" / f"{stage}.log"
            log_path.parent.mkdir(exist_ok=True)
            t0 = time.time()
            rc = 0
            step = evaluated_step(run_dir)  # what an evaluation stage reads
            with open(log_path, "a") as f:
                for cmd in stage_cmds:
                    if _output_exists(cmd, step):  # done by an earlier, interrupted call of this stage
                        f.write(f"\n(done: {cmd[cmd.index('--json') + 1]}) {' '.join(cmd)}\n")
                        continue
                    f.write(f"\n$ {' '.join(cmd)}\n")
                    f.flush()
                    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
                    if rc != 0:
                        break
            seconds = time.time() - t0
            if rc != 0:
                result.stages[stage] = "failed"
                result.error = f"{stage} exited with {rc}: {last_error(log_path)}"
                write_json(run_dir / "stages" / f"{stage}.json",
                           {"status": "failed", "error": result.error, "seconds": seconds, "device": device, "step": step})
                log(f"{plan.name}: {stage} FAILED after {seconds:.0f} s: {result.error}")
                if self.use_mlflow:
                    self.mark_failed(plan, run_dir, result.error)
                break
            if stage == "train" and _train_status(run_dir) != "finished":
                # the trainer's time limit (train.time_limit_s) ended it early: the next
                # sweep run resumes it from its checkpoint
                result.stages[stage] = "stopped"
                log(f"{plan.name}: train stopped at its time limit after {seconds:.0f} s; run the sweep again to resume")
                break
            write_json(run_dir / "stages" / f"{stage}.json",
                       {"status": "finished", "error": None, "seconds": seconds, "device": device,
                        "step": evaluated_step(run_dir)})
            result.stages[stage] = "finished"
            log(f"{plan.name}: {stage} finished in {seconds:.0f} s on {device}")
            if stage == "train":
                # the planned budget beside what the trainer counted (train/bytes_seen, train/flops)
                planned = {"plan/steps": plan.steps}
                if plan.train_bytes is not None:
                    planned["plan/train_bytes"] = plan.train_bytes
                if plan.train_flops is not None:
                    planned["plan/train_flops"] = plan.train_flops
                log_to_run(run_dir, planned, step=plan.steps)
        if self.use_mlflow and result.error is None and any(v == "finished" for v in result.stages.values()):
            from bytelm.tracking import mlflow_client, read_mlflow_json, set_mlflow_status

            info = read_mlflow_json(run_dir)
            if info is not None:  # eval and bench logged into a run the trainer had closed
                set_mlflow_status(mlflow_client(info["tracking_uri"]), info["run_id"], "finished")
        result.seconds = time.time() - began
        return result

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
                r["seconds"] += e["seconds"]
            runs.append(r)
        return merge_by_name(list(earlier.values()), runs)

    def run(self) -> list[RunResult]:
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        plan_path = self.out / "plan.json"
        earlier = json.loads(plan_path.read_text())["runs"] if plan_path.is_file() else []
        write_json(plan_path, {"spec": str(self.spec.path), "parent": self.parent_info(),
                               "runs": merge_by_name(earlier, [p.to_json() for p in self.plans])})
        if self.use_mlflow:
            self.start_parent()
        free: queue.Queue[str] = queue.Queue()
        for d in self.devices:
            free.put(d)
        bar = tqdm(total=len(self.plans), desc=f"sweep {self.spec.name}", unit="run", dynamic_ncols=True)
        # Runs take devices in plan order (the first runs get the devices in the order
        # listed), so a spec that lists slots decides which runs share a GPU.
        turn, turn_cv = [0], threading.Condition()

        def job(index: int, plan: RunPlan) -> RunResult:
            with turn_cv:
                turn_cv.wait_for(lambda: turn[0] == index)
                device = free.get()
                turn[0] += 1
                turn_cv.notify_all()
            try:
                return self.run_one(plan, device, bar.write)
            except Exception as e:  # the runner's own trouble (e.g. MLflow) fails this run only
                bar.write(f"{plan.name}: sweep runner error: {type(e).__name__}: {e}")
                return RunResult(plan.name, {s: "not run" for s in self.spec.stages}, f"sweep runner: {type(e).__name__}: {e}")
            finally:
                free.put(device)
                bar.update(1)

        with ThreadPoolExecutor(max_workers=len(self.devices)) as pool:
            results = list(pool.map(job, range(len(self.plans)), self.plans))
        bar.close()
        summary = self.merged_summary(results)
        write_json(self.out / "summary.json", {"sweep": self.spec.name, "parent_run_id": self.parent_run_id,
                                               "runs": summary})
        if self.use_mlflow:
            self.end_parent(summary)
        return results


# ----------------------------------------------------------------------------- output


def _human(x: float | None, unit: str = "") -> str:
    if x is None:
        return "?"
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def cpu_flops_per_s() -> float:
    """fp32 matmul FLOP/s of this machine, measured in about a second."""
    import torch

    a = torch.randn(512, 512)
    torch.mm(a, a)
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        torch.mm(a, a)
        reps += 1
    return 2 * 512**3 * reps / (time.perf_counter() - t0)


def print_plan(spec: SweepSpec, plans: list[RunPlan], devices: list[str], out: Path, use_mlflow: bool, uri: str) -> None:
    from tabulate import tabulate

    if devices == ["cpu"]:
        rate, how = cpu_flops_per_s(), "an fp32 matmul measured here (a lower bound: tiny models run below it)"
    else:
        rate, how = 0.4 * 989e12, "40% MFU of an H200's 989 TFLOP/s per GPU"
    rows = []
    for p in plans:
        secs = p.train_flops / rate if p.train_flops else None
        rows.append([p.name, p.grid.get("vocab", ""), p.n_future, p.grid.get("head_type", ""), p.steps,
                     _human(p.params), _human(p.train_bytes, "B"), _human(p.train_flops), f"{secs / 60:.1f}" if secs else "?"])
    print(f"sweep {spec.name}: {len(plans)} runs of {spec.base}, stages {', '.join(spec.stages)}, match by {spec.match.by}")
    print(f"output {out}; MLflow {'experiment ' + repr(spec.experiment) + ' at ' + uri if use_mlflow else 'off (run dirs only)'}; "
          f"devices {', '.join(devices)}")
    print(tabulate(rows, headers=["run", "vocab", "n", "head", "steps", "params", "train bytes", "train FLOPs", "train min"]))
    total = sum(p.train_flops or 0 for p in plans)
    n_dev = len(set(devices))  # a GPU listed twice runs two configurations at once, at no more FLOP/s
    wall = total / rate / 60 / n_dev
    print(f"total training FLOPs {_human(total)}; training time about {wall:.1f} min on {n_dev} device(s), "
          f"at {_human(rate)}FLOP/s per device from {how}; eval and bench not included")
    if plans:
        cmds = stage_commands(spec, plans[0], out / "runs" / plans[0].name, parent_run_id="<parent>", use_mlflow=use_mlflow)
        print("commands of the first run:")
        for stage_cmds in cmds.values():
            for cmd in stage_cmds:
                print("  bytelm " + " ".join(cmd[3:]))


def print_summary(results: list[RunResult], out: Path) -> None:
    from tabulate import tabulate

    stages = list(results[0].stages) if results else []
    rows = [[r.name, *[r.stages[s] for s in stages], f"{r.seconds:.0f}", r.error or ""] for r in results]
    print(tabulate(rows, headers=["run", *stages, "seconds", "error"]))
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} runs ok; summary in {out / 'summary.json'}")
    for r in failed:
        print(f"FAILED {r.name}: {r.error} (log: {out / 'runs' / r.name / 'logs'})")


# ----------------------------------------------------------------------------- CLI


def parse_stages(text: str, spec: SweepSpec) -> list[str]:
    asked = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in asked if x not in spec.stages]
    if bad or not asked:
        raise UserError(f"--stages {text!r}: the spec {spec.name} has the stages {', '.join(spec.stages)}")
    return [x for x in spec.stages if x in asked]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="sweep spec YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--out", type=Path, help="sweep folder (default runs/<spec name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--devices", help="cpu, or cuda:0,cuda:1,... (default: the spec's, else auto)")
    p.add_argument("--only", metavar="GLOB", help="run only the configurations whose name matches")
    p.add_argument("--stages", help="run only these of the spec's stages, comma-separated (e.g. train, then eval,bench "
                                    "later: a run stopped at its time limit is evaluated at its last checkpoint)")
    p.add_argument("--no-mlflow", action="store_true", help="run dirs only; a later sweep run with MLflow imports them")
    p.add_argument("--dry-run", action="store_true", help="print the plan (configs, FLOPs, time) and exit")


def main(args: argparse.Namespace) -> int:
    from bytelm.tracking import mlflow_uri

    spec = load_spec(args.spec)
    plans = plan_sweep(spec, args.set, args.only)
    devices = resolve_devices(args.devices or spec.devices)
    out = args.out or Path("runs") / spec.name
    use_mlflow = not args.no_mlflow
    if use_mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            print("bytelm sweep: MLflow is not installed here; running with --no-mlflow", file=sys.stderr)
            use_mlflow = False
    uri = mlflow_uri()
    if args.dry_run:
        print_plan(spec, plans, devices, out, use_mlflow, uri)
        return 0
    stages = parse_stages(args.stages, spec) if args.stages else None
    results = SweepRunner(spec, plans, out.resolve(), devices, use_mlflow, uri if use_mlflow else None, stages).run()
    print_summary(results, out)
    return 1 if any(r.error for r in results) else 0
