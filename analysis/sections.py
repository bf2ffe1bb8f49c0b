"""Which report section a study gets, by the runs' `study` tag (a sweep spec's `study:`).

A section is a function `(ctx: ReportContext, runs: DataFrame) -> Section`: it writes its
tables and figures into ctx.out and returns its markdown and the files it wrote (logged
as artifacts to the sweep's parent run). A new study adds one line to SECTIONS, naming
its function as "module:function" (imported only when a report needs it) or giving the
function itself.
A study without a section gets the generic one: its runs and final metrics.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd
from tabulate import tabulate

if TYPE_CHECKING:
    from analysis.passk_ci import Uncertainty

SECTIONS: dict[str, str | Callable] = {
    "ablation": "analysis.ablation:section",  # the n × vocabulary study (paper Table 1, S3)
    "induction": "analysis.synthetic:induction_section",  # paper Fig. 7 (docs/synthetic.md)
    "poly": "analysis.synthetic:poly_section",  # paper Fig. 8
    "small_mtp": "analysis.small_mtp:section",  # recipes for better and faster at ~100M (docs/results/small-mtp)
}


@dataclass
class ReportContext:
    experiment: str
    uri: str | None  # None: runs rebuilt from a runs.csv, no store to read histories from
    out: Path
    # pass@k intervals and paired tests of the section's runs (analysis/passk_ci.py), for
    # its tables and plots; build_report adds their own subsection after the section
    passk: Uncertainty | None = None


@dataclass
class Section:
    title: str
    markdown: str
    files: list[Path] = field(default_factory=list)


def section_for(study: str) -> Callable[[ReportContext, pd.DataFrame], Section]:
    target = SECTIONS.get(study)
    if target is None:
        return generic_section
    if callable(target):
        return target
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def generic_section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
    study = runs["study"].iloc[0]
    metric_cols = [c for c in runs.columns if "/" in c and not c.startswith(("params.", "grid.", "spec/", "model/"))
                   and runs[c].notna().any()][:12]
    table = tabulate(runs[["name", "status", *metric_cols]].values.tolist(), headers=["run", "status", *metric_cols],
                     tablefmt="github", floatfmt=".4g")
    return Section(f"Study `{study}`", f"No report section is registered for this study (analysis/sections.py); "
                   f"its runs and their final metrics:\n\n{table}\n")
