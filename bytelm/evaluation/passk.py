"""pass@k: the unbiased estimator of Chen et al. (2021), per temperature and at the oracle
temperature (the paper's Table 1 reports, for each k, the best temperature of a grid;
Table S12 lists which).

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance
that k samples drawn without replacement from the n include a passing one. The benchmark's
pass@k is the mean over problems.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) as the product prod_{i=n-c+1..n} (1 - k/i): no huge
    binomials, no overflow, exact to float rounding."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def benchmark_pass_at_k(counts: Iterable[tuple[int, int]], ks: Iterable[int] = KS) -> dict[int, float]:
    """Mean pass@k over problems, from (n, c) per problem, for each k that every problem
    has enough samples for (k <= min n)."""
    counts = list(counts)
    if not counts:
        return {}
    n_min = min(n for n, _ in counts)
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) for k in ks if k <= n_min}


def oracle(by_temperature: Mapping[float, Mapping[int, float]]) -> dict[int, dict[str, float]]:
    """For each k, the best pass@k over temperatures and that temperature (the lowest on a
    tie): {k: {"pass_at_k": value, "temperature": t}}."""
    best: dict[int, dict[str, float]] = {}
    for t in sorted(by_temperature):
        for k, v in by_temperature[t].items():
            if k not in best or v > best[k]["pass_at_k"]:
                best[k] = {"pass_at_k": v, "temperature": t}
    return dict(sorted(best.items()))
