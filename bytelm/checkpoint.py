"""Checkpoints: one folder per saved step, written atomically.

    RUN_DIR/checkpoints/step_0000100/
        model.safetensors   every parameter, every head
        optim.pt            optimizer and LR-scheduler state (tensors and plain values)
        rng.pt              torch / CUDA / numpy / python RNG states (tensors and plain values)
        state.json          step, counters, best validation bits per byte, tokenizer
        config.yaml         the resolved RunConfig
        tokenizer.json      (BPE runs) a copy, so the checkpoint is self-contained
    RUN_DIR/checkpoints/best/   the same, for the best validation bits per byte

The last `train.keep_last` step folders are kept, plus `best`.

No object is unpickled: optim.pt and rng.pt are read with `torch.load(weights_only=True)`,
which builds tensors and plain containers only, so a checkpoint folder from someone else
cannot run code when a run resumes from it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: torch.load(weights_only=True) refuses numpy objects
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What checkpoints written before the RNG state held only tensors need besides (numpy's
# key array): numpy's array reconstruction, which makes arrays and nothing else.
_LEGACY_SAFE_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


def load_state_file(ckpt: Path, name: str, map_location: Any = "cpu") -> Any:
    """optim.pt or rng.pt of a checkpoint, read with weights_only=True (nothing in the
    file can run code); a missing, truncated or foreign file is a UserError naming it."""
    f = Path(ckpt) / name
    if not f.is_file():
        raise UserError(f"checkpoint {ckpt} has no {name}: it cannot be resumed (was it copied without it?)")
    try:
        with torch.serialization.safe_globals(_LEGACY_SAFE_GLOBALS):
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise UserError(f"refusing to load {f}: it holds objects other than tensors and plain values ({detail}); "
                        "bytelm does not run code from a checkpoint") from None
    except (RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
        raise UserError(f"checkpoint file {f} is corrupt or truncated: {str(e).splitlines()[0][:200]}") from None


def _write_failed(e: Exception, path: Path) -> OSError:
    """torch.save and safetensors report a full disk as RuntimeError("unexpected pos")
    or SafetensorError("... (os error 28)"): the OSError it was, naming the file."""
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
    else:
        st = os.statvfs(path.parent)
        code = errno.ENOSPC if st.f_bavail * st.f_frsize < (1 << 20) else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _save_torch(obj: Any, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        raise _write_failed(e, path) from None


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
    with atomic_path(target, marker="state.json", stale_prefix="step_" if STEP_DIR.match(name) else None) as tmp:
        tmp.mkdir()
        model_sd = model if isinstance(model, dict) else model.state_dict()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items()}
        try:
            save_file(tensors, str(tmp / "model.safetensors"))
        except Exception as e:  # SafetensorError: an I/O error as text
            raise _write_failed(e, tmp / "model.safetensors") from None
        if optimizer is not None:
            optim_sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
            _save_torch({"optimizer": optim_sd, "scheduler": scheduler.state_dict() if scheduler else None}, tmp / "optim.pt")
        _save_torch(rng_state(), tmp / "rng.pt")
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
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable state.json: {e}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"checkpoint {ckpt}: state.json has no valid step (a whole number >= 0), got {step!r}")
    return state


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
