"""The study's figures (PNG), from the runs frame and metric histories.

Every function takes the runs of one study and a path, draws one figure, and returns
whether it had anything to draw (a figure with no data is not written). Seeds of one
configuration are averaged; a configuration's label is its run name without the seed.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.paper_numbers import TABLE_S3, TASK_TITLES, TASKS  # noqa: E402
from analysis.runs import pass_metrics, spec_metrics  # noqa: E402
from bytelm.fileio import atomic_path  # noqa: E402

VOCAB_TITLES = {"bytes": "bytes", "bpe": "BPE"}


def config_label(name: str) -> str:
    return re.sub(r"-s\d+$", "", str(name))


MARKERS = "osD^vP*X<>"


def styles(runs: pd.DataFrame) -> dict[str, dict]:
    """One colour and marker per configuration (run name without its seed), the same in
    every figure of a report. Markers are hollow and shrink from one configuration to
    the next, so that points drawn on top of each other (every pass@k at 0) stay visible
    as nested shapes."""
    configs = sorted({config_label(n) for n in runs["name"]})
    return {c: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "ms": 9 - 1.6 * (i % 4), "mfc": "none",
                "mew": 1.5} for i, c in enumerate(configs)}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:  # kill -9 mid-draw leaves no 0-byte PNG
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def passk_vs_k(runs: pd.DataFrame, path: Path, passk=None) -> bool:
    """pass@k (oracle temperature) against k, one line per configuration, a panel per task;
    with `passk` (analysis.passk_ci.Uncertainty) each configuration's interval over
    problems as a band, where it has one (the title says when none has)."""
    pm = pass_metrics(runs)
    pm = pm[pm["temp"] == "best"].merge(runs[["run_id", "name"]], on="run_id")
    if pm.empty:
        return False
    pm["config"] = pm["name"].map(config_label)
    tasks = [t for t in TASKS if t in set(pm["task"])] + sorted(set(pm["task"]) - set(TASKS))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    style = styles(runs)
    bands = _bands(passk)
    for ax, task in zip(axes[0], tasks):
        sel = pm[pm["task"] == task].groupby(["config", "k"])["value"].mean().reset_index()
        for config, g in sel.groupby("config"):
            ax.plot(g["k"], 100 * g["value"], label=config, **style[config])
            band = bands[(bands["label"] == config) & (bands["task"] == task)].sort_values("k")
            if len(band):
                ax.fill_between(band["k"], 100 * band["lo"], 100 * band["hi"], color=style[config]["color"], alpha=0.15,
                                lw=0)
        ax.set_xscale("log")
        ks = sorted(sel["k"].unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_ylim(bottom=0)  # a rate: all-zero results sit on the axis, not mid-plot
        ax.set_title(TASK_TITLES.get(task, task))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    if passk is not None:
        without = sorted(set(pm["config"]) - set(bands["label"]))
        fig.suptitle(("bands: 95% bootstrap interval over problems" + (f"; none for {', '.join(without)}" if without else "")
                      if len(bands) else "no confidence interval: the runs logged no per-problem counts"), fontsize=9)
    _save(fig, path)
    return True


def _bands(passk) -> pd.DataFrame:
    """Configuration intervals by plot label (run name without seed), for labels that name
    one configuration only (a band is never drawn for a line that averages several)."""
    if passk is None:
        return pd.DataFrame(columns=["label", "task", "k", "lo", "hi"])
    iv = passk.intervals[passk.intervals["level"] == "config"]
    unique = iv.groupby("label")["config_id"].nunique()
    iv = iv[iv["label"].isin(unique[unique == 1].index)].dropna(subset=["lo"])
    return iv[["label", "task", "k", "lo", "hi"]]


def metrics_vs_n(runs: pd.DataFrame, path: Path, passk=None) -> bool:
    """pass@1 per task and validation bits per byte against n, one line per vocabulary
    (mean over seeds; gray bars: standard deviation when there are several); with `passk`
    each configuration's pass@1 point carries its 95% interval over problems."""
    keys = [(f"pass_at_1/{t}/best", f"{TASK_TITLES[t]} pass@1 (%)", 100) for t in TASKS if f"pass_at_1/{t}/best" in runs]
    if "val/bpb" in runs:
        keys.append(("val/bpb", "validation bits per byte", 1))
    keys = [k for k in keys if runs[k[0]].notna().any()]
    if not keys or runs["n"].isna().all():
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    style = styles(runs)
    bands = _bands(passk)
    configs = runs.assign(config=runs["name"].map(config_label))
    for ax, (key, title, scale) in zip(axes[0], keys):
        for (vocab, g), ls in zip(runs.groupby("vocab"), ("-", "--", ":", "-.")):
            stats = g.groupby("n")[key].agg(["mean", "std"]).dropna(subset=["mean"])
            if stats.empty:
                continue
            # the vocabulary's line in gray; its points in their configurations' colours
            ax.errorbar(stats.index.astype(int), scale * stats["mean"], yerr=scale * stats["std"].fillna(0),
                        color="gray", ls=ls, capsize=3, label=VOCAB_TITLES.get(vocab, vocab))
        for config, g in configs.groupby("config"):
            vals = pd.to_numeric(g[key], errors="coerce").dropna()
            if len(vals) and g["n"].notna().any():
                x, y = int(g["n"].dropna().iloc[0]), scale * vals.mean()
                ax.plot([x], [y], ls="none", label=config, **style[config])
                ci = bands[(bands["label"] == config) & (bands["k"] == 1) & (bands["task"] == key.split("/")[1])]
                if key.startswith("pass_at_1/") and len(ci):
                    lo, hi = scale * ci["lo"].iloc[0], scale * ci["hi"].iloc[0]
                    ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], color=style[config]["color"],
                                capsize=4, lw=1)
        ax.set_xlabel("n (future tokens predicted)")
        if scale == 100:  # pass@1: a rate
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if len(bands):
        fig.suptitle("coloured bars: 95% bootstrap interval of pass@1 over problems; gray bars: standard deviation "
                     "over seeds", fontsize=9)
    _save(fig, path)
    return True


