"""pass@k: the stable estimator against the exact combinatorial formula; aggregation; oracle."""

from fractions import Fraction
from math import comb

import pytest

from bytelm.evaluation.passk import benchmark_pass_at_k, oracle, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 100, 200, 1000])
def test_estimator_equals_the_combinatorial_formula(n):
    for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
        for c in sorted({0, 1, 2, n // 3, n // 2, n - k, n - k + 1, n - 1, n} & set(range(0, n + 1))):
            assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), abs=1e-12), (n, c, k)


def test_estimator_edges():
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 101, 100) == 1.0  # fewer than k failing samples: some draw always passes
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n = 1000, c = 1: the binomials have ~300 digits; the product form stays exact
    assert pass_at_k(1000, 1, 100) == pytest.approx(0.1, abs=1e-12)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_benchmark_mean_and_only_k_up_to_the_fewest_samples():
    counts = [(10, 0), (10, 5), (10, 10), (12, 1)]
    got = benchmark_pass_at_k(counts, ks=(1, 10, 100))
    assert set(got) == {1, 10}  # k = 100 > 10 samples: not reported
    assert got[1] == pytest.approx((0 + 0.5 + 1 + 1 / 12) / 4)
    assert got[10] == pytest.approx((0 + 1 + 1 + float(exact(12, 1, 10))) / 4)
    assert benchmark_pass_at_k([]) == {}


def test_oracle_takes_the_best_temperature_per_k():
    by_t = {0.8: {1: 0.20, 10: 0.50}, 0.1: {1: 0.30, 10: 0.40}, 0.4: {1: 0.30, 10: 0.45}}
    best = oracle(by_t)
    assert best == {1: {"pass_at_k": 0.30, "temperature": 0.1}, 10: {"pass_at_k": 0.50, "temperature": 0.8}}
