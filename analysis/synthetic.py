"""Report sections of the synthetic studies (docs/synthetic.md): induction accuracy
against model size per n (the paper's Fig. 7) and polynomial-arithmetic exact match
against the number of operations m per n and size (the paper's Fig. 8).

A point is one configuration (vocabulary, size, n): the mean over the runs (one per
seed) that logged the metric, ± their sample standard deviation (none with one seed); the
CSVs keep min and max too, and how many seeds back each point. Model size is the
trainer's `model/params_non_embedding`; a size is named by the sweep's `size` axis
when it has one, else by that count.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from analysis.sections import ReportContext, Section  # noqa: E402
from analysis.tables import VOCAB_ORDER, VOCAB_TITLES  # noqa: E402
from bytelm.fileio import atomic_path, write_text  # noqa: E402
from bytelm.units import human  # noqa: E402

PARAMS = "model/params_non_embedding"
LABELS = ["vocab", "size", "n"]  # one point of a figure, seeds pooled
STAT_COLUMNS = ["metric", *LABELS, "params_non_embedding", "seeds", "mean", "std", "min", "max", "runs"]
# headline induction metric -> what it scores (a figure panel and a table each)
INDUCTION_METRICS = {
    "induction/acc": "BPE: the second token of a repeated name",
    "induction/acc_bytes": "bytes: bytes 2.. of a repeated name",
}
POLY_M = re.compile(r"^poly/acc/m(\d+)$")
M_TRAIN_MAX = "poly/m_train_max"  # the data set's training range of m, logged with the accuracies
SPREAD = "mean ± sample standard deviation over seeds (with two seeds, |a − b|/√2; no ± with one)"


# ----------------------------------------------------------------------------- statistics


def with_size(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with `params` (non-embedding parameters) and `size` (the sweep's size
    name, else the parameter count in words) columns."""
    runs = runs.copy()
    runs["params"] = pd.to_numeric(runs[PARAMS], errors="coerce") if PARAMS in runs else np.nan
    named = runs["grid.size"] if "grid.size" in runs else pd.Series(None, index=runs.index, dtype=object)
    runs["vocab"] = runs["vocab"].fillna("unknown vocabulary")
    runs["size"] = named.fillna(runs["params"].map(lambda p: human(p) if pd.notna(p) else "unknown size"))
    return runs


