"""The sweep spec: a YAML file (experiments/sweeps/*.yaml, docs/sweeps.md) read into typed
blocks. Every block is strict: an unknown key or a value of the wrong type stops with one
`UserError` that names it.

A stage gets a flag only for what its block sets; what it leaves out comes from the run's
own config (`eval:` from `EvalConfig`, through the run's `eval.*` keys) or from the stage
command's defaults, so that `set: {eval.n_samples: 20}` means 20.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bytelm.config import read_yaml_mapping
from bytelm.errors import UserError

STAGES = ("train", "synth", "eval", "bench")  # in the order they run
LAUNCHERS = ("local", "slurm")
# grid axis -> config key; any other axis is a dotted config key, or a name (like `size`)
# whose choices are mappings with a `set:` of overrides
SHORTCUTS = {"vocab": "data.tokenizer", "n": "model.n_future", "head_type": "model.head_type",
             "mtp_schedule": "train.mtp_schedule.kind", "seed": "train.seed"}
# how each axis appears in a default run name, in this order (others follow, then seed)
NAME_PARTS = {"size": "{}", "vocab": "{}", "n": "n{}", "head_type": "{}", "mtp_schedule": "{}"}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")  # a folder name that stays inside its parent


@dataclass
class Match:
    by: str = "none"  # none | bytes | flops
    target: float | None = None  # bytes of text, or training FLOPs
    reference: dict = field(default_factory=dict)  # or: the budget of the run with these grid values


@dataclass
class EvalBlock:
    """`bytelm eval` flags; None = the run's eval.* config (EvalConfig's defaults)."""
    tasks: list[str] | None = None
    n_samples: int | None = None
    temperatures: list[float] | None = None
    args: list[str] = field(default_factory=list)  # more flags, passed as they are


@dataclass
class BenchBlock:
    """`bytelm decode-bench` flags; None = decode-bench's own default."""
    heads: list[int] | None = None  # cut to the heads each model has
    batch_sizes: list[int] | None = None
    max_new: int | None = None
    prompts: list[str] | None = None  # one benchmark per prompt set
    # batch size -> prompts: one benchmark per batch size, each with its own prompt count
    # (e.g. 16 prompts at batch 1, a queue of 240 at batch 16); the batch sizes are its keys
    n_prompts: dict | None = None
    # trees of draft candidates (node counts, `--tree`): `bytelm tree-fit` runs first, for
    # the largest tree the model's heads allow; the counts a model's heads cannot fill are cut
    trees: list[int] | None = None
    tree_fit_args: list[str] = field(default_factory=list)  # more `bytelm tree-fit` flags
    args: list[str] = field(default_factory=list)


@dataclass
class SynthBlock:
    task: str = ""  # induction | poly
    args: list[str] = field(default_factory=list)


@dataclass
class Resources:
    """What one configuration needs. Training takes `gpus` on each of `nodes` (torchrun
    with that many processes per node); the other stages take one GPU on one node.
    `cpus` and `mem` are per stage job (a Slurm launcher asks for them; evaluation's
    sandboxes run on those cores). `time`: a limit per stage, in minutes or as Slurm's
    [D-]HH:MM:SS, one value for every stage or a mapping stage -> limit."""
    gpus: int = 1
    nodes: int = 1
    cpus: int = 0  # 0 = the launcher's default
    mem: str = ""  # e.g. 64G; "" = the launcher's default
    time: dict[str, str] = field(default_factory=dict)

    def for_stage(self, stage: str) -> "StageResources":
        train = stage == "train"
        return StageResources(gpus=self.gpus if train else min(self.gpus, 1), nodes=self.nodes if train else 1,
                              cpus=self.cpus, mem=self.mem, time=self.time.get(stage, ""))


@dataclass(frozen=True)
class StageResources:
    gpus: int  # per node
    nodes: int
    cpus: int
    mem: str
    time: str  # Slurm's time format, "" = no limit of the spec's own


