"""Report section of the small-MTP study (experiments/sweeps/small_mtp.yaml,
docs/results/small-mtp): is any recipe of training the extra heads both better (head-1
bits per byte as good as n = 1) and faster (bytes per forward near equal-weight n = 8)?

A configuration is a run name without its seed whose runs share one config apart from the
seed (`config_id`, as in the ablation table); two configurations of one name (a recipe
edited between rounds) are told apart by the keys that differ. Only runs of the study's
text budget are compared: a run that trained on other steps, batch or context, or stopped
before its last step, is listed with the reason and left out of every table and figure
but the run table. Every figure writes the numbers it draws to a CSV beside it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tabulate import tabulate

from analysis import plots
from analysis.runs import config_params, metric_history, spec_metrics
from analysis.sections import ReportContext, Section
from analysis.tables import with_config_column
from bytelm.fileio import write_text
from bytelm.units import human

SIZE, RECIPE = "grid.size", "grid.recipe"


def _num(runs: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(runs[col], errors="coerce") if col in runs else pd.Series(np.nan, index=runs.index)


def configurations(runs: pd.DataFrame) -> pd.Series:
    """Each run's configuration: its name without the seed, plus the config keys that set
    it apart where two configurations share that name."""
    runs = runs.assign(label=runs["name"].map(plots.config_label))
    runs = with_config_column(runs, ["label"])
    return runs["label"] + runs["config"].map(lambda c: f" ({c})" if c else "")


def budgets(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per run, the bytes of text it trained on as its budget (steps reached × batch ×
    context, in tokens = bytes here), and why a run is not comparable: '' for the runs of
    the study's budget (the one most runs planned), else the reason."""
    cfg = config_params(runs)  # a key a run did not log holds its default
    planned = pd.to_numeric(cfg["train.steps"], errors="coerce")
    reached = _num(runs, "train_step").fillna(planned)
    per_step = pd.to_numeric(cfg["train.batch_size"], errors="coerce") * pd.to_numeric(cfg["model.context"],
                                                                                       errors="coerce")
    budget = reached * per_step
    planned_budget = planned * per_step
    target = planned_budget.mode().iloc[0] if planned_budget.notna().any() else np.nan
    why = pd.Series("", index=runs.index)
    for i in runs.index:
        if pd.isna(budget[i]):
            why[i] = "its steps, batch or context were not logged"
        elif planned_budget[i] != target:
            why[i] = f"planned {human(planned_budget[i])} tokens of text, the study {human(target)}"
        elif budget[i] != target:
            why[i] = (f"trained {int(reached[i])} of {int(planned[i])} steps "
                      f"({runs.at[i, 'train_status'] if isinstance(runs.at[i, 'train_status'], str) else 'unfinished'})")
    return budget, why


def most_bytes(spec: pd.DataFrame, run_ids: list[str], batch: int, decoder: str) -> dict | None:
    """Of one configuration's runs at one batch size: the chain (k ≥ 2 heads; plain decoding
    for n = 1) or tree size with the most bytes per forward (mean over seeds; the smallest
    size on a tie), and that mean and its standard deviation. Bytes per forward is a count,
    not a timing: a row decode-bench flagged for its timing counts."""
    sel = spec[spec["run_id"].isin(run_ids) & (spec["batch"] == batch) & (spec["decoder"] == decoder)
               & (spec["what"] == "bytes_per_forward")]
    if decoder == "chain" and (sel["nodes"] > 1).any():
        sel = sel[sel["nodes"] > 1]  # a model with heads to draft with: its chains, not plain decoding
    if sel.empty:
        return None
    nodes = sel.groupby("nodes")["value"].mean().idxmax()
    vals = sel[sel["nodes"] == nodes]["value"]
    return {"nodes": int(nodes), "bytes_per_forward": vals.mean(),
            "bytes_per_forward_std": vals.std(ddof=1) if len(vals) > 1 else np.nan}


