"""Where things live: the repository checkout, its configs, and the benchmark data.

The suite never copies HumanEval, MBPP, APPS or the stories sample into the project: it
finds them through a data directory, in this order: an explicit argument (a `--data-dir`
flag), the environment variable BYTELM_DATA_DIR, then `../shared/data` relative to the
current directory or to the repository checkout, when it exists.

Run configs and sweep specs are YAML files under `experiments/` (`config_path`), found
from the package's own location, so that the library never imports that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from bytelm.errors import UserError

ENV_VAR = "BYTELM_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The TinyStories sample of the data directory: stories end with STORY_SEPARATOR.
STORIES = "stories/tinystories_v2_gpt4_train_first2MiB.txt"
STORY_SEPARATOR = "<|endoftext|>"


def config_path(relative: str) -> Path:
    """A run config or sweep spec shipped under experiments/, e.g. "sweeps/smoke.yaml"."""
    p = REPO_ROOT / "experiments" / relative
    if not p.is_file():
        raise UserError(f"{p} not found: the experiments/ folder of the bytelm checkout holds the configs")
    return p


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        p = Path(explicit)
        if not p.is_dir():
            raise UserError(f"data directory {p} does not exist (from --data-dir)")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env)
        if not p.is_dir():
            raise UserError(f"data directory {p} does not exist (from ${ENV_VAR})")
        return p
    for cand in (Path.cwd() / ".." / "shared" / "data", REPO_ROOT.parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    raise UserError(
        "no benchmark data directory found: pass --data-dir DIR or set "
        f"${ENV_VAR} to a folder holding humaneval/, mbpp/, stories/ (see docs/data.md)"
    )


def data_file(relative: str, explicit: str | os.PathLike | None = None) -> Path:
    """A file inside the data directory, with a clear error when it is absent."""
    root = data_dir(explicit)
    p = root / relative
    if not p.exists():
        raise UserError(f"{p} not found in the data directory {root}")
    return p