@dataclass
class SlurmBlock:
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    gres: str = "gpu:{gpus}"  # {gpus}: the stage's GPUs per node; "" = ask for no gres
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH lines, e.g. --exclusive
    setup: str = ""  # shell lines run before each stage (module load, activate a venv)
    signal_s: int = 120  # how long before its time limit a stage is told to checkpoint and requeue


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
    eval: EvalBlock
    bench: BenchBlock
    synth: SynthBlock
    devices: str | list[str]
    run_name: str | None
    resources: Resources
    launcher: str
    slurm: SlurmBlock


# ----------------------------------------------------------------------------- typed blocks


def _check_type(value, hint, where: str):
    """`value` as the type `hint` (int, float, str, list[...], X | None), or a UserError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        (item,) = typing.get_args(hint)
        values = value if isinstance(value, list) else [value]  # a scalar is a list of one
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(values)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1.0e8 (no sign) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise UserError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def typed(cls, raw, where: str, base=None):
    """A dataclass from a mapping: unknown keys and wrong types are errors naming the key.
    `base`: an instance whose values the mapping's keys replace."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, raw)) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(names)})")
    values = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _time_limit(value, where: str) -> str:
    """Minutes (a number) or Slurm's [D-]HH:MM:SS / MM:SS, as Slurm's format."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        minutes = math.ceil(value)
        return f"{minutes // 60:d}:{minutes % 60:02d}:00"
    if isinstance(value, str) and re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", value.strip()):
        return value.strip()
    raise UserError(f"{where}: a time limit is minutes or [D-]HH:MM:SS, got {value!r}")


def parse_resources(raw, where: str, base: Resources) -> Resources:
    raw = dict(raw or {})
    time_raw = raw.pop("time", None)
    r = typed(Resources, raw, where, base)
    if time_raw is not None:
        if isinstance(time_raw, dict):
            bad = sorted(set(time_raw) - set(STAGES))
            if bad:
                raise UserError(f"{where}.time: unknown stage(s) {', '.join(bad)} (stages: {', '.join(STAGES)})")
            times = {**r.time, **{s: _time_limit(v, f"{where}.time.{s}") for s, v in time_raw.items()}}
        else:
            times = {s: _time_limit(time_raw, f"{where}.time") for s in STAGES}
        r = dataclasses.replace(r, time=times)
    for key in ("gpus", "nodes"):
        if getattr(r, key) < (0 if key == "gpus" else 1):
            raise UserError(f"{where}.{key} must be {'≥ 0' if key == 'gpus' else '≥ 1'}, got {getattr(r, key)}")
    if r.cpus < 0:
        raise UserError(f"{where}.cpus must be ≥ 0, got {r.cpus}")
    if r.mem and not re.fullmatch(r"\d+[KMGT]?", r.mem):
        raise UserError(f"{where}.mem must be like 64G (Slurm's --mem), got {r.mem!r}")
    return r


def _prompts_per_batch(raw: dict, batch_sizes: list[int] | None, where: str) -> dict[int, int]:
    """bench.n_prompts: a mapping batch size -> prompts, both integers ≥ 1; the batch sizes
    are its keys (bench.batch_sizes, if given too, must be the same)."""
    out = {}
    for b, n in raw.items():
        try:
            b, n = int(b), _check_type(n, int, f"{where}.{b}")
        except (TypeError, ValueError):
            raise UserError(f"{where}: keys are batch sizes (integers), got {b!r}") from None
        if b < 1 or n < 1:
            raise UserError(f"{where}: batch sizes and prompt counts must be ≥ 1, got {b}: {n}")
        out[b] = n
    if not out:
        raise UserError(f"{where} must map at least one batch size to its number of prompts")
    if batch_sizes is not None and sorted(batch_sizes) != sorted(out):
        raise UserError(f"{where} names batch sizes {sorted(out)} but bench.batch_sizes is {sorted(batch_sizes)}: "
                        "give one of them, or the same sizes in both")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- loading

SPEC_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - {"path"}


def _split_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`--set` items for the spec itself (slurm.*, resources.*, launcher) apart from the
    run config overrides."""
    import yaml

    spec_sets: dict = {}
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        top = key.split(".")[0].strip()
        if top in ("slurm", "resources", "launcher") and "=" in item:
            node = spec_sets
            parts = key.strip().split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        else:
            rest.append(item)
    return spec_sets, rest


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_spec(path: str | os.PathLike, overrides: list[str] = ()) -> SweepSpec:
    """The spec at `path`. `overrides`: `--set` items; those of slurm.*, resources.* and
    launcher change the spec (the rest are for the runs, see `run_overrides`)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep spec")
    spec_sets, _ = _split_overrides(list(overrides))
    raw = _merge(raw, spec_sets)
    where = f"sweep spec {path}"
    unknown = set(map(str, raw)) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("name", "base", "grid"):
        if key not in raw:
            raise UserError(f"{where}: missing key '{key}'")
    name = str(raw["name"])
    if not SAFE_NAME.fullmatch(name):
        raise UserError(f"{where}: name {name!r} must be a plain folder name (letters, digits, . _ + = -), "
                        "since it names the sweep's output folder")
    if not isinstance(raw["grid"], dict):
        raise UserError(f"{where}: grid must be a mapping of axes")
    base = (path.parent / str(raw["base"])).resolve()
    if not base.is_file():
        raise UserError(f"{where}: base config {base} not found")
    match = raw.get("match") or {}
    match = typed(Match, {"by": match} if isinstance(match, str) else match, f"{where}: match")
    if match.by not in ("none", "bytes", "flops"):
        raise UserError(f"{where}: match.by must be none, bytes or flops, got {match.by!r}")
    if match.by != "none" and (match.target is None) == (not match.reference):
        raise UserError(f"{where}: match.by={match.by} needs exactly one of match.target or match.reference")
    if match.target is not None and not match.target > 0:
        raise UserError(f"{where}: match.target must be > 0, got {match.target}")
    stages = _check_type(raw.get("stages", ["train"]), list[str], f"{where}: stages")
    bad = [s for s in stages if s not in STAGES]
    if bad or "train" not in stages:
        raise UserError(f"{where}: stages must include train and come from {', '.join(STAGES)}; got {stages}")
    ev = typed(EvalBlock, raw.get("eval"), f"{where}: eval")
    if ev.n_samples is not None and ev.n_samples < 1:
        raise UserError(f"{where}: eval.n_samples must be ≥ 1, got {ev.n_samples}")
    if ev.tasks is not None:
        from bytelm.evaluation.tasks import TASKS

        unknown_tasks = [t for t in ev.tasks if t not in TASKS]
        if unknown_tasks or not ev.tasks:
            raise UserError(f"{where}: eval.tasks {ev.tasks} must come from {', '.join(TASKS)}")
    if ev.temperatures is not None and (not ev.temperatures or any(t < 0 for t in ev.temperatures)):
        raise UserError(f"{where}: eval.temperatures must be a non-empty list of numbers ≥ 0")
    bench = typed(BenchBlock, raw.get("bench"), f"{where}: bench")
    for key in ("heads", "batch_sizes"):
        if getattr(bench, key) is not None and (not getattr(bench, key) or min(getattr(bench, key)) < 1):
            raise UserError(f"{where}: bench.{key} must be a non-empty list of integers ≥ 1")
    if bench.max_new is not None and bench.max_new < 1:
        raise UserError(f"{where}: bench.max_new must be ≥ 1, got {bench.max_new}")
    if bench.n_prompts is not None:
        bench.n_prompts = _prompts_per_batch(bench.n_prompts, bench.batch_sizes, f"{where}: bench.n_prompts")
    if bench.trees is not None and (not bench.trees or min(bench.trees) < 2):
        raise UserError(f"{where}: bench.trees must be a non-empty list of node counts ≥ 2 (the root and a candidate)")
    synth = typed(SynthBlock, raw.get("synth"), f"{where}: synth")
    if "synth" in stages and not synth.task:
        raise UserError(f"{where}: the synth stage needs synth: {{task: induction|poly}}")
    launcher = str(raw.get("launcher", "local"))
    if launcher not in LAUNCHERS:
        raise UserError(f"{where}: launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    return SweepSpec(
        path=path.resolve(), name=name, experiment=str(raw.get("experiment", name)),
        study=str(raw.get("study", "ablation")), base=base, set=dict(raw.get("set") or {}), grid=dict(raw["grid"]),
        include=list(raw.get("include") or []), match=match, stages=[s for s in STAGES if s in stages],
        eval=ev, bench=bench, synth=synth, devices=raw.get("devices", "auto"), run_name=raw.get("run_name"),
        resources=parse_resources(raw.get("resources"), f"{where}: resources", Resources()),
        launcher=launcher, slurm=typed(SlurmBlock, raw.get("slurm"), f"{where}: slurm"),
    )


def run_overrides(overrides: list[str]) -> list[str]:
    """The `--set` items meant for every run's config (not slurm.*, resources.*, launcher)."""
    return _split_overrides(list(overrides))[1]