def seed_stats(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per configuration (LABELS) that has `metric`: mean, std, min, max over its
    seeds, their number, and the runs' names; ordered by vocabulary, size, n."""
    if metric not in runs:
        return pd.DataFrame(columns=STAT_COLUMNS)
    vals = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce")).dropna(subset=["value"])
    df = vals.groupby(LABELS, dropna=False, sort=False).agg(
        params_non_embedding=("params", "mean"), seeds=("value", "size"), mean=("value", "mean"),
        std=("value", "std"), min=("value", "min"), max=("value", "max"), runs=("name", ", ".join),
    ).reset_index()
    df["metric"] = metric
    df["_vocab"] = df["vocab"].map(VOCAB_ORDER).fillna(9)
    df = df.sort_values(["_vocab", "vocab", "params_non_embedding", "size", "n"], na_position="last")
    return df[STAT_COLUMNS].reset_index(drop=True)


def pm(row: pd.Series) -> str:
    """A point as 'mean ± std' in percent."""
    text = f"{100 * row['mean']:.1f}"
    return text + (f" ± {100 * row['std']:.1f}" if pd.notna(row["std"]) else "")


def n_title(n) -> str:
    return f"n={int(n)}" if pd.notna(n) else "n=?"


def vocab_title(v: str) -> str:
    return VOCAB_TITLES.get(v, v)


def versus(other: pd.Series, base: pd.Series) -> str:
    """Whether a configuration is above the n=1 one of its size, by how much, on how many
    seeds, and whether the seeds separate them."""
    diff = 100 * (other["mean"] - base["mean"])
    # "is above", not "beats": whether a gap is a finding is what the seeds say next
    word = "is above" if diff > 0 else "is below" if diff < 0 else "equals"
    if other["seeds"] > 1 and base["seeds"] > 1:
        if other["min"] > base["max"]:
            sep = f"every {n_title(other['n'])} seed above every n=1 seed"
        elif other["max"] < base["min"]:
            sep = f"every {n_title(other['n'])} seed below every n=1 seed"
        else:
            sep = "the seeds overlap"
    else:
        sep = "one seed on at least one side, so no spread to judge the gap by"
    if max(other["mean"], base["mean"]) < 0.01:
        sep += "; both under 1 %: neither model learned the task, so there is nothing to compare"
    return (f"{n_title(other['n'])} {word} n=1: {100 * other['mean']:.1f} vs {100 * base['mean']:.1f} % "
            f"({diff:+.1f} points; {int(other['seeds'])} vs {int(base['seeds'])} seed(s); {sep})")


def comparisons(stats: pd.DataFrame) -> list[tuple[str, pd.Series, pd.Series]]:
    """(size description, n>1 row, n=1 row) for every size where both were run."""
    out = []
    for _, g in stats.groupby(["vocab", "size"], dropna=False, sort=False):
        base = g[g["n"] == 1]
        if base.empty:
            continue
        b = base.iloc[0]
        where = f"{vocab_title(b['vocab'])} {b['size']}"
        if pd.notna(b["params_non_embedding"]) and b["size"] != human(b["params_non_embedding"]):
            where += f" ({human(b['params_non_embedding'])} non-embedding parameters)"
        out += [(where, r, b) for _, r in g.iterrows() if pd.notna(r["n"]) and r["n"] != 1]
    return out


# ----------------------------------------------------------------------------- drawing


def save_png(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def errorbars(ax, x, stats: pd.DataFrame, label: str, color: str | None = None) -> None:
    ax.errorbar(x, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o", capsize=3, label=label,
                color=color)


def induction_figure(panels: dict[str, pd.DataFrame], path: Path) -> None:
    """Fig. 7: accuracy against non-embedding parameters (log x), one line per (vocabulary,
    n), a panel per headline metric."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (metric, stats) in zip(axes[0], panels.items()):
        stats = stats.dropna(subset=["params_non_embedding"])
        if stats.empty:  # runs from before the trainer logged its parameter count
            ax.text(0.5, 0.5, f"no run logged {PARAMS}", ha="center", transform=ax.transAxes)
            continue
        for (vocab, n), g in stats.groupby(["vocab", "n"], sort=False):
            errorbars(ax, g["params_non_embedding"], g, f"{vocab_title(vocab)} {n_title(n)}")
        ax.set_xscale("log")
        ticks = stats.drop_duplicates("size")  # each size named, with its parameter count
        ax.set_xticks(ticks["params_non_embedding"],
                      [f"{s}\n{human(p)}" for s, p in zip(ticks["size"], ticks["params_non_embedding"])])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel("accuracy on repeated names (%)")
        ax.set_title(INDUCTION_METRICS[metric], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path)


def m_train_max(runs: pd.DataFrame) -> int | None:
    """The largest m of the runs' training data (m above it is out of domain), as
    `bytelm synth eval` logged it; None where the runs do not say, or disagree."""
    values = runs[M_TRAIN_MAX].dropna().unique() if M_TRAIN_MAX in runs else []
    return int(values[0]) if len(values) == 1 else None


def poly_figure(by_m: pd.DataFrame, path: Path, m_max: int | None) -> None:
    """Fig. 8: exact match against m, one line per n, a panel per (vocabulary, size); the
    out-of-domain m (never seen in training) shaded."""
    panels = list(by_m.groupby(["vocab", "size"], sort=False))
    ms = sorted(by_m["m"].unique())
    several_vocabs = by_m["vocab"].nunique(dropna=False) > 1
    # one colour per n in every panel, so that one legend serves them all
    colors = {n: f"C{i}" for i, n in enumerate(sorted(by_m["n"].dropna().unique()))}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, ((vocab, size), g) in zip(axes[0], panels):
        if m_max is not None and max(ms) > m_max:
            ax.axvspan(m_max + 0.5, max(ms) + 0.5, color="gray", alpha=0.15, label=f"out of domain (m > {m_max})")
        for n, line in g.groupby("n", sort=True):
            line = line.sort_values("m")
            errorbars(ax, line["m"], line, n_title(n), colors.get(n))
        params = g["params_non_embedding"].iloc[0]
        ax.set_title((f"{vocab_title(vocab)} " if several_vocabs else "") + f"{size}"
                     + (f" ({human(params)} non-emb.)" if pd.notna(params) else ""), fontsize=10)
        ax.set_xticks(ms)
        ax.set_xlim(min(ms) - 0.5, max(ms) + 0.5)
        ax.set_xlabel("number of operations m")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylim(bottom=0)  # after every panel is drawn: the shared top fits them all
    axes[0][0].set_ylabel("exact match (%)")
    legend = {}
    for ax in axes[0]:  # every n, also one that only some sizes have
        legend |= {label: h for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize=8)
    save_png(fig, path)


# ----------------------------------------------------------------------------- induction


def induction_table(stats: pd.DataFrame) -> str:
    """Rows (vocabulary, size), a column per n, the difference of each n > 1 to n = 1, and
    the seeds behind each point."""
    ns = sorted(stats["n"].dropna().unique())
    rows = []
    for (vocab, size), g in stats.groupby(["vocab", "size"], dropna=False, sort=False):
        by_n = {r["n"]: r for _, r in g.iterrows()}
        row = [vocab_title(vocab), size, human(g["params_non_embedding"].mean())]
        row += [pm(by_n[n]) if n in by_n else "–" for n in ns]
        row += [f"{100 * (by_n[n]['mean'] - by_n[1]['mean']):+.1f}" if n in by_n and 1 in by_n else "–"
                for n in ns if n != 1]
        row.append(" / ".join(str(int(by_n[n]["seeds"])) if n in by_n else "0" for n in ns))
        rows.append(row)
    headers = ["vocab", "size", "non-emb. params", *[f"{n_title(n)} (%)" for n in ns],
               *[f"{n_title(n)} − n=1 (points)" for n in ns if n != 1 and 1 in ns],
               "seeds (" + " / ".join(n_title(n) for n in ns) + ")"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def induction_section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
    title = "Induction (paper Fig. 7): accuracy on repeated names against model size"
    runs = with_size(runs)
    headline = [m for m in INDUCTION_METRICS if m in runs and runs[m].notna().any()]
    if not headline:
        return Section(title, f"None of the {len(runs)} run(s) logged an induction metric "
                              "(`bytelm synth eval --task induction`); nothing to draw.\n")
    variants = [f"{m}{suffix}" for m in headline for suffix in ("", "_name", "_first")]
    # the paper's protocol: each run at its checkpoint with the best test accuracy, where
    # every run was scored so (`bytelm synth eval --checkpoints all`)
    oracle = all(f"oracle/{m}" in runs and runs.loc[runs[m].notna(), f"oracle/{m}"].notna().all() for m in headline)
    if oracle:
        runs = runs.assign(**{v: runs[f"oracle/{v}"] for v in variants if f"oracle/{v}" in runs})
    caption = (f"Accuracy (%) on the test stories, teacher-forced, head 1, at repeated occurrences of the "
               f"randomly generated names (docs/synthetic.md); {SPREAD}. Seeds: runs with the metric, per n. "
               f"Non-embedding parameters: `{PARAMS}`. "
               + ("Each run at its checkpoint with the best test accuracy (the paper's epoch oracle; the step is "
                  "`oracle/step` in runs.csv)." if oracle else
                  "Each run at its latest checkpoint (not the paper's epoch oracle: "
                  "`bytelm synth eval --checkpoints all` scores every kept checkpoint)."))
    stats = {m: seed_stats(runs, m) for m in variants}
    body = []
    for m in headline:  # the BPE metric and the byte variant: a table each
        body += [f"### `{m}`: {INDUCTION_METRICS[m]}\n", induction_table(stats[m]), ""]
        body += [f"- {where}: {versus(other, base)}." for where, other, base in comparisons(stats[m])] + [""]
        first = stats[f"{m}_first"]
        if len(first):
            lo, hi = (f"{100 * v:.1f}" for v in (first["mean"].min(), first["mean"].max()))
            body.append(f"Control, first occurrences (nothing to copy; `{m}_first`): "
                        f"{lo if lo == hi else f'{lo}–{hi}'} % over the configurations.\n")
    body.append(f"*{caption}*\n")
    write_text(ctx.out / "induction.md", "\n".join(body))
    csv = pd.concat([stats[m] for m in variants if len(stats[m])], ignore_index=True)
    write_text(ctx.out / "induction.csv", csv.to_csv(index=False))
    induction_figure({m: stats[m] for m in headline}, ctx.out / "induction.png")
    text = ["Accuracy against non-embedding parameters per n, as in the paper's Fig. 7 (the paper: n=2 clearly "
            "above n=1 up to 30M parameters, the gap closed at 100M). The tables are also in `induction.md`; every "
            "metric (`_name`: whole names right, `_first`: first occurrences) with mean, std, min, max and seeds "
            "in `induction.csv` (fractions).\n", *body,
            "\n### Figure: induction accuracy against model size\n\n"
            "![induction accuracy against model size](induction.png)\n"]
    files = [ctx.out / "induction.md", ctx.out / "induction.csv", ctx.out / "induction.png"]
    return Section(title, "\n".join(text), files)


# ----------------------------------------------------------------------------- polynomials


def by_config(stats: pd.DataFrame) -> dict[tuple, pd.Series]:
    return {(r["vocab"], r["size"], r["n"]): r for _, r in stats.iterrows()}


def poly_table(configs: pd.DataFrame, in_domain: pd.DataFrame, ood: pd.DataFrame, m_max: int | None) -> str:
    """Rows (vocabulary, size, n), in the order of `configs`: seeds, in-domain and
    out-of-domain exact match."""
    ind, out = by_config(in_domain), by_config(ood)
    rows = []
    for key, c in by_config(configs).items():
        seeds = ind[key]["seeds"] if key in ind else c["seeds"]
        rows.append([vocab_title(c["vocab"]), c["size"], human(c["params_non_embedding"]), n_title(c["n"]),
                     int(seeds), *(pm(s[key]) if key in s else "–" for s in (ind, out))])
    within, beyond = (f", m ≤ {m_max}", f", m > {m_max}") if m_max is not None else ("", "")
    headers = ["vocab", "size", "non-emb. params", "n", "seeds", f"in domain{within} (%)", f"out of domain{beyond} (%)"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def wins_by_m(by_m: pd.DataFrame, other: pd.Series) -> tuple[int, int]:
    """At how many m the mean of `other` is above that of n=1 of its size, out of the m
    both have."""
    sel = by_m[(by_m["vocab"] == other["vocab"]) & (by_m["size"] == other["size"])]
    wide = sel.pivot_table(index="m", columns="n", values="mean").reindex(columns=[1, other["n"]]).dropna()
    return int((wide[other["n"]] > wide[1]).sum()), len(wide)


def poly_section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
    title = "Polynomial arithmetic (paper Fig. 8): exact match against the number of operations"
    runs = with_size(runs)
    m_cols = sorted((int(POLY_M.match(c)[1]), c) for c in runs.columns
                    if POLY_M.match(c) and runs[c].notna().any())
    if not m_cols:
        return Section(title, f"None of the {len(runs)} run(s) logged a polynomial metric "
                              "(`bytelm synth eval --task poly`); nothing to draw.\n")
    by_m = pd.concat([seed_stats(runs, c).assign(m=m) for m, c in m_cols], ignore_index=True)
    in_domain, ood = seed_stats(runs, "poly/acc_in_domain"), seed_stats(runs, "poly/acc_ood")
    m_max = m_train_max(runs)
    ranges = (f"m = 1..{m_max} (in domain, the training range) and of m > {m_max} (out of domain)" if m_max is not None
              else "the training range of m (in domain) and of larger m (out of domain)")
    caption = (f"Exact match (%) of the greedy answer (all 5 coefficients), pooled over the test problems of {ranges}; "
               f"{SPREAD}. Seeds: runs with the metric. Non-embedding parameters: `{PARAMS}`.")
    configs = by_m[by_m["m"] == m_cols[0][0]]  # every (vocabulary, size, n), in order
    body = [poly_table(configs, in_domain, ood, m_max), "", "Against n = 1 of the same size:\n"]
    ind, out = by_config(in_domain), by_config(ood)
    for where, other, base in comparisons(configs):
        key, base_key = (other["vocab"], other["size"], other["n"]), (base["vocab"], base["size"], base["n"])
        body.append(f"- {where}, {n_title(other['n'])} against n=1:")
        body += [f"  - {label}: {versus(s[key], s[base_key])}."
                 for label, s in (("in domain", ind), ("out of domain", out)) if key in s and base_key in s]
        above, of = wins_by_m(by_m, other)
        body.append(f"  - above n=1 (means over seeds) at {above} of {of} values of m.")
    body.append(f"\n*{caption}*\n")
    write_text(ctx.out / "poly.md", "\n".join(body))
    csv = pd.concat([s for s in (in_domain, ood, by_m.drop(columns="m")) if len(s)], ignore_index=True)
    write_text(ctx.out / "poly.csv", csv.to_csv(index=False))
    poly_figure(by_m, ctx.out / "poly.png", m_max)
    text = ["Exact match against the number of operations m per n and size, as in the paper's Fig. 8 (the paper: "
            "n > 1 helps at every m, most out of domain). The table is also in `poly.md`; every point (in domain, "
            "out of domain, each m) with mean, std, min, max and seeds in `poly.csv` (fractions).\n", *body,
            "\n### Figure: exact match against the number of operations\n\n"
            "![exact match against the number of operations](poly.png)\n"]
    return Section(title, "\n".join(text), [ctx.out / "poly.md", ctx.out / "poly.csv", ctx.out / "poly.png"])
