"""Typed, strict run configuration.

Precedence (lowest first): the dataclass defaults below, a YAML file, dotted command-line
overrides (`--set model.n_future=8`). OmegaConf's structured configs do the merging and
the type checks; an unknown key, a value of the wrong type or an impossible value stops
with one `UserError` that names the key. The resolved config is written next to every
output that came from it (`save_config`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING re-exported for configs)
from omegaconf.errors import OmegaConfBaseException

from bytelm.errors import UserError
from bytelm.fileio import write_text

HEAD_TYPES = ("transformer", "linear", "unembed", "sequential")
SCHEDULES = ("constant", "forward", "reverse", "linear", "cosine")
TOKENIZERS = ("bytes", "bpe")
PARALLEL = ("ddp", "fsdp")


@dataclass
class DataConfig:
    # A prepared corpus folder (output of `bytelm prepare`); shards are read from
    # <root>/<tokenizer>/{train,val}.
    root: str = "data/smoke"
    tokenizer: str = "bytes"  # bytes | bpe


@dataclass
class ModelConfig:
    # Total transformer blocks of the n=1 model. With transformer heads and
    # match_params=true the trunk keeps n_layers - n_future blocks and each head is one
    # block (the paper's parameter matching, §3); with match_params=false the trunk
    # keeps n_layers - 1 blocks and the n-1 extra head blocks are added on top.
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (no grouped-query attention)
    ffn_hidden: int = 0  # 0 = 8/3 * d_model rounded up to a multiple of 64 (SwiGLU)
    context: int = 256
    vocab_size: int = 0  # 0 = taken from the tokenizer of the data
    n_future: int = 1
    head_type: str = "transformer"  # transformer | linear | unembed | sequential
    match_params: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02


@dataclass
class MTPScheduleConfig:
    """Each head's loss weight as a function of the step (bytelm/mtp_schedule.py,
    docs/training.md): w_i(s) = loss_weights_i · f_i(s) · (extra_scale for heads 2..n),
    where s counts the optimizer steps done before the step (0 for the first)."""

    kind: str = "constant"  # constant | forward | reverse | linear | cosine
    # forward / reverse: the number of heads trained (1..n, heads 1..k) in each of
    # len(stages) equal stages over the first `share` of train.steps; the last stage's count
    # holds after that. Empty: forward 1, 2, ..., n; reverse n, ..., 2, 1.
    stages: list[int] = field(default_factory=list)
    # forward / reverse: the share of training the stages span; linear / cosine: the share
    # the ramp spans (the extra heads' factor goes from `start` at step 0 to `end` at step
    # share · train.steps, and stays at `end` after).
    share: float = 1.0
    start: float = 1.0
    end: float = 0.0
    # Multiplies the loss weight of every head but the next-token head, at every step
    # (Megatron's mtp_loss_scaling_factor; DeepSeek-V3's λ).
    extra_scale: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global batch, in sequences of model.context tokens
    micro_batch_size: int = 0  # 0 = batch_size / world size (no accumulation)
    lr: float = 3e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.03  # cosine decays to this fraction of the peak (paper: 3%)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    loss_weights: list[float] = field(default_factory=list)  # empty = 1 per head
    mtp_schedule: MTPScheduleConfig = field(default_factory=MTPScheduleConfig)
    loss_mode: str = "memory_efficient"  # memory_efficient | naive
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16
    compile: str = "auto"  # auto (on GPU) | true | false
    # Several processes (torchrun): ddp = every process holds the whole model and
    # gradients are all-reduced; fsdp = FSDP2 (torch.distributed.fsdp.fully_shard) shards
    # parameters, gradients and optimizer state over the processes (one unit per
    # transformer block, plus the rest). Same global batch, data order and losses either
    # way; a single process ignores it.
    parallel: str = "ddp"  # ddp | fsdp
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_last: int = 2
    # Stop after this many seconds from the command's start (0 = no limit; startup, data,
    # compilation and evaluations count): the run then evaluates, checkpoints and ends
    # cleanly, so a later command resumes it. Leave a margin for that last evaluation.
    time_limit_s: float = 0.0


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"])
    n_samples: int = 200
    temperatures: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    top_p: float = 0.95
    max_new_tokens: int = 0  # 0 = each task's budget (docs/evaluation.md)
    batch_size: int = 64
    # heads used to sample: 0 = min(n_future, 8), i.e. self-speculative sampling with the
    # model's heads (exact: the same distribution as plain sampling, docs/decoding.md);
    # 1 = plain sampling
    heads: int = 0
    timeout_s: float = 10.0
    workers: int = 0  # 0 = all cores
    apps_path: str = ""  # the full APPS test set (see docs/evaluation.md)
    apps_difficulty: str = "introductory"
    data_dir: str = ""  # "" = $BYTELM_DATA_DIR or ../shared/data


@dataclass
class TrackingConfig:
    experiment: str = "bytelm"
    run_name: str = ""
    mlflow: bool = True  # false: only the run directory (import later with `bytelm track import`)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} is not KEY=VALUE (e.g. --set model.n_future=8)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _omegaconf_error(e: OmegaConfBaseException) -> UserError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if key:
        return UserError(f"config key '{key}': {msg}")
    return UserError(f"config: {msg}")


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict:
    """A YAML file that must hold a mapping, with one clear error otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {p} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {p} must hold a mapping at the top level")
    return raw


