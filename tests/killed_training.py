"""A `bytelm train` killed with SIGKILL mid-run and started again: the one helper of the
exact-resume tests (test_train, test_mtp_schedule).

    kill_and_resume(SMOKE, tmp_path / "killed", overrides, after=12, before=30)

The kill must land between two steps of the run: after `after` (a checkpoint is written by
then) and before `before` (the rest of the run is what the resume is tested on). Where
it lands is up to the scheduler: the trainer may run on past `before` between the
poll that sees step `after` and the kill (a loaded machine can hold the test process back
for seconds). Such a try tested nothing, so it is made again in a fresh run directory:
the outcome does not depend on the machine's speed or load.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bytelm import checkpoint as ckpt
from bytelm.fileio import read_jsonl

TRIES = 3
WAIT_S = 300  # for the trainer to reach step `after`: far above its start-up even on a loaded machine


def logged_steps(run_dir: Path) -> list[int]:
    """The training steps in metrics.jsonl, read while the trainer may be appending."""
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl", appending=True) if "loss" in r]


def kill_and_resume(config: Path, run_dir: Path, overrides: list[str], *, after: int, before: int) -> None:
    """Runs `bytelm train --config config --run-dir run_dir --set ...` as a subprocess,
    SIGKILLs it once it has logged step `after` and saved a checkpoint, checks that the
    kill came before step `before`, then runs the same command again to its end."""
    cmd = [sys.executable, "-m", "bytelm", "train", "--config", str(config), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    for _ in range(TRIES):
        log = run_dir.parent / f"{run_dir.name}.stderr"  # a file, not a pipe nobody reads while it runs
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, cwd=run_dir.parent)
        try:
            deadline = time.monotonic() + WAIT_S
            while not (max(logged_steps(run_dir), default=0) >= after and ckpt.list_checkpoints(run_dir)):
                if proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, f"the trainer did not reach step {after} in {WAIT_S} s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert rc in (0, -signal.SIGKILL), f"the trainer failed (exit {rc}): {log.read_text()[-3000:]}"
        killed_at = max(logged_steps(run_dir), default=0)
        if rc == -signal.SIGKILL and killed_at < before:
            break
        shutil.rmtree(run_dir)  # a try that missed its window (the test's own folder): again from scratch
    else:
        raise AssertionError(f"in {TRIES} tries the kill never landed before step {before}")
    assert ckpt.list_checkpoints(run_dir)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=run_dir.parent)
