"""pass@k with its uncertainty (analysis/passk_ci.py): the bootstrap over problems and the
paired sign-flip test against simple references and cases whose answer is known exactly,
and `bytelm report` on a small MLflow store whose runs logged per-problem counts the way
`bytelm eval` does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from analysis import passk_ci
from analysis.passk_ci import bootstrap_ci, bootstrap_means, floor_bound, per_problem, sign_flip_p
from analysis.report import build_report
from bytelm.evaluation.passk import benchmark_pass_at_k
from bytelm.evaluation.runner import problems_path, problems_record
from bytelm.fileio import write_json
from bytelm.tracking import get_or_create_experiment, log_artifact_under


def binom_cdf(x: int, m: int, q: float) -> float:
    return sum(math.comb(m, i) * q**i * (1 - q) ** (m - i) for i in range(x + 1))


def binom_quantile(a: float, m: int, q: float) -> int:
    return next(x for x in range(m + 1) if binom_cdf(x, m, q) >= a)


def test_bootstrap_of_identical_problems_has_zero_width():
    rng = np.random.default_rng(1)
    for _ in range(5):
        v = float(rng.random())
        mean, lo, hi = bootstrap_ci(np.full(int(rng.integers(1, 300)), v))
        assert mean == pytest.approx(v) and lo == pytest.approx(v) and hi == pytest.approx(v)


def test_bootstrap_matches_one_resample_at_a_time():
    """The chunked draw is the plain loop: resample problems with replacement, take the mean."""
    rng = np.random.default_rng(2)
    values = rng.random(37)
    ref_rng = np.random.default_rng(5)
    ref = np.array([values[ref_rng.integers(0, len(values), size=len(values))].mean() for _ in range(2_345)])
    np.testing.assert_allclose(bootstrap_means(values, 2_345, seed=5), ref, rtol=0, atol=1e-12)


def test_bootstrap_of_solved_or_not_problems_follows_the_binomial():
    """With each problem solved (1) or not (0), a resample's mean is Binomial(P, q) / P
    exactly (q: the share solved), so the percentile interval's ends sit at that
    distribution's 2.5% and 97.5% quantiles, up to the resampling's noise."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        m = int(rng.integers(20, 200))
        solved = int(rng.integers(1, m))
        values = np.r_[np.ones(solved), np.zeros(m - solved)]
        rng.shuffle(values)
        mean, lo, hi = bootstrap_ci(values, seed=int(rng.integers(1 << 30)))
        q = solved / m
        assert mean == pytest.approx(q)
        assert binom_quantile(0.02, m, q) / m <= lo <= binom_quantile(0.03, m, q) / m
        assert binom_quantile(0.97, m, q) / m <= hi <= binom_quantile(0.98, m, q) / m


def test_same_seed_same_numbers():
    values = np.random.default_rng(4).random(50)
    assert bootstrap_ci(values) == bootstrap_ci(values)
    assert bootstrap_ci(values, seed=1) != bootstrap_ci(values, seed=2)
    d = np.random.default_rng(4).normal(size=40)
    assert sign_flip_p(d) == sign_flip_p(d)


def test_per_problem_pass_at_k_averages_to_the_benchmark_value():
    rng = np.random.default_rng(6)
    n = rng.integers(10, 30, size=25)
    c = rng.integers(0, n + 1)
    for k in (1, 5, 10):
        assert per_problem(n, c, k).mean() == pytest.approx(benchmark_pass_at_k(zip(n, c), [k])[k], abs=1e-12)


def test_sign_flip_p_on_constructed_cases():
    """A configuration that solves 5 problems the other never does, and ties on the rest:
    2 of the 2^5 sign patterns are as extreme, p = 0.0625, not significant at 5%; with 6
    such problems p = 2/64. Zero differences change nothing."""
    assert sign_flip_p(np.r_[np.ones(5), np.zeros(100)]) == pytest.approx(2 / 32)
    assert sign_flip_p(np.r_[np.ones(6), np.zeros(3)]) == pytest.approx(2 / 64)
    assert sign_flip_p(np.zeros(10)) == 1.0
    assert sign_flip_p(np.array([0.5, -0.5])) == 1.0


