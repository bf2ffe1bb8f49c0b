"""Report section of the n × vocabulary study: Table 1 and Table S3 beside the paper's."""

from __future__ import annotations

import numpy as np
import pandas as pd
from tabulate import tabulate

from analysis import plots
from analysis.passk_ci import LEVEL, Uncertainty
from analysis.paper_numbers import KS, TABLE1_CAPTION, TABLE_S3, TABLE_S3_CAPTION, TASK_TITLES, TASKS, table1_rows
from analysis.runs import metric_history, pass_metrics, spec_metrics
from analysis.sections import ReportContext, Section
from analysis.tables import VOCAB_ORDER, VOCAB_TITLES, csv_frame, latex_table, render, summary
from bytelm.fileio import write_text
from bytelm.units import human

# the paper's rows each of our vocabularies is set beside (Table 1's 200B-token block is
# the one with n = 1, 2, 4, 6, 8)
PAPER_DATA = {"bytes": "313B bytes (0.5 ep)", "bpe": "200B tok (0.8 ep)"}


def with_intervals(df: pd.DataFrame, passk: Uncertainty | None) -> pd.DataFrame:
    """The table's pass@k columns with their configuration's interval over problems
    (`<key>:lo`, `<key>:hi`; NaN where unavailable)."""
    if passk is None:
        return df
    df = df.copy()
    for task in TASKS:
        for k in KS:
            key = f"pass_at_{k}/{task}/best"
            if key not in df:
                continue
            cis = [passk.config_ci(cid, task, k) for cid in df["config_id"]]
            # at the floor the bootstrap's [0, 0] is no interval: the cell says "none passed" instead
            df[f"{key}:lo"] = [np.nan if ci is None or ci[2] else ci[0] for ci in cis]
            df[f"{key}:hi"] = [np.nan if ci is None or ci[2] else ci[1] for ci in cis]
            df[f"{key}:floor"] = [ci is not None and ci[2] for ci in cis]
    return df


def caption(runs: pd.DataFrame, df: pd.DataFrame, speed_desc: str, passk: Uncertainty | None = None) -> str:
    pm = pass_metrics(runs)
    temps = sorted({t for t in pm["temp"] if t != "best"})
    # logged by `bytelm eval` (eval/n_samples); the eval.n_samples param is only the config's default
    n_samples = sorted({int(v) for c in runs.columns if c.endswith("n_samples") and not c.startswith("params.")
                        for v in runs[c].dropna()})
    parts = []
    if not pm.empty:
        samples = ", ".join(map(str, n_samples)) if n_samples else "an unrecorded number of"
        on = [f"{TASK_TITLES.get(t, t)} {rests_on(runs, t).split(',')[0]}" for t in TASKS
              if rests_on(runs, t) != "–"]
        parts.append(
            f"pass@k (%) from {samples} samples per problem (unbiased estimator; {'; '.join(on)}), at the oracle "
            "temperature: "
            f"for each model, task and k the best of T ∈ {{{', '.join(f'{t:g}' for t in temps)}}} (the paper's Table 1 rule)."
        )
        have = [c for c in df.columns if c.startswith("pass_at_") and c.endswith(":lo")]
        with_ci = sum(int(df[c].notna().sum()) for c in have)
        floor = sum(int(df[c.replace(":lo", ":floor")].sum()) for c in have)
        cells = sum(int(df[c.removesuffix(":lo")].notna().sum()) for c in have)
        if floor:
            parts.append(f"“none passed”: at the floor, not one sample of any problem passed ({floor} cells).")
        if with_ci:
            missing = cells - with_ci - floor
            parts.append(f"In brackets: the {LEVEL:.0%} bootstrap interval over problems (seeds pooled; section "
                         "'pass@k with confidence intervals')" + (f"; {missing} of {cells} pass@k cells have none, for "
                                                                   "want of per-problem counts." if missing else "."))
        elif passk is not None and not floor:
            parts.append("No pass@k here has a confidence interval: the runs logged no per-problem counts (section "
                         "'pass@k with confidence intervals' says why); read them as point estimates only.")
    else:
        parts.append("No pass@k evaluations were logged.")
    seeds = int(df["seeds"].max()) if len(df) else 1
    if seeds > 1:
        parts.append(f"Several seeds (up to {seeds}): mean ± sample standard deviation.")
    parts.append("val bpb: validation bits per byte of the next-token head at the end of training. "
                 "train bytes / FLOPs: text bytes seen and training FLOPs (all heads, attention included).")
    if speed_desc:
        parts.append(f"speedup: self-speculative greedy decoding against plain decoding ({speed_desc}), "
                     "best over the heads used k.")
    parts.append("Best value per column in bold.")
    return " ".join(parts)