# ----------------------------------------------------------------------------- the grid


def _config_key(axis: str) -> str | None:
    return SHORTCUTS.get(axis) or (axis if "." in axis else None)


@dataclass
class Choice:
    """One configuration of the grid: its axis values, config overrides and resources
    (as set by the grid choices that made it; None = the spec's)."""
    values: dict
    overrides: dict
    resources: dict = field(default_factory=dict)  # raw `resources:` keys, applied over the spec's
    base: str | None = None  # its own base config (relative to the spec file); None = the spec's


def _one_base(a: str | None, b: str | None, where: str) -> str | None:
    if a is not None and b is not None and a != b:
        raise UserError(f"sweep spec {where}: two grid choices give a configuration different base configs ({a}, {b})")
    return a if a is not None else b


def expand_grid(grid: dict, where: str = "grid") -> list[tuple[dict, dict]]:
    """All (grid values, config overrides) of a grid (see `expand_choices`)."""
    return [(c.values, c.overrides) for c in expand_choices(grid, where)]


def expand_choices(grid: dict, where: str = "grid") -> list[Choice]:
    """All configurations of a grid. An axis is a list of values (a scalar is a list of
    one), or a mapping from each value to a body: its `set:` overrides, its `resources:`,
    its `base:` config (e.g. one per model size) and any further axes (a sub-grid that
    applies to that value only)."""
    combos = [Choice({}, {})]
    for axis, spec in grid.items():
        key = _config_key(axis)
        options: list[Choice] = []
        if isinstance(spec, dict):
            for value, body in spec.items():
                body = dict(body or {})
                sets = dict(body.pop("set", None) or {})
                res = dict(body.pop("resources", None) or {})
                base = body.pop("base", None)
                base = None if base is None else str(base)
                if key:
                    sets[key] = value
                for sub in expand_choices(body, f"{where}.{axis}.{value}"):
                    options.append(Choice({axis: value, **sub.values}, {**sets, **sub.overrides},
                                          _merge(res, sub.resources), _one_base(base, sub.base, f"{where}.{axis}.{value}")))
        else:
            if key is None:
                raise UserError(
                    f"sweep spec {where}: axis '{axis}' is neither {', '.join(SHORTCUTS)} nor a dotted config key; "
                    f"give its choices as a mapping of name -> {{set: {{...}}}}"
                )
            for value in spec if isinstance(spec, list) else [spec]:
                options.append(Choice({axis: value}, {key: value}))
        if not options:
            raise UserError(f"sweep spec {where}: axis '{axis}' has no values")
        combos = [Choice({**a.values, **b.values}, {**a.overrides, **b.overrides}, _merge(a.resources, b.resources),
                         _one_base(a.base, b.base, f"{where}.{axis}"))
                  for a, b in itertools.product(combos, options)]
    return combos


def default_run_name(values: dict) -> str:
    parts = [fmt.format(values[a]) for a, fmt in NAME_PARTS.items() if a in values]
    parts += [f"{a.split('.')[-1]}{v}" for a, v in values.items() if a not in NAME_PARTS and a != "seed"]
    if "seed" in values:
        parts.append(f"s{values['seed']}")
    return "-".join(str(p) for p in parts) or "run"
