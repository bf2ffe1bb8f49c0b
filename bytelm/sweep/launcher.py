"""The launcher interface: given the stages of each configuration, with the commands and
resources they need, run them (or hand them to a scheduler) and report their states.

A configuration's stages run in order, each only after the one before it succeeded.
Each stage is one `python -m bytelm.sweep.job JOB.json` process (bytelm/sweep/job.py),
which runs the stage's commands and writes its marker, so launchers differ only in where
and when that process runs: `local` (bytelm/sweep/local.py) on this host, packing
configurations onto its GPUs; `slurm` (bytelm/sweep/slurm.py) as one Slurm job per stage,
each depending on the one before (`afterok`).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from bytelm.sweep.spec import StageResources
from bytelm.sweep.stages import distributed
from bytelm.sweep.state import stage_state

# What a launcher reports for a stage. Local: not run, running, finished, stopped,
# failed. A scheduler adds queued (waiting for resources or for the stage before it).
STATES = ("not run", "queued", "running", "finished", "stopped", "failed", "skipped")


@dataclass
class StageJob:
    stage: str
    job_file: Path  # read by `python -m bytelm.sweep.job`
    resources: StageResources
    log: Path
    commands: list[list[str]]  # what the job runs, in turn (also in job_file)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bytelm.sweep.job", str(self.job_file)]


@dataclass
class ConfigJobs:
    """One configuration: its run directory and the stages to run now, in order."""
    name: str
    run_dir: Path
    stages: list[StageJob]

    @property
    def gpus(self) -> int:
        """The GPUs this configuration holds on one host while its stages run."""
        return max((s.resources.gpus for s in self.stages), default=0)


class Launcher(ABC):
    name: str
    waits = True  # launch() returns when the stages have ended (a scheduler's returns once they are queued)
    expand_env = False  # whether a job expands ${VAR} in its commands (variables of a scheduler's job)

    def train_command(self, cmd: list[str], res: StageResources) -> list[str]:
        """The training command for these resources: torchrun for several processes."""
        return distributed(cmd, res)

    @abstractmethod
    def check(self, configs: list[ConfigJobs]) -> None:
        """Raise UserError for what cannot run here (more GPUs than a host has, a missing
        scheduler), before anything is started or submitted."""

    @abstractmethod
    def launch(self, configs: list[ConfigJobs]) -> dict[str, dict[str, str]]:
        """Run (local) or submit (a scheduler) the stages; return each configuration's
        stage states after this call: run name -> stage -> state."""

    def states(self, config: ConfigJobs) -> dict[str, str]:
        """Each stage's state now, from the run directory's markers (a scheduler adds
        its jobs' queue states)."""
        return {s.stage: stage_state(config.run_dir, s.stage) for s in config.stages}

    def cancel(self, configs: list[ConfigJobs]) -> list[str]:
        """Stop what this launcher started for these configurations; the ids stopped."""
        return []