def fastest(spec: pd.DataFrame, run_ids: list[str], batch: int) -> dict | None:
    """Of one configuration's runs at one batch size, among the timings not flagged: the
    decoder (a chain of k heads, or a tree) with the highest mean speedup over plain
    decoding, with its standard deviation over seeds."""
    sel = spec[spec["run_id"].isin(run_ids) & (spec["batch"] == batch) & (spec["what"] == "speedup")
               & ~spec["flagged"]]
    if sel.empty:
        return None
    means = sel.groupby(["decoder", "nodes"])["value"].mean()
    decoder, nodes = means.idxmax()
    vals = sel[(sel["decoder"] == decoder) & (sel["nodes"] == nodes)]["value"]
    return {"decoder": f"k={nodes}" if decoder == "chain" else f"tree {nodes}", "speedup": vals.mean(),
            "speedup_std": vals.std(ddof=1) if len(vals) > 1 else np.nan}


def config_table(runs: pd.DataFrame, spec: pd.DataFrame, batches: list[int]) -> pd.DataFrame:
    """One row per configuration: size, recipe, n, seeds, parameters, head-1 bits per byte
    (mean, std), its difference to n = 1 of the same size, and per batch size the chain and
    the tree of most bytes per forward and the fastest decoder."""
    rows = []
    for config, g in runs.groupby("configuration", sort=False):
        bpb = _num(g, "val/bpb").dropna()
        row = {"configuration": config, "size": g[SIZE].iloc[0] if SIZE in g else "",
               "recipe": g[RECIPE].iloc[0] if RECIPE in g else "", "n": g["n"].iloc[0],
               "head_type": g["head_type"].iloc[0], "mtp_schedule": g["mtp_schedule"].iloc[0],
               "seeds": len(g), "runs": ", ".join(g["name"]), "params": _num(g, "model/params").mean(),
               "bpb": bpb.mean() if len(bpb) else np.nan, "bpb_std": bpb.std(ddof=1) if len(bpb) > 1 else np.nan}
        for b in batches:
            for decoder in ("chain", "tree"):
                most = most_bytes(spec, list(g["run_id"]), b, decoder) or {}
                for k in ("nodes", "bytes_per_forward", "bytes_per_forward_std"):
                    row[f"b{b}_{decoder}_{k}"] = most.get(k, np.nan)
            fast = fastest(spec, list(g["run_id"]), b) or {}
            for k in ("decoder", "speedup", "speedup_std"):
                row[f"b{b}_fastest_{k}"] = fast.get(k, np.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    n1 = df[df["n"] == 1].groupby("size")["bpb"].mean()
    df["bpb_vs_n1"] = df["bpb"] - df["size"].map(n1)
    return df


def _pm(mean: float, std: float, fmt: str) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:{fmt}}" + (f" ± {std:{fmt}}" if pd.notna(std) else "")


def _bytes_cell(r: pd.Series, b: int, decoder: str) -> str:
    if pd.isna(r.get(f"b{b}_{decoder}_nodes")):
        return "–"
    name = f"k={int(r[f'b{b}_{decoder}_nodes'])}" if decoder == "chain" else f"{int(r[f'b{b}_{decoder}_nodes'])} nodes"
    return f"{_pm(r[f'b{b}_{decoder}_bytes_per_forward'], r[f'b{b}_{decoder}_bytes_per_forward_std'], '.2f')} ({name})"


def _fast_cell(r: pd.Series, b: int) -> str:
    if pd.isna(r.get(f"b{b}_fastest_speedup")):
        return "– (no timing left unflagged)"
    return f"{_pm(r[f'b{b}_fastest_speedup'], r[f'b{b}_fastest_speedup_std'], '.2f')}× ({r[f'b{b}_fastest_decoder']})"