def rests_on(runs: pd.DataFrame, task: str) -> str:
    """What a pass@k of these runs (seeds of one configuration) rests on: '4 of 164
    problems, 2 samples' (samples per problem and temperature), from the eval's metrics."""
    def values(col: str) -> str:
        vals = sorted({int(v) for v in pd.to_numeric(runs.get(col, pd.Series(dtype=float)), errors="coerce").dropna()})
        return "/".join(map(str, vals)) if vals else "?"

    if not pd.to_numeric(runs.get(f"pass_at_1/{task}/best", pd.Series(dtype=float)), errors="coerce").notna().any():
        return "–"
    problems, in_task = values(f"eval/{task}/problems"), values(f"eval/{task}/problems_in_task")
    if problems == "?":
        return f"problems not recorded, {values('eval/n_samples')} samples"
    return f"{problems} of {in_task} problems, {values('eval/n_samples')} samples"


def paper_side_by_side(df: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Our pass@1/10/100 per task next to the paper's Table 1 row of the same vocabulary
    and n, with the problems and samples ours rest on (the paper's: every problem, 200)."""
    rows = []
    for _, r in df.iterrows():
        paper = table1_rows(r["vocab"]).get((PAPER_DATA.get(r["vocab"], ""), int(r["n"])) if pd.notna(r["n"]) else None)
        if paper is None:
            continue
        group = runs[(runs["config_id"] == r["config_id"]) & (runs["vocab"] == r["vocab"]) & (runs["n"] == r["n"])]
        cells = [VOCAB_TITLES.get(r["vocab"], r["vocab"]), int(r["n"])] + ([r["config"]] if "config" in df else [])
        for task in TASKS:
            cells.append(" / ".join(_ours(r, f"pass_at_{k}/{task}/best") for k in KS))
            cells.append(rests_on(group, task))
            cells.append(" / ".join(f"{v:.1f}" for v in paper[task]))
        rows.append(cells)
    if not rows:
        return ""
    headers = ["vocab", "n"] + (["config"] if "config" in df else [])
    for task in TASKS:
        headers += [f"{TASK_TITLES[task]} ours", f"{TASK_TITLES[task]} ours rest on", f"{TASK_TITLES[task]} paper"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _ours(r: pd.Series, key: str) -> str:
    """One of our pass@k beside the paper's: the value with its interval over problems
    where the report has one, "none passed" at the floor."""
    v = r.get(key, np.nan)
    if pd.isna(v):
        return "–"
    if pd.notna(r.get(f"{key}:lo", np.nan)):
        return f"{100 * v:.1f} [{100 * r[f'{key}:lo']:.1f}, {100 * r[f'{key}:hi']:.1f}]"
    floor = r.get(f"{key}:floor", np.nan)
    return f"{100 * v:.1f}" + (" (none passed)" if pd.notna(floor) and bool(floor) else "")


def s3_side_by_side(runs: pd.DataFrame) -> tuple[str, str]:
    """Speedup / tokens per forward by decoder (a chain of k heads, or a tree of N nodes
    with every head), one column per prompt set and batch size benchmarked (code first),
    ours beside the paper's Table S3 (whose models are the 7B byte models with n = 8, 16,
    32, on code at batch 16, chains only)."""
    spec = spec_metrics(runs)
    if spec.empty:
        return "", ""
    spec = spec.merge(runs[["run_id", "vocab", "n"]], on="run_id")
    index = ["vocab", "n", "decoder", "nodes", "prompts", "batch"]
    wide = spec.pivot_table(index=index, columns="what", values="value", aggfunc="mean")
    wide["flagged"] = spec.groupby(index)["flagged"].any()
    keys = wide.index.to_frame(index=False)
    settings = sorted(set(zip(keys["prompts"], keys["batch"])), key=lambda pb: (pb[0] != "code", pb[0], pb[1]))
    configs = keys[["vocab", "n", "decoder", "nodes"]].drop_duplicates().sort_values(
        ["vocab", "n", "decoder", "nodes"], key=lambda c: c.map(VOCAB_ORDER).fillna(9) if c.name == "vocab" else c)
    rows = []
    for vocab, n, decoder, nodes in configs.itertuples(index=False):
        cells = [_s3_cell(wide.loc[vocab, n, decoder, nodes, p, b], vocab)
                 if (vocab, n, decoder, nodes, p, b) in wide.index else "–" for p, b in settings]
        paper = TABLE_S3.get(int(n), {}).get(int(nodes)) if vocab == "bytes" and decoder == "chain" else None
        rows.append([VOCAB_TITLES.get(vocab, vocab), int(n), f"{int(nodes)} heads" if decoder == "chain" else "tree",
                     int(nodes), *cells, f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "–"])
    headers = ["vocab", "n", "decoder", "nodes", *(f"{p}, batch {b}" for p, b in settings), "paper (code, batch 16)"]
    if wide["flagged"].any():
        desc_flag = (" A cell marked ⚠ holds a timing decode-bench flagged (its repeats disagree, the machine was "
                     "busy, or the speedup exceeds tokens per forward: the run's bench JSON says which): it is not a "
                     "result, and the plots and the table's speedup column leave it out")
    else:
        desc_flag = ""
    desc = ("speedup / tokens per forward (in brackets, bytes per forward where a token is not a byte), then the "
            "efficiency (speedup ÷ tokens per forward) and the step cost (a step's time over a plain step's) where "
            "measured; mean over seeds, for each prompt set and batch size benchmarked; nodes: the positions a "
            "step verifies per row (a chain of k heads: k)." + desc_flag)
    return tabulate(rows, headers=headers, tablefmt="github"), desc.rstrip(".")


def _s3_cell(r: pd.Series, vocab: str) -> str:
    cell = ("⚠ " if r.get("flagged", False) else "") + f"{r.get('speedup', np.nan):.2f} / {r.get('tokens_per_forward', np.nan):.2f}"
    if vocab != "bytes":
        cell += f" [{r.get('bytes_per_forward', np.nan):.2f}]"
    if pd.notna(r.get("efficiency", np.nan)):
        cell += f", eff. {r['efficiency']:.2f}, step {r.get('step_cost', np.nan):.2f}"
    return cell


def section(ctx: ReportContext, runs: pd.DataFrame) -> Section:
    out = ctx.out
    files = []
    df, labels, columns, speed_desc = summary(runs)
    df = with_intervals(df, ctx.passk)
    cap = caption(runs, df, speed_desc, ctx.passk)
    md_table = render(df, labels, columns, "md")
    write_text(out / "table1.md", f"{md_table}\n\n{cap}\n")
    write_text(out / "table1.tex", latex_table(render(df, labels, columns, "tex"), cap))
    write_text(out / "table1.csv", csv_frame(df, labels, columns).to_csv(index=False))
    files += [out / "table1.md", out / "table1.tex", out / "table1.csv"]

    figures = []
    # the training curves need the store's metric histories (none when rebuilt from a runs.csv)
    history = (metric_history(ctx.uri, list(runs["run_id"]), ["val/bpb", "train/bytes_seen", "train/flops"]) if ctx.uri
               else pd.DataFrame(columns=["run_id", "key", "step", "value"]))
    for fname, title, draw in (
        ("passk_vs_k.png", "pass@k against k", lambda p: plots.passk_vs_k(runs, p, ctx.passk)),
        ("vs_n.png", "pass@1 and bits per byte against n", lambda p: plots.metrics_vs_n(runs, p, ctx.passk)),
        ("speedup_vs_heads.png", "speculative decoding against heads used and tree size", lambda p: plots.speedup_vs_heads(runs, p)),
        ("bpb_vs_bytes.png", "validation bits per byte against training bytes",
         lambda p: plots.bpb_curves(runs, history, p, "train/bytes_seen", "training bytes of text")),
        ("bpb_vs_flops.png", "validation bits per byte against training FLOPs",
         lambda p: plots.bpb_curves(runs, history, p, "train/flops", "training FLOPs")),
    ):
        if draw(out / fname):
            figures.append((title, fname))
            files.append(out / fname)

    params = pd.to_numeric(runs.get("model/params", pd.Series(dtype=float)), errors="coerce").dropna()
    if not len(params):
        size = "Models of unlogged size"
    elif params.min() == params.max():
        size = f"Models of {human(params.min())} parameters"
    else:
        size = f"Models of {human(params.min())}–{human(params.max())} parameters"
    scale = ""
    if len(params):
        # The paper's own scaling study (Fig. 3) finds MTP helps only from ~1B parameters
        # up: say how far below that these runs are, so small-model numbers are read as such.
        scale = (f" These are {7e9 / params.max():,.0f}× smaller than the paper's models; at this size pass@k near "
                 "zero and small differences mean little (the paper's 0.3B and 0.6B models are worse with MTP, "
                 "Fig. 3), so bits per byte and the decoding speedup are the measures to read.")
    md = [f"{size} (the paper's: 7B, trained on 200–313B tokens or bytes).{scale} Table in the layout of the "
          f"paper's Table 1 (`table1.md`, `table1.tex`, `table1.csv`):\n", md_table, f"\n*{cap}*\n"]
    if "config" in labels:
        md.append("Runs are averaged as seeds only when their resolved configs are equal apart from the seed (and "
                  "the run's name and eval defaults). Rows that share data, vocabulary and n but not their config are "
                  "separate configurations: column `config` names the keys whose values differ.\n")
    side = paper_side_by_side(df, runs) if not pass_metrics(runs).empty else ""
    if side:
        md += ["\n### Beside the paper's Table 1\n",
               "pass@1 / @10 / @100 (%), ours (mean over seeds, with the 95% interval over problems where there "
               "is one) and the paper's row of the same vocabulary and n "
               f"(bytes: {PAPER_DATA['bytes']}; BPE: the paper's 32k-token models, {PAPER_DATA['bpe']}). "
               "Ours rest on the problems and samples per problem and temperature named beside them; the paper's on "
               "every problem with 200 samples.\n", side, f"\n*{TABLE1_CAPTION}*\n"]
    s3, s3_desc = s3_side_by_side(runs)
    if s3:
        md += [f"\n### Self-speculative decoding beside the paper's Table S3\n\nOurs: {s3_desc}.\n", s3,
               f"\n*{TABLE_S3_CAPTION}*\n"]
    for title, fname in figures:
        md.append(f"\n### Figure: {title}\n\n![{title}]({fname})\n")
    return Section("n-ablation: vocabulary × number of future heads", "\n".join(md), files)
