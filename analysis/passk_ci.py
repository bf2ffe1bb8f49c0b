"""pass@k with its uncertainty over problems: confidence intervals and paired tests.

A benchmark's pass@k is a mean over its problems of each problem's unbiased pass@k
(bytelm.evaluation.passk). At the sizes of this suite's studies most problems are never
solved and a handful decide the number, so which problems the benchmark happens to hold
is the largest source of uncertainty. The inputs are the per-problem counts that
`bytelm eval` logs (artifact eval/passk_problems/<task>_t<T>.json: n samples and c passed
per problem), at the temperature a run's pass@k is reported at (its oracle temperature,
metric pass_at_<k>/<task>/best_t).

- Interval: a percentile bootstrap over problems: N_RESAMPLES resamples of the problems
  with replacement, the mean of the per-problem pass@k of each, and the 2.5% and 97.5%
  quantiles of those means. The generator's seed is fixed (SEED), so a report rebuilt
  from the same runs prints the same intervals. Seeds of one configuration are pooled
  per problem (the mean over seeds of each problem's pass@k, which averages to the
  table's mean over seeds), and the problems are resampled jointly.
- Paired test: two configurations on the same problems differ by d_i per problem. The
  p-value is a sign-flip (paired permutation) test of the mean of d: under the null
  hypothesis that the configurations are exchangeable on each problem, each d_i is as
  likely to be -d_i, so the test is exact at any number of problems (enumerated up to
  EXACT_MAX non-zero differences, Monte Carlo beyond), needs no normal approximation
  (which fails when most d_i are 0), and for 0/1 outcomes is the exact sign (McNemar)
  test. The difference's interval is the paired bootstrap over problems.
- At the floor (no sample passed on any problem) the bootstrap interval is [0, 0] by
  construction; the report then gives the one-sided bound `floor_bound` instead.

What the intervals leave out: the spread over training seeds (Table 1's ±) and the
optimism of taking each run's best temperature.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from analysis.paper_numbers import TASKS
from bytelm.evaluation.passk import pass_at_k

N_RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
EXACT_MAX = 16  # sign-flip test: enumerate all 2^m sign patterns up to this many non-zero differences
_CHUNK = 1_000  # resamples drawn at a time (bounds memory at CHUNK x problems)
ALPHA = 1 - LEVEL


# ----------------------------------------------------------------------------- statistics


def per_problem(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """Each problem's unbiased pass@k from its n samples and c passed."""
    return np.array([pass_at_k(int(ni), int(ci), k) for ni, ci in zip(n, c)], dtype=float)