def run_table(runs: pd.DataFrame, budget: pd.Series, why: pd.Series, batches: list[int]) -> pd.DataFrame:
    """One row per run, every run of the study: what it is, what it trained on, its
    bits per byte per head, the training-time drafting telemetry and its decoding."""
    spec = spec_metrics(runs)
    planned = pd.to_numeric(config_params(runs)["train.steps"], errors="coerce")
    rows = []
    for i, r in runs.iterrows():
        n = int(r["n"]) if pd.notna(r["n"]) else 1
        heads = [r.get(f"val/bpb/head_{h}", np.nan) for h in range(2, n + 1)]
        row = {"run": r["name"], "size": r.get(SIZE, ""), "recipe": r.get(RECIPE, ""), "seed": r["seed"], "n": n,
               "head_type": r["head_type"], "mtp_schedule": r["mtp_schedule"],
               "params": _num(runs, "model/params")[i],
               "steps": f"{_num(runs, 'train_step')[i]:.0f} of {planned[i]:.0f}", "train_tokens": budget[i],
               "val_bpb": _num(runs, "val/bpb")[i],
               "val_bpb_heads_2_n": " ".join(f"{v:.3f}" for v in pd.to_numeric(pd.Series(heads), errors="coerce")),
               # the drafting the validation pass measured (teacher-forced): bytes a step
               # would accept with all n heads, under greedy verification
               "train_accepted_bytes": _num(runs, f"val/spec/accepted_bytes_k{n}")[i] if n > 1 else np.nan,
               "compared": "yes" if not why[i] else f"no: {why[i]}"}
        for b in batches:
            for decoder in ("chain", "tree"):
                most = most_bytes(spec, [r["run_id"]], b, decoder)
                row[f"b{b} {decoder} bytes/fwd"] = "–" if most is None else (
                    f"{most['bytes_per_forward']:.2f} ({'k=' if decoder == 'chain' else ''}{most['nodes']}"
                    f"{'' if decoder == 'chain' else ' nodes'})")
            fast = fastest(spec, [r["run_id"]], b)
            row[f"b{b} fastest"] = "–" if fast is None else f"{fast['speedup']:.2f}× ({fast['decoder']})"
            mism = [v for c, v in r.items() if isinstance(c, str) and c.startswith(f"spec/code/b{b}/")
                    and c.endswith("/mismatched") and pd.notna(v)]
            row[f"b{b} mismatched"] = int(sum(mism)) if mism else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_points(table: pd.DataFrame, batch: int) -> pd.DataFrame:
    """The Pareto plot's points at one batch size: per configuration its chain and its tree
    of most bytes per forward (for n = 1, plain decoding: 1 byte per forward)."""
    rows = []
    for _, r in table.iterrows():
        for decoder in ("chain", "tree"):
            if pd.isna(r.get(f"b{batch}_{decoder}_nodes")) or pd.isna(r["bpb"]):
                continue
            rows.append({"configuration": r["configuration"], "batch": batch, "decoder": decoder,
                         "nodes": int(r[f"b{batch}_{decoder}_nodes"]),
                         "bytes_per_forward": r[f"b{batch}_{decoder}_bytes_per_forward"],
                         "bytes_per_forward_std": r[f"b{batch}_{decoder}_bytes_per_forward_std"],
                         "bpb": r["bpb"], "bpb_std": r["bpb_std"],
                         "seeds": r["seeds"], "runs": r["runs"]})
    return pd.DataFrame(rows, columns=["configuration", "batch", "decoder", "nodes", "bytes_per_forward",
                                       "bytes_per_forward_std", "bpb", "bpb_std", "seeds", "runs"])


def front(points: pd.DataFrame) -> pd.DataFrame:
    """The points no other point beats on both axes (fewer bits per byte, more bytes per
    forward), in order of bytes per forward."""
    keep = [i for i, p in points.iterrows()
            if not ((points["bpb"] <= p["bpb"]) & (points["bytes_per_forward"] >= p["bytes_per_forward"]) &
                    ((points["bpb"] < p["bpb"]) | (points["bytes_per_forward"] > p["bytes_per_forward"]))).any()]
    return points.loc[keep].sort_values("bytes_per_forward")


