"""Checkpoints: one folder per saved step, written atomically.

    RUN_DIR/checkpoints/step_0000100/
        model.safetensors   every parameter, every head
        optim.pt            optimizer and LR-scheduler state
        rng.pt              torch / CUDA / numpy / python RNG states
        state.json          step, counters, best validation bits per byte, tokenizer
        config.yaml         the resolved RunConfig
        tokenizer.json      (BPE runs) a copy, so the checkpoint is self-contained
    RUN_DIR/checkpoints/best/   the same, for the best validation bits per byte

The last `train.keep_last` step folders are kept, plus `best`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bytelm.config import RunConfig, config_from_dict, save_config
from bytelm.errors import UserError
from bytelm.fileio import atomic_path
from bytelm.model import MTPTransformer
from bytelm.tokenizers import Tokenizer, load_tokenizer

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step folders of a run, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(steps)]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    name: str,
    model: MTPTransformer | dict,
    cfg: RunConfig,
    tokenizer: Tokenizer,
    state: dict,
    optimizer: torch.optim.Optimizer | dict | None = None,
    scheduler: Any = None,
) -> Path:
    """`model` and `optimizer` are the modules or their (full, unsharded) state dicts, as
    FSDP training gathers them (bytelm.train.full_state_dicts)."""
    from safetensors.torch import save_file

    target = checkpoints_dir(run_dir) / name
    with atomic_path(target) as tmp:
        tmp.mkdir()
        model_sd = model if isinstance(model, dict) else model.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        if optimizer is not None:
            optim_sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict() if scheduler else None}, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "state.json").write_text(json.dumps({**state, "tokenizer": tokenizer.describe()}, indent=2, sort_keys=True))
        if tokenizer.kind == "bpe":
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
    return target


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest step) or a checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if (p / "model.safetensors").is_file():
        return p
    steps = list_checkpoints(p)
    if steps:
        return steps[-1]
    if (checkpoints_dir(p) / "best" / "model.safetensors").is_file():
        return checkpoints_dir(p) / "best"
    raise UserError(f"{p} holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable state.json: {e}") from None


def checkpoint_step(path: str | Path) -> int:
    """The training step of a checkpoint folder, or of a run directory's latest checkpoint."""
    return read_state(resolve_checkpoint(path))["step"]


def load_config(ckpt: Path) -> RunConfig:
    try:
        raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable config.yaml: {e}") from None
    return config_from_dict(raw)


def load_weights(model: MTPTransformer, ckpt: Path) -> None:
    """Loads model.safetensors strictly: a missing or extra tensor (a head the model
    does not have, or one the checkpoint lacks) is an error that names it."""
    from safetensors.torch import load_file

    f = ckpt / "model.safetensors"
    try:
        tensors = load_file(str(f))
    except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
        raise UserError(f"checkpoint weights {f} are corrupt or truncated: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(
            f"checkpoint {ckpt} does not match the model (n_future={model.n_future}, head_type={model.cfg.head_type}): "
            f"missing {missing[:6]}{'…' if len(missing) > 6 else ''}, unexpected {extra[:6]}{'…' if len(extra) > 6 else ''}"
        )
    bad = [k for k, v in tensors.items() if v.shape != expected[k].shape]
    if bad:
        raise UserError(f"checkpoint {ckpt}: tensors of the wrong shape: {bad[:6]}")
    model.load_state_dict(tensors, strict=True)


def load_tokenizer_of(ckpt: Path) -> Tokenizer:
    kind = read_state(ckpt).get("tokenizer", {}).get("kind", "bytes")
    return load_tokenizer(kind, ckpt / "tokenizer.json" if kind == "bpe" else None)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MTPTransformer, Tokenizer, RunConfig]:
    """Model (eval mode), tokenizer and config of a run directory or checkpoint folder."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt)
    model = MTPTransformer(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), load_tokenizer_of(ckpt), cfg


def run_dir_of(path: str | Path) -> Path:
    """The run directory a checkpoint path belongs to."""
    ckpt = resolve_checkpoint(path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
