"""The `local` launcher: stages as processes on this host.

Configurations start in plan order, each as soon as the host has the GPUs it asks for
(`resources.gpus`): two 2-GPU runs share a 4-GPU box. The device list is a list of slots:
a GPU named twice (`cuda:0,cuda:0`) takes two configurations at once. On CPU one
configuration runs at a time; its `gpus` is then the number of torchrun processes.
A configuration keeps its devices for all its stages; training on several of them runs
under torchrun. One loop in this process starts the stages, polls them, and prints
progress: no threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bytelm.errors import UserError
from bytelm.sweep.job import STOPPED, die_with_parent
from bytelm.sweep.launcher import ConfigJobs, Launcher, StageJob
from bytelm.sweep.progress import Progress
from bytelm.sweep.state import last_error, read_marker, stage_done

POLL_S = 0.5


def resolve_devices(devices: str | list[str]) -> list[str]:
    if isinstance(devices, str):
        if devices == "auto":
            n = visible_gpus()
            return [f"cuda:{i}" for i in range(n)] or ["cpu"]
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    devices = [str(d) for d in devices]
    for d in devices:
        if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise UserError(f"device {d!r} is not cpu or cuda:N")
    if not devices:
        raise UserError("devices: the list is empty (cpu, auto, or cuda:0,cuda:1,...)")
    if "cpu" in devices and len(devices) > 1:
        raise UserError("devices: cpu runs one configuration at a time; list either cpu or cuda:N devices")
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    for d in devices:
        if d != "cpu" and visible and int(d[5:]) >= len(visible):
            raise UserError(f"device {d}: CUDA_VISIBLE_DEVICES={','.join(visible)} holds {len(visible)} GPU(s)")
    return devices


def visible_gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    n = sum(1 for line in r.stdout.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return min(n, len([v for v in visible.split(",") if v.strip()])) if visible is not None else n


def device_env(devices: list[str]) -> dict[str, str]:
    """A stage sees only its GPUs, as cuda:0.. (or none on CPU). cuda:i is the i-th GPU
    this process sees, so it counts within a CUDA_VISIBLE_DEVICES the sweep was started with."""
    gpus = [d for d in devices if d != "cpu"]
    if not gpus:
        return {"CUDA_VISIBLE_DEVICES": ""}
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = [int(d.split(":")[1]) for d in gpus]
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible[i] if visible else str(i) for i in ids)}


@dataclass
class Running:
    config: ConfigJobs
    devices: list[str]  # the slots it holds
    index: int = -1  # its stage now
    proc: subprocess.Popen | None = None
    started: float = 0.0
    states: dict[str, str] = field(default_factory=dict)


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, devices: list[str], log=print, progress_every_s: float = 30.0, progress: Progress | None = None):
        self.slots = devices
        self.log = log
        self.progress_every_s = progress_every_s
        self.progress = progress
        self.gpus = sorted({d for d in devices if d != "cpu"})

    def check(self, configs: list[ConfigJobs]) -> None:
        for c in configs:
            for s in c.stages:
                if s.resources.nodes > 1:
                    raise UserError(f"run {c.name}: resources.nodes={s.resources.nodes} needs a cluster "
                                    "(launcher: slurm); the local launcher runs on this host only")
            if self.gpus and c.gpus > len(self.gpus):
                raise UserError(f"run {c.name}: resources.gpus={c.gpus}, and this host's devices are "
                                f"{', '.join(self.gpus)} ({len(self.gpus)} GPU(s))")

    def _take(self, free: list[str], gpus: int) -> list[str] | None:
        """Slots for a configuration that needs `gpus` distinct GPUs (CPU: the one slot)."""
        if self.slots == ["cpu"]:
            return list(free) if free else None
        taken: list[str] = []
        for d in free:
            if d not in taken and len(taken) < max(gpus, 1):
                taken.append(d)
        return taken if len(taken) == max(gpus, 1) else None

    def _start_next_stage(self, r: Running) -> bool:
        """Start r's next stage that is not done; False when none is left."""
        while True:
            r.index += 1
            if r.index >= len(r.config.stages):
                return False
            s = r.config.stages[r.index]
            if stage_done(r.config.run_dir, s.stage):
                r.states[s.stage] = "skipped"
                continue
            break
        devices = r.devices[:max(s.resources.gpus, 1)] if self.slots != ["cpu"] else r.devices
        env = {**os.environ, **device_env(devices)}
        r.proc = subprocess.Popen(s.command(), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=die_with_parent)
        r.started = time.time()
        r.states[s.stage] = "running"
        where = "cpu" if self.slots == ["cpu"] else ",".join(devices)
        procs = f", {s.resources.gpus} processes (torchrun)" if s.resources.gpus > 1 else ""
        self.log(f"{r.config.name}: {s.stage} started on {where}{procs} (log: {s.log})")
        if self.progress:
            self.progress.started(r.config.name, s.stage)
        return True

    def _finish_stage(self, r: Running, rc: int) -> bool:
        """Record the stage that ended; True when the configuration goes on to its next stage."""
        s: StageJob = r.config.stages[r.index]
        seconds = time.time() - r.started
        if self.progress:
            self.progress.ended(r.config.name, s.stage, seconds)
        if rc == 0:
            r.states[s.stage] = "finished"
            self.log(f"{r.config.name}: {s.stage} finished in {seconds:.0f} s")
            return True
        if rc == STOPPED:
            r.states[s.stage] = "stopped"
            self.log(f"{r.config.name}: {s.stage} stopped after {seconds:.0f} s (a time limit); "
                     "run the sweep again to resume it")
            return False
        r.states[s.stage] = "failed"
        error = read_marker(r.config.run_dir, s.stage).get("error") or f"exited with {rc}: {last_error(s.log)}"
        self.log(f"{r.config.name}: {s.stage} FAILED after {seconds:.0f} s: {error}")
        return False

    def launch(self, configs: list[ConfigJobs]) -> dict[str, dict[str, str]]:
        states = {c.name: {s.stage: "not run" for s in c.stages} for c in configs}
        pending = list(configs)
        running: list[Running] = []
        free = list(self.slots)
        stop: list[int] = []

        def on_signal(signum, frame):
            stop.append(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last_report = time.time()
        try:
            while (pending or running) and not stop:
                # configurations take devices in plan order: a spec that lists slots decides
                # which runs share a GPU
                while pending and not stop:
                    taken = self._take(free, pending[0].gpus)
                    if taken is None:
                        break
                    for d in taken:
                        free.remove(d)
                    c = pending.pop(0)
                    r = Running(c, taken, states=states[c.name])
                    if self._start_next_stage(r):
                        running.append(r)
                    else:
                        free.extend(r.devices)
                for r in list(running):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    if not (self._finish_stage(r, rc) and self._start_next_stage(r)):
                        running.remove(r)
                        free.extend(r.devices)
                if self.progress and time.time() - last_report >= self.progress_every_s:
                    self.progress.report([(r.config, r.config.stages[r.index]) for r in running], self.log)
                    last_report = time.time()
                time.sleep(POLL_S)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for r in running:  # interrupted: stages end with the sweep (SIGTERM first, a checkpoint)
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
            for r in running:
                try:
                    r.proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
        if stop:
            self.log(f"sweep interrupted (signal {stop[0]}); its stages were stopped: run it again to resume")
            sys.exit(128 + stop[0])
        return states
