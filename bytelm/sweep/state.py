"""Stage state: what a run directory says about each stage.

A stage that ends writes `stages/<stage>.json` (status finished | failed, the checkpoint
step it read, seconds, where it ran). Training also counts as done when the trainer's
`status.json` says finished. An evaluation stage (synth, eval, bench) counts as done only
for the checkpoint step it read: once training goes on, it runs again on the newer
checkpoint. Launchers that hand stages to a scheduler keep its job ids beside the markers
(`jobs/<stage>.json`, see bytelm/sweep/slurm.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from bytelm.errors import UserError
from bytelm.fileio import write_json


def marker_path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / f"{stage}.json"


def read_marker(run_dir: Path, stage: str) -> dict:
    p = marker_path(run_dir, stage)
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:  # written by rename: only a hand-edited file gets here
        return {}


def write_marker(run_dir: Path, stage: str, status: str, *, step: int | None, seconds: float, where: str,
                 error: str | None = None) -> None:
    write_json(marker_path(run_dir, stage),
               {"status": status, "error": error, "seconds": seconds, "device": where, "step": step})


def train_status(run_dir: Path) -> str | None:
    """The trainer's status.json: running, finished, stopped (its time limit), failed, killed."""
    status = run_dir / "status.json"
    try:
        return json.loads(status.read_text()).get("status") if status.is_file() else None
    except json.JSONDecodeError:
        return None


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
    record = read_marker(run_dir, stage)
    if stage == "train":
        # trained before the sweep knew of it (or its marker was lost)
        return record.get("status") == "finished" or train_status(run_dir) == "finished"
    return record.get("status") == "finished" and record.get("step") == evaluated_step(run_dir)


def output_exists(cmd: list[str], step: int | None) -> bool:
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


def stage_state(run_dir: Path, stage: str) -> str:
    """finished | stopped (training at its time limit) | failed | not run, from the files."""
    if stage_done(run_dir, stage):
        return "finished"
    record = read_marker(run_dir, stage)
    if record.get("status") == "failed":
        return "failed"
    if stage == "train" and train_status(run_dir) == "stopped":
        return "stopped"
    return "not run"