def bootstrap_means(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The mean of `values` (one per problem) over `n_resamples` resamples of the problems
    with replacement."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, _CHUNK):
        b = min(_CHUNK, n_resamples - start)
        means[start:start + b] = values[rng.integers(0, len(values), size=(b, len(values)))].mean(axis=1)
    return means


def bootstrap_ci(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the mean over problems and its percentile-bootstrap interval."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("a bootstrap over problems needs at least one problem")
    lo, hi = np.quantile(bootstrap_means(values, n_resamples, seed), [(1 - level) / 2, (1 + level) / 2])
    # the quantiles of means of the same numbers can differ from the mean in the last bit
    mean = float(values.mean())
    return mean, float(min(lo, mean)), float(max(hi, mean))


def sign_flip_p(d: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of the paired sign-flip test that the mean of d is 0: the share
    of sign patterns whose |sum| is at least the observed one. Exact over all 2^m patterns
    of the m non-zero d_i when m <= EXACT_MAX; otherwise (1 + hits) / (1 + n_resamples)
    over random patterns (a valid p-value, never 0)."""
    d = np.asarray(d, dtype=float)
    d = d[d != 0]  # a zero difference is the same under either sign
    if d.size == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, observed)  # equal sums up to rounding count as "at least"
    if d.size <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, _CHUNK):
        b = min(_CHUNK, n_resamples - start)
        signs = rng.choice((1.0, -1.0), size=(b, d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (1 + hits) / (1 + n_resamples)


def floor_bound(n_samples: int, k: int, level: float = LEVEL) -> float:
    """A one-sided upper bound on pass@k when none of `n_samples` samples (over all
    problems) passed. With per-problem pass rates p_i and N samples of each of P problems,
    P(no pass) = prod (1 - p_i)^N <= (1 - mean p)^(NP) (the geometric mean is at most the
    arithmetic one), so pass@1 >= u would make the observation less likely than 1 - level
    for u = 1 - (1 - level)^(1/(NP)); pass@k <= k pass@1 (a union bound over k samples)."""
    return min(1.0, k * (1 - (1 - level) ** (1 / n_samples)))


# ----------------------------------------------------------------------------- per-problem counts


def load_problem_counts(uri: str, run_ids: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The per-problem counts the runs logged: a long frame run_id, task, temp, task_id,
    n, c, generated; and, for each run whose files could not be read, why."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    from bytelm.evaluation.runner import PROBLEMS_DIR

    client = MlflowClient(uri)
    frames, bad = [], {}
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        for run_id in run_ids:
            folder = f"eval/{PROBLEMS_DIR}"
            if not client.list_artifacts(run_id, folder):
                continue
            local = Path(download_artifacts(run_id=run_id, artifact_path=folder, dst_path=str(Path(tmp) / run_id),
                                            tracking_uri=uri))
            for f in sorted(local.glob("*.json")):
                try:
                    frames.append(_counts_frame(run_id, json.loads(f.read_text())))
                except (ValueError, KeyError, TypeError) as e:
                    bad[run_id] = f"{folder}/{f.name} is not a per-problem counts file ({e})"
    cols = ["run_id", "task", "temp", "task_id", "n", "c", "generated"]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)), bad


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per download; a report reads many small files."""
    key, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _counts_frame(run_id: str, d: dict) -> pd.DataFrame:
    ids, n, c = list(d["task_ids"]), np.asarray(d["n"], dtype=int), np.asarray(d["c"], dtype=int)
    if not (len(ids) == len(n) == len(c)) or not ids:
        raise ValueError("task_ids, n and c differ in length or are empty")
    if np.any(n < 1) or np.any(c < 0) or np.any(c > n):
        raise ValueError("needs 0 <= c <= n and n >= 1 per problem")
    # files written before `generated` was recorded: every problem counted as generated
    generated = np.asarray(d.get("generated", [True] * len(ids)), dtype=bool)
    if len(generated) != len(ids):
        raise ValueError("generated differs in length from task_ids")
    return pd.DataFrame({"run_id": run_id, "task": str(d["task"]), "temp": float(d["temperature"]), "task_id": ids,
                         "n": n, "c": c, "generated": generated})


# ----------------------------------------------------------------------------- the report's view


@dataclass
class Uncertainty:
    """Intervals of every run and configuration, paired comparisons, and why any is
    missing. `intervals` rows: level ("config" or "run"), config_id, label, runs, task, k,
    value (the logged pass@k; the mean over seeds for a configuration), lo, hi (NaN where
    unavailable), problems, samples (per problem), floor (no sample passed), note.
    `paired` rows: task, k, label, vs, diff, lo, hi, p, problems, differ (problems whose
    pass@k differs), note."""

    intervals: pd.DataFrame
    paired: pd.DataFrame
    markdown: str = ""
    # per-problem pass@k of each configuration with an interval, seeds pooled, by
    # (config_id, task, k): a section's own comparisons go through paired_difference
    pooled: dict = field(default_factory=dict)
    context: list[str] = field(default_factory=list)  # the columns a comparison stays within (context_axes)

    def config_ci(self, config_id: str, task: str, k: int) -> tuple[float, float, bool] | None:
        """A configuration's interval and whether it is at the floor, or None where unavailable."""
        sel = self.intervals[(self.intervals["level"] == "config") & (self.intervals["config_id"] == config_id)
                             & (self.intervals["task"] == task) & (self.intervals["k"] == k)]
        if sel.empty or pd.isna(sel["lo"].iloc[0]):
            return None
        return float(sel["lo"].iloc[0]), float(sel["hi"].iloc[0]), bool(sel["floor"].iloc[0])


PASS_BEST = "pass_at_{k}/{task}/best"


def _reported(runs: pd.DataFrame) -> list[tuple[str, int]]:
    """(task, k) of every pass@k some run reports at its oracle temperature."""
    from analysis.runs import pass_metrics

    pm = pass_metrics(runs)
    pm = pm[pm["temp"] == "best"]
    return sorted({(t, int(k)) for t, k in zip(pm["task"], pm["k"])})


def _run_values(run: pd.Series, counts: pd.DataFrame, task: str, k: int) -> tuple[pd.Series | None, str]:
    """One run's per-problem pass@k (indexed by task id) at the temperature of its reported
    pass@k, or None and why not."""
    value = run.get(PASS_BEST.format(k=k, task=task))
    if value is None or pd.isna(value):
        return None, "not evaluated"
    mine = counts[(counts["run_id"] == run["run_id"]) & (counts["task"] == task)]
    if mine.empty:
        return None, "no per-problem counts logged (evaluated before `bytelm eval` logged them)"
    temp = run.get(f"pass_at_{k}/{task}/best_t")
    if temp is None or pd.isna(temp):
        return None, "its oracle temperature was not logged"
    sel = mine[np.isclose(mine["temp"].astype(float), float(temp))]
    if sel.empty:
        return None, f"no per-problem counts at its oracle temperature {float(temp):g}"
    if int(sel["n"].min()) < k:
        return None, f"fewer than {k} samples of some problem"
    vals = pd.Series(per_problem(sel["n"].to_numpy(), sel["c"].to_numpy(), k), index=sel["task_id"].to_numpy())
    if not np.isclose(vals.mean(), float(value), rtol=0, atol=1e-9):
        return None, (f"its per-problem counts give {vals.mean():.4f}, not the logged {float(value):.4f} "
                      "(evaluated again since?)")
    return vals, ""


def _row(level: str, config_id: str, label: str, names: list[str], task: str, k: int, value: float,
         vals: pd.DataFrame | None, samples: list[tuple[int, int]], note: str) -> dict:
    """`vals`: per-problem pass@k, a column per run (None: unavailable); `samples`: each
    run's (samples per problem, samples generated in all): the generated ones bound a floor."""
    row = {"level": level, "config_id": config_id, "label": label, "runs": ", ".join(names), "task": task, "k": k,
           "value": value, "lo": np.nan, "hi": np.nan, "problems": np.nan, "samples": np.nan, "floor": False,
           "floor_bound": np.nan, "note": note}
    if vals is not None:
        pooled = vals.mean(axis=1).to_numpy()
        _, row["lo"], row["hi"] = bootstrap_ci(pooled)
        row["problems"] = len(pooled)
        per = {n for n, _ in samples}
        row["samples"] = per.pop() if len(per) == 1 else np.nan  # per problem, when the runs agree
        if not pooled.any():
            row["floor"] = True
            drawn = sum(g for _, g in samples)
            # no sample drawn (every prompt longer than the context): zeros that bound nothing
            row["floor_bound"] = floor_bound(drawn, k) if drawn else np.nan
    return row


def uncertainty(runs: pd.DataFrame, counts: pd.DataFrame, unreadable: dict[str, str] | None = None) -> Uncertainty:
    """Intervals of every run and configuration (runs grouped by config_id, labelled by
    their name without the seed) and each configuration's paired comparisons with the
    n = 1 configurations of its context (`baselines`)."""
    from analysis.plots import config_label

    unreadable = unreadable or {}
    rows, pooled = [], {}
    for task, k in _reported(runs):
        for cid, group in runs.groupby("config_id", sort=False, dropna=False):
            label = config_label(group["name"].iloc[0])
            per_run, samples, notes = {}, [], []
            for _, run in group.iterrows():
                value = run.get(PASS_BEST.format(k=k, task=task))
                if value is None or pd.isna(value):
                    continue
                vals, why = _run_values(run, counts, task, k)
                if vals is None:
                    why = unreadable.get(run["run_id"], why)
                    notes.append((run["name"], why))
                else:
                    per_run[run["name"]] = vals
                    samples.append(_samples(counts, run, task, k))
                rows.append(_row("run", cid, label, [run["name"]], task, k, float(value),
                                 None if vals is None else vals.to_frame(), samples[-1:], why))
            values = pd.to_numeric(group[PASS_BEST.format(k=k, task=task)], errors="coerce").dropna()
            if values.empty:
                continue
            names = list(group.loc[values.index, "name"])
            frame, note = None, _config_note(notes, len(names))
            if not notes:
                frame = pd.concat(per_run, axis=1)
                if frame.isna().any().any():
                    frame, note = None, "its seeds evaluated different problems"
            rows.append(_row("config", cid, label, names, task, k, float(values.mean()), frame, samples, note))
            if frame is not None:
                pooled[cid, task, k] = frame.mean(axis=1)
    order = {t: i for i, t in enumerate(TASKS)}
    rows.sort(key=lambda r: (order.get(r["task"], len(order)), r["task"], r["k"], r["level"], r["label"], r["runs"]))
    intervals = pd.DataFrame(rows, columns=["level", "config_id", "label", "runs", "task", "k", "value", "lo", "hi",
                                            "problems", "samples", "floor", "floor_bound", "note"])
    return Uncertainty(intervals, _paired(runs, intervals, pooled), pooled=pooled, context=context_axes(runs))


def _config_note(notes: list[tuple[str, str]], n_runs: int) -> str:
    """Why a configuration has no interval: the reason, once, when every run shares it;
    else each run's."""
    if notes and len(notes) == n_runs and len({why for _, why in notes}) == 1:
        return notes[0][1]
    return "; ".join(f"`{name}`: {why}" for name, why in notes)


def _samples(counts: pd.DataFrame, run: pd.Series, task: str, k: int) -> tuple[int, int]:
    """A run's evaluation at its oracle temperature for k: samples per problem (the
    fewest, should problems differ), and samples generated in all."""
    temp = float(run[f"pass_at_{k}/{task}/best_t"])
    sel = counts[(counts["run_id"] == run["run_id"]) & (counts["task"] == task) & np.isclose(counts["temp"], temp)]
    return int(sel["n"].min()), int(sel.loc[sel["generated"], "n"].sum())


def context_axes(runs: pd.DataFrame) -> list[str]:
    """The columns that set the scene of a comparison rather than name a configuration:
    data set, vocabulary, and every other grid axis each of whose values holds both n = 1
    and n > 1 runs (a model size does; a recipe axis whose values fix n does not)."""
    keys = [c for c in ("data", "vocab") if c in runs]
    for col in sorted(c for c in runs.columns if c.startswith("grid.") and c not in ("grid.n", "grid.seed", "grid.vocab")):
        ns = pd.to_numeric(runs["n"], errors="coerce")
        groups = [ns[runs[col] == v] for v in runs[col].dropna().unique()]
        if groups and all((g == 1).any() and (g > 1).any() for g in groups):
            keys.append(col)
    return keys


def baselines(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(config_id, baseline config_id) pairs to test: within each context (context_axes:
    data set, vocabulary, e.g. model size), every configuration against each n = 1
    configuration (the paper's comparison), or against the smallest n where none has n = 1."""
    pairs = []
    keys = context_axes(runs)
    for _, group in (runs.groupby(keys, dropna=False, sort=False) if keys else [(None, runs)]):
        ns = pd.to_numeric(group["n"], errors="coerce")
        if ns.isna().all():
            continue
        base = set(group.loc[ns == (1 if (ns == 1).any() else ns.min()), "config_id"])
        for cid in dict.fromkeys(group["config_id"]):
            pairs += [(cid, b) for b in sorted(base) if b != cid]
    return pairs


def paired_difference(a: pd.Series, b: pd.Series) -> dict:
    """a - b over the problems both have (per-problem pass@k indexed by task id): the mean
    difference, its paired-bootstrap interval, the sign-flip p-value, the problems used."""
    common = a.index.intersection(b.index)
    d = (a[common] - b[common]).to_numpy()
    diff, lo, hi = bootstrap_ci(d)
    return {"diff": diff, "lo": lo, "hi": hi, "p": sign_flip_p(d), "problems": len(common),
            "differ": int(np.count_nonzero(d))}


def _paired(runs: pd.DataFrame, intervals: pd.DataFrame, pooled: dict) -> pd.DataFrame:
    rows = []
    labels = dict(zip(intervals["config_id"], intervals["label"]))
    order = {t: i for i, t in enumerate(TASKS)}
    reported = set(zip(intervals["task"], intervals["k"]))
    for task, k in sorted(reported, key=lambda tk: (order.get(tk[0], len(order)), tk[0], tk[1])):
        for cid, base in baselines(runs):
            if cid not in labels or base not in labels:
                continue
            row = {"task": task, "k": k, "label": labels[cid], "vs": labels[base], "diff": np.nan, "lo": np.nan,
                   "hi": np.nan, "p": np.nan, "problems": np.nan, "differ": np.nan,
                   "note": ""}
            a, b = pooled.get((cid, task, k)), pooled.get((base, task, k))
            if a is None or b is None:
                row["note"] = "unavailable: per-problem counts missing for " + " and ".join(
                    f"`{labels[x]}`" for x, v in ((cid, a), (base, b)) if v is None)
            elif not len(a.index.intersection(b.index)):
                row["note"] = "unavailable: no problem evaluated by both"
            else:
                row.update(paired_difference(a, b))
            rows.append(row)
    return pd.DataFrame(rows, columns=["task", "k", "label", "vs", "diff", "lo", "hi", "p", "problems", "differ", "note"])


# ----------------------------------------------------------------------------- markdown


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(value: float, lo: float, hi: float) -> str:
    """'12.3 [8.1, 16.9]' (percent); the value alone where the interval is unavailable."""
    return pct(value) + ("" if pd.isna(lo) else f" [{pct(lo)}, {pct(hi)}]")


def _interval_note(r: pd.Series) -> str:
    if pd.isna(r["lo"]):
        return f"interval unavailable: {r['note']}"
    if r["floor"] and pd.isna(r["floor_bound"]):
        return "at the floor, and not a measurement: no sample was generated (every prompt longer than the context)"
    if r["floor"]:
        return (f"at the floor: no sample of {int(r['problems'])} problems passed; [0, 0] is no bound, "
                f"pass@{r['k']} < {pct(r['floor_bound'])}% (95%, one-sided)")
    if r["lo"] <= 0:
        return "interval includes 0"
    return ""


def _words(items: list[str]) -> str:
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def _reading(r: pd.Series) -> str:
    """A paired row in words; the decision is the exact test's."""
    if r["differ"] == 0:
        return "the same on every problem"
    if r["p"] < ALPHA:
        return f"{'higher' if r['diff'] > 0 else 'lower'}, significant at 5%"
    if r["lo"] <= 0 <= r["hi"]:
        return "not significant at 5%; the interval includes 0"
    # the percentile bootstrap is too narrow when few problems differ; the sign-flip test is exact
    return f"not significant at 5% (only {int(r['differ'])} problems differ: the interval is too narrow to go by)"


def markdown(unc: Uncertainty) -> str:
    """The report's subsection: the intervals of every configuration (and of every run of
    a configuration with several seeds), the paired comparisons, and what they say."""
    from analysis.paper_numbers import TASK_TITLES

    iv = unc.intervals
    if iv.empty:
        return ""
    title = lambda t: TASK_TITLES.get(t, t)  # noqa: E731
    conf = iv[iv["level"] == "config"]
    if conf["lo"].isna().all():
        reasons = sorted(set(conf["note"]))
        return (f"**No pass@k of these runs has a confidence interval**, so no two configurations can be compared "
                f"by a test: {'; '.join(reasons)}. The pass@k above are point estimates only; at these sizes a few "
                "problems decide them. Evaluating the runs again (`bytelm eval`) logs the per-problem counts the "
                "intervals need. `passk_ci.csv` lists every run and configuration.\n")
    md = [f"pass@k (%) at each run's oracle temperature with a {LEVEL:.0%} percentile-bootstrap interval over "
          f"problems ({N_RESAMPLES:,} resamples of the problems with replacement, seed {SEED}; seeds of a "
          "configuration pooled per problem). The interval is the uncertainty from which problems the benchmark "
          "holds; it leaves out the spread over training seeds and the optimism of taking the best temperature. "
          "`passk_ci.csv` has every run and configuration; docs/evaluation.md explains the method.\n"]
    rows = [[r["label"], title(r["task"]), r["k"], cell(r["value"], r["lo"], r["hi"]),
             "–" if pd.isna(r["problems"]) else f"{int(r['problems'])} × {'?' if pd.isna(r['samples']) else int(r['samples'])}",
             len(r["runs"].split(", ")), _interval_note(r)] for _, r in conf.iterrows()]
    md.append(tabulate(rows, headers=["configuration", "task", "k", f"pass@k [{LEVEL:.0%} CI]", "problems × samples",
                                      "seeds", "note"], tablefmt="github", disable_numparse=True))
    floor = conf[conf["floor"]]
    if len(floor) == len(conf):
        md.append("\n**pass@k is at the floor everywhere:** no sample of any configuration passed a single problem. "
                  "These pass@k say nothing about differences between the configurations.")
    elif len(floor):
        md.append(f"\n**At the floor:** {len(floor)} of {len(conf)} configuration rows had no passing sample at all "
                  f"({', '.join(sorted({f'`{l}` {title(t)}' for l, t in zip(floor['label'], floor['task'])}))}).")
    missing = conf[conf["lo"].isna()]
    if len(missing):
        md.append(f"\n**Interval unavailable** for {len(missing)} of {len(conf)} configuration rows: the note says why "
                  "(a run evaluated before `bytelm eval` logged per-problem counts has none; evaluate it again to get "
                  "one).")
    multi = iv[(iv["level"] == "run") & iv["config_id"].isin(conf.loc[conf["runs"].str.contains(", "), "config_id"])]
    if multi["lo"].notna().any():
        md += ["\nEach seed alone:\n", tabulate(
            [[r["runs"], title(r["task"]), r["k"], cell(r["value"], r["lo"], r["hi"]), _interval_note(r)]
             for _, r in multi.iterrows()],
            headers=["run", "task", "k", f"pass@k [{LEVEL:.0%} CI]", "note"], tablefmt="github", disable_numparse=True)]
    pr = unc.paired
    if len(pr):
        md.append(f"\n**Paired comparisons** on the same problems (difference in points, {LEVEL:.0%} paired-bootstrap "
                  "interval; p: two-sided sign-flip test over problems, exact up to "
                  f"{EXACT_MAX} problems that differ, else {N_RESAMPLES:,} random sign patterns). Each configuration "
                  "is compared with the n = 1 configuration of its "
                  + _words([{"data": "data set", "vocab": "vocabulary"}.get(k, k.removeprefix("grid.")) for k in unc.context])
                  + ".\n")
        rows = []
        for _, r in pr.iterrows():
            if pd.isna(r["diff"]):
                rows.append([title(r["task"]), r["k"], r["label"], r["vs"], "–", "–", "–", r["note"]])
                continue
            rows.append([title(r["task"]), r["k"], r["label"], r["vs"],
                         f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]",
                         f"{r['p']:.3g}", f"{int(r['problems'])} ({int(r['differ'])} differ)", _reading(r)])
        md.append(tabulate(rows, headers=["task", "k", "configuration", "vs", "difference [95% CI]", "p", "problems",
                                          "reading"], tablefmt="github", disable_numparse=True))
        tested = pr.dropna(subset=["p"])
        n_sig = int((tested["p"] < ALPHA).sum())
        md.append("\nNo comparison could be tested: per-problem counts are missing." if tested.empty else
                  f"\n{n_sig} of {len(tested)} comparisons are significant at the 5% level"
                  + (" (not corrected for multiple comparisons: expect about 1 in 20 by chance)" if len(tested) > 1 else "")
                  + (f"; {len(pr) - len(tested)} could not be tested (per-problem counts missing)."
                     if len(tested) < len(pr) else "."))
    return "\n".join(md) + "\n"


def report_uncertainty(uri: str | None, runs: pd.DataFrame) -> Uncertainty | None:
    """For `bytelm report`: the runs' intervals and paired tests with their markdown, or
    None when no run reports pass@k. A report rebuilt from a runs.csv has no store and so
    no per-problem counts: every interval is then unavailable, and says so."""
    if not _reported(runs):
        return None
    if uri is None:
        counts = pd.DataFrame(columns=["run_id", "task", "temp", "task_id", "n", "c", "generated"])
        unreadable = {r: "no MLflow store (rebuilt from a runs.csv), and the per-problem counts are artifacts in it"
                      for r in runs["run_id"]}
    else:
        counts, unreadable = load_problem_counts(uri, list(runs["run_id"]))
    unc = uncertainty(runs, counts, unreadable)
    unc.markdown = markdown(unc)
    return unc


def write_uncertainty(by_study: dict[str, Uncertainty], out: Path) -> list[Path]:
    """out/passk_ci.csv and out/passk_paired.csv: every study's rows, with a `study` column."""
    from bytelm.fileio import write_text

    files = []
    for name, what in (("passk_ci.csv", "intervals"), ("passk_paired.csv", "paired")):
        frame = pd.concat([getattr(u, what).assign(study=s) for s, u in by_study.items()], ignore_index=True)
        write_text(out / name, frame[["study", *frame.columns.drop("study")]].to_csv(index=False))
        files.append(out / name)
    return files