def test_sign_flip_p_is_the_exact_sign_test_on_plus_minus_one():
    """On differences of +1 and -1 the test is the two-sided exact sign test: both the
    enumeration (up to EXACT_MAX) and the Monte Carlo branch (beyond) against the binomial."""
    rng = np.random.default_rng(7)
    for m in (3, 9, 16, 40, 60):
        d = rng.choice((1.0, -1.0), size=m, p=(0.7, 0.3))
        x = int(max((d > 0).sum(), (d < 0).sum()))
        exact = min(1.0, 2 * (1 - binom_cdf(x - 1, m, 0.5)))
        p = sign_flip_p(d)
        if m <= passk_ci.EXACT_MAX:
            assert p == pytest.approx(exact, abs=1e-12)
        else:
            assert p == pytest.approx(exact, abs=0.01) and p > 0


def test_sign_flip_monte_carlo_agrees_with_enumeration(monkeypatch):
    rng = np.random.default_rng(8)
    for _ in range(3):
        d = rng.normal(0.1, 1, size=12)
        exact = sign_flip_p(d)
        monkeypatch.setattr(passk_ci, "EXACT_MAX", 0)
        assert sign_flip_p(d, n_resamples=20_000) == pytest.approx(exact, abs=0.015)
        monkeypatch.undo()


def test_comparisons_stay_within_a_model_size_and_not_within_a_recipe():
    """n = 1 is the baseline within each data set, vocabulary and model size; a recipe
    axis, whose values fix n, names configurations and is not a context."""
    from analysis.passk_ci import baselines, context_axes

    rows = [("100m", "n1", 1), ("100m", "equal", 8), ("100m", "seq2", 2), ("25m", "n1", 1), ("25m", "equal", 8)]
    runs = pd.DataFrame({"data": "python-env", "vocab": "bytes", "grid.size": [r[0] for r in rows],
                         "grid.recipe": [r[1] for r in rows], "n": [r[2] for r in rows],
                         "config_id": [f"{r[0]}-{r[1]}" for r in rows]})
    assert context_axes(runs) == ["data", "vocab", "grid.size"]
    assert sorted(baselines(runs)) == [("100m-equal", "100m-n1"), ("100m-seq2", "100m-n1"), ("25m-equal", "25m-n1")]
    # without n = 1, the smallest n is the baseline (and a size is no longer a context: no size has n = 1)
    assert sorted(baselines(runs[runs["n"] > 1])) == [("100m-equal", "100m-seq2"), ("25m-equal", "100m-seq2")]


def test_floor_bound():
    """No pass in S samples: the one-sided bound u has (1 - u)^S = 0.05; k samples at most k u."""
    u = floor_bound(200 * 164, 1)
    assert (1 - u) ** (200 * 164) == pytest.approx(0.05)
    assert floor_bound(200 * 164, 10) == pytest.approx(10 * u) and floor_bound(3, 100) == 1.0


# ----------------------------------------------------------------------------- the report

P = 20  # HumanEval problems evaluated
N = 10  # samples per problem and temperature
TEMPS = (0.2, 0.8)