def _resolve(layers: list[dict]) -> RunConfig:
    """Dataclass defaults merged with each layer in turn, strictly, then validated."""
    try:
        merged = OmegaConf.structured(RunConfig)
        for layer in layers:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    cfg.train.compile = str(cfg.train.compile).lower()  # YAML's `true` arrives as "True"; the field is a string
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults ← YAML file ← dotted overrides, then `validate`."""
    layers = [read_yaml_mapping(path)] if path is not None else []
    for item in overrides or []:
        key, value = _parse_override(item)
        node: dict = {}
        cur = node
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        layers.append(node)
    return _resolve(layers)


def config_from_dict(d: dict) -> RunConfig:
    """A RunConfig from a plain dict (e.g. a checkpoint's saved config), strictly."""
    return _resolve([d])


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_future': 8}} -> {'model.n_future': 8} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------- checks


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise UserError(f"config key '{key}': {msg}")


def trunk_layers(m: ModelConfig) -> int:
    """Blocks in the shared trunk (see ModelConfig.n_layers)."""
    if m.head_type == "transformer":
        return m.n_layers - (m.n_future if m.match_params else 1)
    if m.head_type == "sequential":  # head 1 reads the trunk; heads 2..n hold one block each
        return m.n_layers - (m.n_future - 1 if m.match_params else 0)
    return m.n_layers


def _validate_schedule(s: MTPScheduleConfig, n: int) -> None:
    key = "train.mtp_schedule"
    _require(s.kind in SCHEDULES, f"{key}.kind", f"must be one of {', '.join(SCHEDULES)}, got {s.kind!r}")
    bad = [k for k in s.stages if not 1 <= k <= n]
    _require(not bad, f"{key}.stages", f"asks for {bad[0] if bad else 0} heads but the model has model.n_future={n} "
             "(each stage trains heads 1..k, 1 <= k <= n)")
    _require(not s.stages or s.kind in ("forward", "reverse"), f"{key}.stages", "applies to kind forward or reverse only")
    _require(0 < s.share <= 1, f"{key}.share", f"must be in (0, 1], got {s.share}")
    for name in ("start", "end", "extra_scale"):
        _require(getattr(s, name) >= 0, f"{key}.{name}", f"a weight must be >= 0, got {getattr(s, name)}")


def validate(cfg: RunConfig) -> None:
    m, t, d, e = cfg.model, cfg.train, cfg.data, cfg.eval
    _require(d.tokenizer in TOKENIZERS, "data.tokenizer", f"must be one of {', '.join(TOKENIZERS)}, got {d.tokenizer!r}")
    _require(m.n_future >= 1, "model.n_future", f"must be >= 1, got {m.n_future}")
    _require(m.head_type in HEAD_TYPES, "model.head_type", f"must be one of {', '.join(HEAD_TYPES)}, got {m.head_type!r}")
    _require(m.n_layers >= 1, "model.n_layers", f"must be >= 1, got {m.n_layers}")
    _require(m.head_type != "sequential" or m.n_future >= 2, "model.n_future",
             "sequential heads need model.n_future >= 2 (head 1 is the trunk's own next-token head; "
             "each further head is one sequential module)")
    _require(
        trunk_layers(m) >= 1,
        "model.n_future",
        f"{m.n_future} {m.head_type} heads need more than {m.n_layers} layers when model.match_params=true "
        f"(the trunk would keep {trunk_layers(m)} blocks); raise model.n_layers or lower model.n_future",
    )
    _require(m.d_model >= 1 and m.n_heads >= 1, "model.d_model", "d_model and n_heads must be >= 1")
    _require(m.d_model % m.n_heads == 0, "model.n_heads", f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "the head dimension must be even (rotary embeddings)")
    kv = m.n_kv_heads or m.n_heads
    _require(m.n_heads % kv == 0, "model.n_kv_heads", f"n_heads={m.n_heads} is not a multiple of n_kv_heads={kv}")
    _require(m.context >= 2, "model.context", f"must be >= 2, got {m.context}")
    _require(m.context > m.n_future, "model.context", f"must exceed model.n_future={m.n_future}")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
    _require(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    _require(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    _require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
    _require(
        not t.loss_weights or len(t.loss_weights) == m.n_future,
        "train.loss_weights",
        f"has {len(t.loss_weights)} weights for {m.n_future} heads (leave it empty for 1 per head)",
    )
    _require(all(w >= 0 for w in t.loss_weights), "train.loss_weights", "weights must be >= 0")
    _validate_schedule(t.mtp_schedule, m.n_future)
    _require(t.loss_mode in ("memory_efficient", "naive"), "train.loss_mode", "must be memory_efficient or naive")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    _require(t.dtype in ("auto", "float32", "bfloat16"), "train.dtype", "must be auto, float32 or bfloat16")
    _require(t.compile in ("auto", "true", "false"), "train.compile", f"must be auto, true or false, got {t.compile!r}")
    _require(t.parallel in PARALLEL, "train.parallel", f"must be one of {', '.join(PARALLEL)}, got {t.parallel!r}")
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_last", "eval_batches"):
        _require(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    _require(e.n_samples >= 1, "eval.n_samples", "must be >= 1")
    _require(all(x >= 0 for x in e.temperatures), "eval.temperatures", "must be >= 0")
    _require(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")
    _require(e.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0 (0 = each task's budget)")