def speedup_vs_heads(runs: pd.DataFrame, path: Path, batch: int | None = None) -> bool:
    """Speculative-decoding speedup and bytes per forward against the positions a step
    verifies per row: a chain of k heads (k, solid) and trees of N nodes (N, dashed, square
    markers) side by side (the paper's Table S3 as a figure; its 7B byte models' chains
    drawn dashed gray for reference). `batch`: the batch size drawn (default: the
    smallest benchmarked); False where it was not benchmarked."""
    every = spec_metrics(runs)
    spec = every[~every["flagged"]]  # a flagged timing is not drawn as a result
    if spec.empty:
        return False
    prompts = "code" if "code" in set(spec["prompts"]) else sorted(spec["prompts"])[0]
    spec = spec[spec["prompts"] == prompts]
    batch = int(spec["batch"].min()) if batch is None else batch
    left_out = every[every["flagged"] & (every["prompts"] == prompts) & (every["what"] == "speedup") &
                     (every["batch"] == batch)]
    spec = spec[spec["batch"] == batch]
    if spec.empty:
        return False
    spec = spec.merge(runs[["run_id", "name", "vocab"]], on="run_id")
    spec["config"] = spec["name"].map(config_label)
    style = styles(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, what, title, paper_idx in ((axes[0], "speedup", "speedup over plain decoding", 0),
                                       (axes[1], "bytes_per_forward", "bytes per forward", 1)):
        sel = spec[spec["what"] == what].groupby(["config", "decoder", "nodes"])["value"].mean().reset_index()
        for config, g in sel.groupby("config"):
            chain, tree = g[g["decoder"] == "chain"], g[g["decoder"] == "tree"]
            ax.plot(chain["nodes"], chain["value"], label=f"{config} chain", **style[config])
            if not tree.empty:
                ax.plot(tree["nodes"], tree["value"], ls="--", label=f"{config} trees",
                        **{**style[config], "marker": "s"})
        for n, row in TABLE_S3.items():
            heads = sorted(row)
            ax.plot(heads, [row[h][paper_idx] for h in heads], ls="--", lw=0.8, color="gray", alpha=0.6)
        ax.plot([], [], ls="--", color="gray", label="paper 7B bytes n=8/16/32 (chains)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("positions verified per step (chain: heads used; tree: nodes)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    note = f"; {len(left_out)} flagged timing(s) left out (report: Table S3)" if len(left_out) else ""
    fig.suptitle(f"self-speculative decoding, {prompts} prompts, batch {batch}{note}", fontsize=9)
    _save(fig, path)
    return True


def bpb_curves(runs: pd.DataFrame, history: pd.DataFrame, path: Path, x_key: str, x_label: str) -> bool:
    """Validation bits per byte against a training quantity (bytes seen, FLOPs) logged
    at the trainer's log steps; val steps take the value interpolated at their step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    names = dict(zip(runs["run_id"], runs["name"]))
    style = styles(runs)
    for run_id, h in history.groupby("run_id"):
        val = h[h["key"] == "val/bpb"]
        x = h[h["key"] == x_key]
        if val.empty or x.empty:
            continue
        xs = np.interp(val["step"], np.r_[0, x["step"]], np.r_[0, x["value"]])
        name = names.get(run_id, run_id)
        ax.plot(xs, val["value"], label=name, **{**style[config_label(name)], "ms": 5})
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo > 10:  # curves over orders of magnitude of training
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return True
