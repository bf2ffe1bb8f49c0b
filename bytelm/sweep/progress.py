"""What a running sweep prints between stage starts and ends: each running stage's
progress (training: step of steps, bytes/s, its ETA, read from the run's metrics.jsonl)
and an ETA for the whole sweep from what this call has measured so far."""

from __future__ import annotations

import time
from pathlib import Path

from bytelm.fileio import read_jsonl
from bytelm.sweep.launcher import ConfigJobs, StageJob
from bytelm.sweep.plan import RunPlan
from bytelm.units import human


def duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def train_progress(run_dir: Path) -> dict | None:
    """The last logged training row: step, bytes/s and wall seconds of training so far."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl", appending=True) if "bytes_per_s" in r]
    return rows[-1] if rows else None


class Progress:
    """ETA of the whole sweep: training from the FLOP/s measured on this call's runs (each
    run's planned FLOPs), the other stages from the mean time of those that ended."""

    def __init__(self, plans: list[RunPlan], configs: list[ConfigJobs], parallel: int):
        self.plans = {p.name: p for p in plans}
        self.left = {c.name: [s.stage for s in c.stages] for c in configs}  # stages not yet ended
        self.parallel = max(1, parallel)
        self.durations: dict[str, list[float]] = {}
        self.started_at: dict[tuple[str, str], float] = {}

    def started(self, run: str, stage: str) -> None:
        self.started_at[(run, stage)] = time.time()

    def ended(self, run: str, stage: str, seconds: float) -> None:
        self.durations.setdefault(stage, []).append(seconds)
        if stage in self.left.get(run, []):
            self.left[run] = self.left[run][self.left[run].index(stage) + 1:]

    def _flops_per_s(self, running: list[tuple[ConfigJobs, StageJob]]) -> float | None:
        rates = []
        for c, s in running:
            row = train_progress(c.run_dir) if s.stage == "train" else None
            if row and row.get("train/flops") and row.get("train/wall_s"):
                rates.append(row["train/flops"] / row["train/wall_s"])
        return sum(rates) / len(rates) if rates else None

    def report(self, running: list[tuple[ConfigJobs, StageJob]], log) -> None:
        now = time.time()
        remaining, unknown = 0.0, set()
        rate = self._flops_per_s(running)
        busy = set()
        for c, s in running:
            busy.add(c.name)
            plan = self.plans.get(c.name)
            elapsed = now - self.started_at.get((c.name, s.stage), now)
            line = f"  {c.name}: {s.stage} running for {duration(elapsed)}"
            left = None
            if s.stage == "train" and plan is not None:
                row = train_progress(c.run_dir)
                if row:
                    step = int(row["step"])
                    per_step = row["train/wall_s"] / step if step else None
                    left = (plan.steps - step) * per_step if per_step else None
                    line += (f", step {step} of {plan.steps}, {human(row['bytes_per_s'], 'B')}/s, "
                             f"ETA {duration(left)}")
                else:
                    line += ", starting (no step logged yet)"
            else:
                mean = self._mean(s.stage)
                left = max(0.0, mean - elapsed) if mean is not None else None
                line += f", ETA {duration(left)}" if left is not None else ""
            if left is None:
                unknown.add(s.stage)
            else:
                remaining += left
            later = self.left.get(c.name, [])[1:]
            remaining += self._estimate(c.name, later, rate, unknown)
            log(line)
        for name, stages in self.left.items():
            if name not in busy:
                remaining += self._estimate(name, stages, rate, unknown)
        eta = f"about {duration(remaining / self.parallel)}"
        if unknown:
            eta += f" (not counting {', '.join(sorted(unknown))}: no time measured yet)"
        runs_left = sum(1 for v in self.left.values() if v)
        log(f"sweep: {runs_left} run(s) with stages left; ETA {eta}")

    def _mean(self, stage: str) -> float | None:
        d = self.durations.get(stage)
        return sum(d) / len(d) if d else None

    def _estimate(self, name: str, stages: list[str], rate: float | None, unknown: set) -> float:
        total = 0.0
        plan = self.plans.get(name)
        for stage in stages:
            if stage == "train" and plan is not None and plan.train_flops and rate:
                total += plan.train_flops / rate
            elif self._mean(stage) is not None:
                total += self._mean(stage)
            else:
                unknown.add(stage)
        return total