def counts_of(name: str, rng: np.random.Generator) -> dict[float, np.ndarray]:
    """Passes per problem at each temperature. n8: every problem n1 solves, and problems
    0-5 on top (which n1 never solves): a difference on exactly 6 problems."""
    base = np.where(rng.random(P) < 0.4, rng.integers(0, N + 1, size=P), 0)
    base[:6] = 0
    if name.startswith("bytes-n8"):
        base[:6] = 3
    return {t: (base if t == 0.8 else base // 2) for t in TEMPS}


def log_runs(client: MlflowClient, experiment: str, root) -> dict[str, dict[float, np.ndarray]]:
    exp = get_or_create_experiment(client, experiment)
    rng = np.random.default_rng(9)
    shared = counts_of("bytes-n1", rng)
    logged = {}
    for name, n, seed in (("bytes-n1-s0", 1, 0), ("bytes-n1-s1", 1, 1), ("bytes-n8-s0", 8, 0), ("bytes-n8-s1", 8, 1),
                          ("bpe-n1-s0", 1, 0), ("bytes-n16-s0", 16, 0)):
        run_id = client.create_run(exp, run_name=name, tags={"study": "ablation"}).info.run_id
        vocab = name.split("-")[0]
        params = {"data.root": "data/python-env", "data.tokenizer": vocab, "model.n_future": str(n), "train.seed": str(seed)}
        c = {t: v.copy() for t, v in shared.items()}
        if n == 8:
            c = {t: np.where(np.arange(P) < 6, 3 if t == 0.8 else 1, v) for t, v in c.items()}
        if n == 16:  # nothing passes: pass@k at the floor
            c = {t: np.zeros(P, dtype=int) for t in TEMPS}
        if seed == 1:  # the second seed solves problem 19 once more
            c = {t: np.where(np.arange(P) == 19, np.minimum(v + 1, N), v) for t, v in c.items()}
        metrics = [Metric("val/bpb", 1.0 + n / 100, 0, 100), Metric("eval/n_samples", N, 0, 100),
                   Metric("eval/humaneval/problems", P, 0, 100), Metric("eval/humaneval/problems_in_task", 164, 0, 100)]
        run_dir = root / name
        by_t = {t: benchmark_pass_at_k([(N, int(x)) for x in c[t]], [1, 10]) for t in TEMPS}
        for k in (1, 10):
            best_t = max(TEMPS, key=lambda t: (by_t[t][k], -t))
            metrics += [Metric(f"pass_at_{k}/humaneval/best", by_t[best_t][k], 0, 100),
                        Metric(f"pass_at_{k}/humaneval/best_t", best_t, 0, 100)]
            metrics += [Metric(f"pass_at_{k}/humaneval/t{t:g}", by_t[t][k], 0, 100) for t in TEMPS]
        if vocab == "bytes":  # the BPE run was evaluated before per-problem counts were logged
            for t in TEMPS:
                records = [{"task_id": f"HumanEval/{i}", "passed": j < c[t][i]} for i in range(P) for j in range(N)]
                path = problems_path(run_dir, "humaneval", t)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, problems_record("humaneval", t, records, 100, 164, {f"HumanEval/{i}" for i in range(P)}))
                log_artifact_under(client, run_id, path, run_dir)
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, "FINISHED")
        logged[name] = c
    return logged