def pareto_plot(points: pd.DataFrame, style: dict, path) -> bool:
    if points.empty:
        return False
    batches = sorted(points["batch"].unique())
    fig, axes = plots.plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        pts = points[points["batch"] == b]
        for _, p in pts.iterrows():
            # colour: the configuration; marker: the decoder kind
            st = {**style.get(p["configuration"], {}), "marker": "s" if p["decoder"] == "tree" else "o"}
            ax.errorbar([p["bytes_per_forward"]], [p["bpb"]], xerr=[np.nan_to_num(p["bytes_per_forward_std"])],
                        yerr=[np.nan_to_num(p["bpb_std"])], ls="none", capsize=3,
                        label=f"{p['configuration']} {p['decoder']} {p['nodes']}", **st)
        f = front(pts)
        ax.plot(f["bytes_per_forward"], f["bpb"], color="gray", lw=0.8, alpha=0.7, label="Pareto front")
        ax.set_xlabel("bytes per forward (decode-bench, code prompts)")
        ax.set_ylabel("head-1 validation bits per byte")
        ax.set_title(f"batch {b}: chain (○) and tree (□) of most bytes per forward", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    plots._save(fig, path)
    return True


def scale_points(table: pd.DataFrame) -> pd.DataFrame:
    """Head-1 bits per byte against parameters for each recipe trained at several sizes."""
    if table.empty or not table["recipe"].astype(bool).any():
        return pd.DataFrame(columns=["recipe", "size", "params", "bpb", "bpb_std", "seeds"])
    sizes = table.groupby("recipe")["size"].nunique()
    sel = table[table["recipe"].isin(sizes[sizes > 1].index)]
    return sel[["recipe", "size", "params", "bpb", "bpb_std", "seeds", "configuration"]].sort_values(["recipe", "params"])


def scale_plot(points: pd.DataFrame, path) -> bool:
    if points.empty:
        return False
    fig, ax = plots.plt.subplots(figsize=(6, 4))
    for i, (recipe, g) in enumerate(points.groupby("recipe", sort=True)):
        ax.errorbar(g["params"], g["bpb"], yerr=np.nan_to_num(g["bpb_std"]), marker=plots.MARKERS[i % 10],
                    color=f"C{i % 10}", capsize=3, label=recipe)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (with heads)")
    ax.set_ylabel("head-1 validation bits per byte")
    ax.set_title("scale trend: the same text at every size", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plots._save(fig, path)
    return True


def _md(df: pd.DataFrame) -> str:
    return tabulate(df.values.tolist(), headers=list(df.columns), tablefmt="github", floatfmt=".4g",
                    disable_numparse=True) if len(df) else "(none)"


def section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
    out = ctx.out
    runs = runs.reset_index(drop=True).copy()  # defragmented: the frame was built column by column
    runs["configuration"] = configurations(runs)
    budget, why = budgets(runs)
    compared = runs[why == ""].reset_index(drop=True)
    spec = spec_metrics(compared)  # bytes per forward from every row; speedups from the rows not flagged
    batches = sorted(spec["batch"].unique().tolist())
    files, md = [], []

    target = budget[why == ""]
    md.append(f"{len(runs)} run(s); {len(compared)} of them trained on the study's budget of "
              f"{human(target.iloc[0]) if len(target) else '?'} tokens (bytes) of text and are compared below. "
              "Seeds of one configuration: mean ± sample standard deviation. Decoding: decode-bench on held-out code "
              f"prompts ({_prompt_note(runs)}); flagged timings are left out.\n")
    left = runs[why != ""]
    if len(left):
        md.append("Runs not compared (another text budget; listed in the run table only):\n")
        md += [f"- `{r['name']}`: {why[i]}" for i, r in left.iterrows()]
        md.append("")

    rt = run_table(runs, budget, why, batches)
    write_text(out / "small_mtp_runs.csv", rt.to_csv(index=False))
    files.append(out / "small_mtp_runs.csv")
    shown = rt.assign(params=rt["params"].map(lambda v: human(v) if pd.notna(v) else "–"),
                      train_tokens=rt["train_tokens"].map(lambda v: human(v) if pd.notna(v) else "–"),
                      val_bpb=rt["val_bpb"].map(lambda v: f"{v:.4f}" if pd.notna(v) else "–"),
                      train_accepted_bytes=rt["train_accepted_bytes"].map(lambda v: f"{v:.2f}" if pd.notna(v) else "–"))
    md += ["### Runs\n", "One row per run (`small_mtp_runs.csv`): head-1 and heads 2..n validation bits per byte; "
           "`train_accepted_bytes`: bytes a step would accept with all heads under greedy verification, measured on "
           "the validation text during training; per batch size the chain and the tree of most bytes per forward, "
           "the fastest decoder (speedup over plain decoding, timings decode-bench flagged left out) and the "
           "sequences whose completion differs from plain greedy decoding.\n",
           _md(shown), ""]

    table = config_table(compared, spec, batches)
    if not table.empty:
        write_text(out / "small_mtp_configs.csv", table.to_csv(index=False))
        files.append(out / "small_mtp_configs.csv")
        cells = []
        for _, r in table.iterrows():
            cells.append([r["configuration"], r["seeds"], human(r["params"]) if pd.notna(r["params"]) else "–",
                          _pm(r["bpb"], r["bpb_std"], ".4f"),
                          "–" if pd.isna(r["bpb_vs_n1"]) else f"{r['bpb_vs_n1']:+.4f}",
                          *[c for b in batches for c in (_bytes_cell(r, b, "chain"), _bytes_cell(r, b, "tree"),
                                                        _fast_cell(r, b))]])
        headers = ["configuration", "seeds", "params", "head-1 bpb", "Δ bpb vs n = 1 (same size)",
                   *[h for b in batches for h in (f"batch {b}: chain bytes/fwd", f"batch {b}: tree bytes/fwd",
                                                   f"batch {b}: fastest")]]
        md += ["### Configurations\n", "Seeds averaged (`small_mtp_configs.csv`). Δ bpb: the configuration's mean "
               "head-1 bits per byte minus that of n = 1 at the same size (negative: better); read it against the "
               "seed spreads (±). Bytes per forward: the chain and the tree size with the most (mean over seeds); "
               "fastest: the decoder with the highest mean speedup over plain decoding.\n",
               tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True), ""]

    style = plots.styles(compared.assign(name=compared["configuration"]))
    figures = []
    points = pd.concat([pareto_points(table, b) for b in batches]) if len(table) and batches else pd.DataFrame()
    if pareto_plot(points, style, out / "pareto.png"):
        write_text(out / "pareto.csv", points.to_csv(index=False))
        figures.append(("head-1 bits per byte against bytes per forward (Pareto)", "pareto.png", "pareto.csv",
                        "one point per configuration and decoder kind: its chain and its tree of most bytes per "
                        "forward (n = 1: plain decoding, 1 byte per forward) at each batch size; error bars: "
                        "standard deviation over seeds; the gray line joins the points no other point beats on both "
                        "axes"))
    for b in batches:
        fname = f"speedup_vs_heads_b{b}.png"
        if plots.speedup_vs_heads(compared.assign(name=compared["configuration"] + "-s0"), out / fname, batch=b):
            figures.append((f"speedup against heads used, batch {b}", fname, None,
                            "mean over seeds; chains by heads used, trees by nodes; the paper's 7B chains dashed gray"))
    if ctx.uri:  # the curves need the store's metric histories (none when rebuilt from a runs.csv)
        history = metric_history(ctx.uri, list(compared["run_id"]), ["val/bpb", "train/bytes_seen"])
        named = compared.assign(name=compared["configuration"] + compared["seed"].map(lambda s: f"-s{s}"))
        if plots.bpb_curves(named, history, out / "bpb_vs_bytes.png", "train/bytes_seen", "training bytes of text"):
            figures.append(("head-1 bits per byte against training bytes", "bpb_vs_bytes.png", None,
                            "every compared run, one colour per configuration (its seeds share it)"))
    scale = scale_points(table)
    if scale_plot(scale, out / "scale_trend.png"):
        write_text(out / "scale_trend.csv", scale.to_csv(index=False))
        figures.append(("scale trend: head-1 bits per byte against parameters", "scale_trend.png", "scale_trend.csv",
                        "the recipes trained at several sizes, on the same text; error bars: standard deviation over "
                        "seeds"))
    for title, fname, csv, rests in figures:
        files.append(out / fname)
        data = f" Numbers drawn: `{csv}`." if csv else ""
        if csv:
            files.append(out / csv)
        md.append(f"\n### Figure: {title}\n\n![{title}]({fname})\n\n*{rests[0].upper() + rests[1:]}; "
                  f"{len(compared)} run(s) of one budget.{data}*\n")
    return Section("small MTP: better and faster at ~100M parameters?", "\n".join(md), files)


def _prompt_note(runs: pd.DataFrame) -> str:
    """The prompts per batch size the sweep's bench stage logged (`stage.bench.n_prompts`)."""
    vals = sorted({str(v) for v in runs.get("params.stage.bench.n_prompts", pd.Series(dtype=object)).dropna()})
    if not vals:
        return "prompt counts not logged"
    return "; ".join(", ".join(f"batch {p.split(':')[0][1:]}: {p.split(':')[1]} prompts" for p in v.split(","))
                     for v in vals)
