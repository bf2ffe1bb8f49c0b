"""The stage commands of one run: each stage is one or more `bytelm` subprocesses with the
run directory, so the runner depends only on their command lines. A stage's flags are
those its spec block sets; the rest come from the run's config or the command's defaults.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bytelm.sweep.plan import RunPlan
from bytelm.sweep.spec import STAGES, StageResources, SweepSpec


def _fmt(xs) -> str:
    return ",".join(str(x) for x in (xs if isinstance(xs, list) else [xs]))


def bytelm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bytelm", *args]


def stage_commands(spec: SweepSpec, plan: RunPlan, run_dir: Path, *, parent_run_id: str | None,
                   use_mlflow: bool, slots: int = 1) -> dict[str, list[list[str]]]:
    """Each stage's commands, run in turn. `slots`: configurations running at once; their
    evaluations share the machine's cores for the sandboxed programs (each takes
    cores // slots), so that no evaluation's decoding loop starves behind another's."""
    tracking = [f"tracking.experiment={spec.experiment}", f"tracking.run_name={plan.name}",
                f"tracking.mlflow={'true' if use_mlflow else 'false'}"]
    train = bytelm_cmd("train", "--config", plan.base, "--run-dir", str(run_dir))
    for o in [*plan.overrides, *tracking]:
        train += ["--set", o]
    for k, v in run_tags(spec, plan).items():
        train += ["--tag", f"{k}={v}"]
    if parent_run_id:
        train += ["--parent-run-id", parent_run_id]
    cmds = {"train": [train]}
    if "synth" in spec.stages:  # synthetic tasks, on the test sets beside the run's data
        cmds["synth"] = [bytelm_cmd("synth", "eval", "--task", spec.synth.task, "--checkpoint", str(run_dir),
                                    "--data", plan.data_root, *map(str, spec.synth.args))]
    if "eval" in spec.stages:
        # one command per task, each with its own JSON: a stage cut short by a time limit
        # keeps (and has logged) the tasks it finished
        e = spec.eval
        flags = []
        if e.n_samples is not None:
            flags += ["--n-samples", str(e.n_samples)]
        if e.temperatures is not None:
            flags += ["--temperatures", _fmt(e.temperatures)]
        args = list(map(str, e.args))
        if slots > 1 and "--workers" not in args:
            flags += ["--workers", str(max(1, (os.cpu_count() or 1) // slots))]
        cmds["eval"] = [bytelm_cmd("eval", "--checkpoint", str(run_dir), "--task", task,
                                   "--json", str(run_dir / "eval" / f"{task}.json"), *flags, *args)
                        for task in effective_eval(spec, plan)["tasks"]]
    if "bench" in spec.stages:
        cmds["bench"] = bench_commands(spec, plan, run_dir)
    return {s: cmds[s] for s in STAGES if s in cmds}


def tree_sizes(spec: SweepSpec, plan: RunPlan) -> list[int]:
    """The spec's tree sizes that the run's model can fill: a tree holds at most the paths
    of up to n-1 drafts of MAX_RANK candidates each (none for n = 1), and sequential heads,
    which draft one after another, decode chains only."""
    from bytelm.tree import MAX_RANK

    if plan.n_future == 1 or plan.head_type == "sequential":
        return []
    most = 1 + sum(MAX_RANK ** d for d in range(1, plan.n_future))
    return [t for t in spec.bench.trees or [] if t <= most]


def bench_commands(spec: SweepSpec, plan: RunPlan, run_dir: Path) -> list[list[str]]:
    """decode-bench once per prompt set (and per batch size where `n_prompts` gives each
    its own prompt count), after `bytelm tree-fit` where the spec asks for trees."""
    b = spec.bench
    bench = bytelm_cmd("decode-bench", "--checkpoint", str(run_dir))
    # the spec's list cut to the heads this model has, else decode-bench's 1, 2, 4, ..., n;
    # an n = 1 model runs plain decoding alone (its throughput)
    if b.heads is not None or plan.n_future == 1:
        bench += ["--heads", _fmt([h for h in (b.heads or [1]) if h <= plan.n_future] or [1])]
    if b.max_new is not None:
        bench += ["--max-new", str(b.max_new)]
    trees = tree_sizes(spec, plan)
    cmds = []
    if trees:  # the tree file the benchmark reads, fitted to this checkpoint's weights
        cmds.append(bytelm_cmd("tree-fit", "--checkpoint", str(run_dir), "--nodes", str(max(trees)),
                               *map(str, b.tree_fit_args)))
        bench += ["--tree", _fmt(trees)]
    # one benchmark per prompt set (the paper's code vs text comparison), each its own JSON
    for p in b.prompts if b.prompts is not None else [None]:
        prompts = ["--prompts", p] if p is not None else []
        if b.n_prompts is None:
            sizes = ["--batch-sizes", _fmt(b.batch_sizes)] if b.batch_sizes is not None else []
            cmds.append([*bench, *sizes, *prompts, *map(str, b.args)])
            continue
        for batch, n in b.n_prompts.items():  # each batch size with its own prompts, its own JSON
            out = run_dir / "bench" / f"decode_{Path(p or 'code').stem}_b{batch}.json"
            cmds.append([*bench, "--batch-sizes", str(batch), "--n-prompts", str(n), *prompts, *map(str, b.args),
                         "--json", str(out)])
    return cmds


def run_tags(spec: SweepSpec, plan: RunPlan) -> dict[str, str]:
    return {"sweep": spec.name, "study": spec.study, "match": spec.match.by,
            **{f"grid.{k}": str(v) for k, v in plan.grid.items()}}


def effective_eval(spec: SweepSpec, plan: RunPlan) -> dict:
    """The settings the eval stage runs with: the spec's eval block over the run's eval.*
    config (whose defaults are EvalConfig's). Logged as the stage's params."""
    e = spec.eval
    cfg = plan.eval
    return {"tasks": e.tasks if e.tasks is not None else list(cfg["tasks"]),
            "n_samples": e.n_samples if e.n_samples is not None else cfg["n_samples"],
            "temperatures": e.temperatures if e.temperatures is not None else list(cfg["temperatures"]),
            "args": list(map(str, e.args))}


def stage_params(spec: SweepSpec, plan: RunPlan, stage: str) -> dict[str, str]:
    """MLflow params of a stage: the effective settings it ran with (`stage.eval.*`, ...),
    a flag left unset shown as its default."""
    if stage == "eval":
        values = effective_eval(spec, plan)
    elif stage == "bench":
        b = spec.bench
        values = {"heads": b.heads if b.heads is not None else "decode-bench default (1, 2, 4, ..., n)",
                  "batch_sizes": b.batch_sizes or (list(b.n_prompts) if b.n_prompts else "decode-bench default (1, 16)"),
                  "max_new": b.max_new if b.max_new is not None else "decode-bench default",
                  "prompts": b.prompts if b.prompts is not None else "decode-bench default (code)",
                  "args": list(map(str, b.args))}
        if b.n_prompts is not None:
            values["n_prompts"] = [f"b{k}:{v}" for k, v in b.n_prompts.items()]
        if b.trees is not None:
            values["trees"] = tree_sizes(spec, plan) or "none (the model's heads fill or draft no tree asked for)"
            values["tree_fit_args"] = list(map(str, b.tree_fit_args))
    elif stage == "synth":
        values = {"task": spec.synth.task, "args": list(map(str, spec.synth.args))}
    else:
        return {}
    return {f"stage.{stage}.{k}": _fmt(v) if isinstance(v, list) else str(v) for k, v in values.items()}


def distributed(cmd: list[str], res: StageResources, *, rendezvous: list[str] | None = None) -> list[str]:
    """A training command on res.gpus processes per node under torchrun (DDP or FSDP2, as
    the run's train.parallel says); one process is the command as it is. `rendezvous`:
    torchrun's multi-node flags (the Slurm launcher's), else a standalone one-host run."""
    procs = max(res.gpus, 1)
    if procs == 1 and res.nodes == 1:
        return cmd
    i = cmd.index("-m")  # [python, -m, bytelm, train, ...]
    run = [cmd[0], "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    run += rendezvous if rendezvous is not None else ["--standalone", "--nnodes", "1"]
    return [*run, *cmd[i:]]