def test_report_gives_intervals_paired_tests_and_says_what_is_missing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    counts = log_runs(MlflowClient(uri), "ci", tmp_path / "runs")
    report, files, _ = build_report("ci", uri, tmp_path / "out")
    text = report.read_text()
    ci = pd.read_csv(tmp_path / "out" / "passk_ci.csv")
    assert {tmp_path / "out" / "passk_ci.csv", tmp_path / "out" / "passk_paired.csv"} <= set(files)

    # the n = 8 configuration: its two seeds pooled per problem, at each seed's best temperature (0.8)
    pooled = np.mean([per_problem(np.full(P, N), counts[f"bytes-n8-s{s}"][0.8], 1) for s in (0, 1)], axis=0)
    mean, lo, hi = bootstrap_ci(pooled)
    row = ci[(ci["level"] == "config") & (ci["label"] == "bytes-n8") & (ci["k"] == 1)].iloc[0]
    assert (row["value"], row["lo"], row["hi"]) == pytest.approx((mean, lo, hi), abs=1e-12)
    assert row["problems"] == P and row["samples"] == N and row["runs"] == "bytes-n8-s0, bytes-n8-s1"
    one = ci[(ci["level"] == "run") & (ci["runs"] == "bytes-n8-s1") & (ci["k"] == 1)].iloc[0]
    assert (one["lo"], one["hi"]) == pytest.approx(bootstrap_ci(per_problem(np.full(P, N), counts["bytes-n8-s1"][0.8], 1))[1:])

    # Table 1's cells carry the interval; the BPE run's has none, and the caption says how many lack one
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    b8 = table[(table["vocab"] == "bytes") & (table["n"] == 8)].iloc[0]
    assert (b8["pass_at_1/humaneval/best:lo"], b8["pass_at_1/humaneval/best:hi"]) == pytest.approx((lo, hi))
    assert pd.isna(table[table["vocab"] == "bpe"]["pass_at_1/humaneval/best:lo"]).all()
    assert f"{100 * mean:.1f} ± " in text and f"[{100 * lo:.1f}, {100 * hi:.1f}]" in text
    assert "2 of 8 pass@k cells have none" in text
    # n = 16 solved nothing: its cells say so rather than show [0.0, 0.0]
    rows = {line.split("|")[3].strip(): line for line in (tmp_path / "out" / "table1.md").read_text().splitlines()
            if line.startswith("| python-env")}
    assert rows["16"].count("0.0 (none passed)") == 2 and "[0.0, 0.0]" not in text.split("### pass@k with")[0]
    assert "at the floor, not one sample of any problem passed (2 cells)" in text
    beside = text.split("### Beside the paper's Table 1")[1].split("###")[0]  # ours next to the paper's n = 8 bytes row
    assert f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] / " in beside and "21.8 / 34.1 / 57.9" in beside
    assert "20 of 164 problems, 10 samples" in beside

    # the paired test: n = 8 against n = 1 differs on exactly problems 0-5, all in its favour: p = 2/64
    paired = pd.read_csv(tmp_path / "out" / "passk_paired.csv")
    p8 = paired[(paired["label"] == "bytes-n8") & (paired["k"] == 1)].iloc[0]
    assert p8["vs"] == "bytes-n1" and p8["p"] == pytest.approx(2 / 64) and p8["problems"] == P
    assert p8["diff"] == pytest.approx(6 * 0.3 / P)
    section = text.split("### pass@k with confidence intervals")[1]
    assert "higher, significant at 5%" in section and "| 0.0312 | 20 (6 differ) |" in section
    # n = 16 solved nothing: at the floor, said plainly, with the one-sided bound instead of [0, 0]
    assert "at the floor: no sample of 20 problems passed" in section
    assert f"pass@1 < {100 * floor_bound(N * P, 1):.1f}%" in section
    p16 = paired[(paired["label"] == "bytes-n16") & (paired["k"] == 1)].iloc[0]
    assert p16["diff"] < 0 and p16["hi"] <= 0
    # the BPE run: no per-problem counts; its row says so, and so does its comparison row (none: no BPE n > 1)
    assert "interval unavailable: no per-problem counts logged" in section
    assert "Interval unavailable** for 2 of 8 configuration rows" in section
    assert (tmp_path / "out" / "passk_vs_k.png").read_bytes()[:4] == b"\x89PNG"

    # the same runs give the same numbers; a report rebuilt from the runs.csv has no store: no interval, said so
    build_report("ci", uri, tmp_path / "again")
    assert (tmp_path / "again" / "passk_ci.csv").read_text() == (tmp_path / "out" / "passk_ci.csv").read_text()
    r = subprocess.run([sys.executable, "-m", "bytelm", "report", "--runs-csv", str(tmp_path / "out" / "runs.csv"),
                        "--out", str(tmp_path / "csv")], capture_output=True, text=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/dir/mlflow.db"})
    assert r.returncode == 0, r.stderr
    rebuilt = (tmp_path / "csv" / "report.md").read_text()
    assert "No pass@k of these runs has a confidence interval" in rebuilt and "no MLflow store" in rebuilt
    assert "read them as point estimates only" in rebuilt


def test_a_bad_counts_file_leaves_that_run_without_an_interval(tmp_path):
    """A per-problem file whose counts do not give the logged pass@k (evaluated again since)
    is not used: the interval is unavailable and the report says why."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "bad")
    run_id = client.create_run(exp, run_name="bytes-n1-s0", tags={"study": "ablation"}).info.run_id
    run_dir = tmp_path / "run"
    path = problems_path(run_dir, "humaneval", 0.8)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"task": "humaneval", "temperature": 0.8, "task_ids": ["HumanEval/0", "HumanEval/1"],
                                "n": [4, 4], "c": [4, 0], "step": 1, "n_problems_in_task": 164}))
    log_artifact_under(client, run_id, path, run_dir)
    client.log_batch(run_id, metrics=[Metric("pass_at_1/humaneval/best", 0.25, 0, 1),
                                      Metric("pass_at_1/humaneval/best_t", 0.8, 0, 1)],
                     params=[Param("data.tokenizer", "bytes"), Param("model.n_future", "1")])
    client.set_terminated(run_id, "FINISHED")
    report, _, _ = build_report("bad", uri, tmp_path / "out")
    assert "its per-problem counts give 0.5000, not the logged 0.2500" in report.read_text()
