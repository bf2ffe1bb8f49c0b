"""The n-ablation table in the layout of the paper's Table 1, from a runs frame.

Rows are configurations (data set / vocabulary / n, plus any other grid axis that varies,
such as the head type); seeds of one configuration are one row, shown as mean ± sample
standard deviation. Columns: pass@k (%) at the oracle temperature (`pass_at_{k}/{task}/best`)
for MBPP, HumanEval and APPS-Intro (with its confidence interval in brackets where the
report has one: columns `<key>:lo`, `<key>:hi` of the frame, analysis/passk_ci.py; and
"none passed" where `<key>:floor`), then validation bits per byte, training bytes,
training FLOPs and the best self-speculative speedup. The best value of each column is
bold. `render` writes it as markdown or LaTeX; `summary` is the numeric form for CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from tabulate import tabulate

from analysis.paper_numbers import KS, TASK_TITLES, TASKS
from analysis.runs import config_differences, grid_axes, spec_results
from bytelm.units import human

VOCAB_ORDER = {"bytes": 0, "bpe": 1}
VOCAB_TITLES = {"bytes": "bytes", "bpe": "BPE"}


@dataclass
class Column:
    key: str  # column of the summary frame
    title: str
    better: str | None  # max | min | None (not compared)
    fmt: Callable[[float], str]
    spread: bool = True  # show ± over seeds


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _first_metric(runs: pd.DataFrame, *keys: str) -> pd.Series:
    """The first of `keys` that a run has (e.g. the trainer's count, else the sweep's plan)."""
    out = pd.Series(np.nan, index=runs.index)
    for k in keys:
        if k in runs:
            out = out.fillna(pd.to_numeric(runs[k], errors="coerce"))
    return out


def best_speedup(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series, str]:
    """Per run, the largest decode-bench speedup over heads used, at the smallest batch
    size benchmarked and on the first prompt set (code when present); also the heads
    that gave it, and a description for the caption."""
    spec = spec_results(runs)  # a flagged timing is never the best
    speed = pd.Series(np.nan, index=runs.index)
    heads = pd.Series(np.nan, index=runs.index)
    spec = spec[(spec["what"] == "speedup") & (spec["decoder"] == "chain")]
    if spec.empty:
        return speed, heads, ""
    prompts = "code" if "code" in set(spec["prompts"]) else sorted(spec["prompts"])[0]
    batch = int(spec[spec["prompts"] == prompts]["batch"].min())
    sel = spec[(spec["prompts"] == prompts) & (spec["batch"] == batch)]
    best = sel.loc[sel.groupby("run_id")["value"].idxmax()].set_index("run_id")
    ids = runs["run_id"]
    speed = ids.map(best["value"]).astype(float)
    heads = ids.map(best["heads"]).astype(float)
    return speed, heads, f"{prompts} prompts, batch {batch}"


def table_columns(runs: pd.DataFrame) -> list[Column]:
    cols = []
    for task in TASKS:
        for k in KS:
            key = f"pass_at_{k}/{task}/best"
            if key in runs and runs[key].notna().any():
                cols.append(Column(key, f"{TASK_TITLES[task]} @{k}", "max", _pct))
    cols += [
        Column("val/bpb", "val bpb", "min", lambda x: f"{x:.3f}"),
        Column("train_bytes", "train bytes", None, human, spread=False),
        Column("train_flops", "train FLOPs", None, human, spread=False),
        Column("speedup", "speedup ×", "max", lambda x: f"{x:.2f}"),
    ]
    return cols


def summary(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[Column], str]:
    """One row per configuration: label columns, `<key>` mean, `<key>:std`, `<key>:count`
    for every table column, and `seeds`. Returns (frame, label columns, columns, speedup
    description)."""
    runs = runs.copy()
    runs["train_bytes"] = _first_metric(runs, "train/bytes_seen", "plan/train_bytes")
    runs["train_flops"] = _first_metric(runs, "train/flops", "plan/train_flops")
    runs["speedup"], runs["speedup_heads"], speed_desc = best_speedup(runs)
    columns = [c for c in table_columns(runs) if c.key in runs and runs[c.key].notna().any()]
    labels = ["data", "vocab", "n", *grid_axes(runs)]
    runs = with_config_column(runs, labels)
    if runs["config"].astype(bool).any():
        labels.append("config")
    rows = []
    # a row is one configuration (its labels and runs.config_id): its runs are seeds of it
    for _, group in runs.groupby([*labels, "config_id"], dropna=False, sort=False):
        row = {a: group[a].iloc[0] for a in labels}
        row["config_id"] = group["config_id"].iloc[0]
        row["seeds"] = int(group["seed"].nunique()) if group["seed"].notna().any() else len(group)
        row["runs"] = ", ".join(group["name"])
        for c in columns:
            vals = pd.to_numeric(group[c.key], errors="coerce").dropna()
            row[c.key] = vals.mean() if len(vals) else np.nan
            row[f"{c.key}:std"] = vals.std(ddof=1) if len(vals) > 1 else np.nan
            row[f"{c.key}:count"] = len(vals)
        if "speedup" in row:
            heads = group["speedup_heads"].dropna()
            row["speedup_heads"] = int(heads.mode().iloc[0]) if len(heads) else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_order"] = df["vocab"].map(VOCAB_ORDER).fillna(9)
    df = df.sort_values(["data", "_order", "vocab", "n", *labels[3:]], na_position="last")
    df = df.drop(columns="_order").reset_index(drop=True)
    return df, labels, columns, speed_desc


def with_config_column(runs: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """`config`: for configurations that share their label values (vocab, n, ...) but not
    their config, the keys that set each apart ('model.context=256, train.steps=150');
    empty elsewhere."""
    runs = runs.copy()
    runs["config"] = ""
    for _, group in runs.groupby(labels, dropna=False, sort=False):
        ids = list(dict.fromkeys(group["config_id"]))
        if len(ids) > 1:
            diff = config_differences(runs, ids)
            runs.loc[group.index, "config"] = group["config_id"].map(diff)
    return runs


def best_rows(df: pd.DataFrame, c: Column) -> set[int]:
    vals = df[c.key]
    if c.better is None or vals.notna().sum() < 2 or vals.max() == vals.min():
        return set()  # nothing to single out (e.g. pass@1 = 0 everywhere)
    target = vals.max() if c.better == "max" else vals.min()
    return set(df.index[np.isclose(vals, target, rtol=0, atol=1e-12)])


def render(df: pd.DataFrame, labels: list[str], columns: list[Column], style: str) -> str:
    """The table as markdown (style "md") or a LaTeX tabular (style "tex")."""
    md = style == "md"
    esc = (lambda t: t) if md else _tex_escape
    bold = (lambda t: f"**{t}**") if md else (lambda t: f"\\textbf{{{t}}}")
    pm = " ± " if md else r" $\pm$ "
    best = {c.key: best_rows(df, c) for c in columns}
    rows = []
    for i, r in df.iterrows():
        cells = [esc(str(r["data"])) if pd.notna(r["data"]) else "–", VOCAB_TITLES.get(r["vocab"], str(r["vocab"])),
                 "" if pd.isna(r["n"]) else str(int(r["n"]))]
        cells += [esc(str(r[a])) for a in labels[3:]]
        for c in columns:
            v = r[c.key]
            if pd.isna(v):
                cells.append("–" if md else "--")
                continue
            text = esc(c.fmt(v))
            if c.spread and r[f"{c.key}:count"] > 1 and pd.notna(r[f"{c.key}:std"]):
                text += pm + esc(c.fmt(r[f"{c.key}:std"]))
            if pd.notna(r.get(f"{c.key}:lo", np.nan)):  # a confidence interval (pass@k: over problems)
                text += f" [{esc(c.fmt(r[f'{c.key}:lo']))}, {esc(c.fmt(r[f'{c.key}:hi']))}]"
            elif pd.notna(floor := r.get(f"{c.key}:floor", np.nan)) and bool(floor):
                text += " (none passed)"
            if c.key == "speedup" and pd.notna(r.get("speedup_heads")):
                text += f" (k={int(r['speedup_heads'])})"
            cells.append(bold(text) if i in best[c.key] else text)
        rows.append(cells)
    headers = ["data", "vocab", "n", *[a.removeprefix("grid.") for a in labels[3:]], *[c.title for c in columns]]
    if md:
        return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    return tabulate(rows, headers=[_tex_escape(h) for h in headers], tablefmt="latex_raw", disable_numparse=True)


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("×", r"$\times$")):
        s = s.replace(a, b)
    return s


def latex_table(body: str, caption: str, label: str = "tab:ablation") -> str:
    return (
        "\\begin{table}[t]\n\\centering\n\\small\n" + body + "\n"
        f"\\caption{{{_tex_escape(caption)}}}\n\\label{{{label}}}\n\\end{{table}}\n"
    )


def csv_frame(df: pd.DataFrame, labels: list[str], columns: list[Column]) -> pd.DataFrame:
    """The numeric table: labels, seeds, then each column's mean and std (pass@k as a
    fraction, as logged)."""
    keep = [*labels, "seeds"]
    for c in columns:
        keep += [c.key] + ([f"{c.key}:std"] if c.spread else []) + [f"{c.key}:{b}" for b in ("lo", "hi", "floor") if f"{c.key}:{b}" in df]
    if "speedup_heads" in df:
        keep.append("speedup_heads")
    return df[[k for k in keep if k in df]].rename(columns={"runs": "run_names"})
