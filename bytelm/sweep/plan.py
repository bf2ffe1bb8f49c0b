"""The plan: every configuration of a spec as a run, with its overrides, resources and
training budget, and the matching rule that gives the arms equal bytes or FLOPs."""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bytelm.config import load_config, to_dict
from bytelm.errors import UserError
from bytelm.sweep.spec import SAFE_NAME, Choice, Match, Resources, SweepSpec, default_run_name, expand_choices, \
    parse_resources


@dataclass
class RunPlan:
    name: str
    grid: dict
    overrides: list[str]  # KEY=VALUE for `bytelm train --set`, in order
    n_future: int
    steps: int
    data_root: str
    base: str = ""  # the base config `bytelm train --config` reads (the spec's, or its grid choice's)
    head_type: str = ""  # model.head_type: trees need heads that all read the trunk (not sequential)
    resources: Resources = field(default_factory=Resources)
    eval: dict = field(default_factory=dict)  # the run's eval.* config (what `bytelm eval` reads)
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


def _choices(spec: SweepSpec) -> list[tuple[Choice, str | None]]:
    """The grid's configurations and then the includes', each with its name if it has one."""
    out: list[tuple[Choice, str | None]] = [(c, None) for c in expand_choices(spec.grid)]
    for i, entry in enumerate(spec.include):
        if not isinstance(entry, dict):
            raise UserError(f"sweep spec: include[{i}] must be a mapping of axis values (and set:, resources:, name:)")
        entry = dict(entry)
        name = entry.pop("name", None)
        sets = dict(entry.pop("set", None) or {})
        res = dict(entry.pop("resources", None) or {})
        base = entry.pop("base", None)
        expanded = expand_choices(entry, f"include[{i}]")
        if len(expanded) != 1:
            raise UserError(f"sweep spec: include[{i}] must name one configuration (one value per axis)")
        c = expanded[0]
        base = c.base if base is None else str(base)
        out.append((Choice(c.values, {**c.overrides, **sets}, {**c.resources, **res}, base), name))
    return out


def plan_sweep(spec: SweepSpec, cli_overrides: list[str] = (), only: str | None = None) -> list[RunPlan]:
    """Every run of the spec, checked (`load_config`) before anything runs. `cli_overrides`:
    `--set` items for every run's config."""
    plans: list[RunPlan] = []
    for choice, name in _choices(spec):
        values = choice.values
        name = name or (spec.run_name.format(**{k.replace(".", "_"): v for k, v in values.items()})
                        if spec.run_name else default_run_name(values))
        name = str(name)
        if not SAFE_NAME.fullmatch(name):
            raise UserError(f"sweep spec: run name {name!r} must be a plain folder name (letters, digits, . _ + = -)")
        items = [f"{k}={v}" for k, v in {**spec.set, **choice.overrides}.items()] + list(cli_overrides)
        base = spec.base if choice.base is None else (spec.path.parent / choice.base).resolve()
        if not base.is_file():
            raise UserError(f"sweep run {name}: base config {base} not found")
        try:
            cfg = load_config(base, items)
        except UserError as e:
            raise UserError(f"sweep run {name}: {e}") from None
        resources = parse_resources(choice.resources, f"sweep run {name}: resources", spec.resources)
        plan = RunPlan(name=name, grid=values, overrides=items, n_future=cfg.model.n_future, head_type=cfg.model.head_type, steps=cfg.train.steps,
                       data_root=cfg.data.root, base=str(base), resources=resources, eval=to_dict(cfg)["eval"],
                       tokens_per_step=cfg.train.batch_size * cfg.model.context)
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
    apply_match(spec.match, plans)
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


def apply_match(match: Match, plans: list[RunPlan]) -> None:
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
        if not target > 0:
            raise UserError(f"match.reference {match.reference}: run {refs[0].name} has a budget of {target} "
                            f"(train.steps={refs[0].steps}); the target must be > 0")
    for p in plans:
        p.steps = math.ceil(float(target) / _per_step(p, match.by))
        p.overrides.append(f"train.steps={p.steps}")

