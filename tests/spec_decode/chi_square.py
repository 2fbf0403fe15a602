"""Chi-square tests without scipy: statistic and survival function for an even number of
degrees of freedom (closed form: sf(x; 2m) = exp(-x/2) * sum_{i<m} (x/2)^i / i!)."""

from __future__ import annotations

import math


def sf_even(x: float, df: int) -> float:
    assert df % 2 == 0 and df > 0
    half = x / 2
    term, total = 1.0, 0.0
    for i in range(df // 2):
        if i:
            term *= half / i
        total += term
    return math.exp(-half) * total


def goodness_of_fit(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """(statistic, df) of observed counts against expected probabilities; categories whose
    expected count is under 5 are pooled into one (the test's usual validity rule)."""
    n = sum(counts)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for c, p in zip(counts, probs):
        if n * p < 5:
            pool_o, pool_e = pool_o + c, pool_e + n * p
        else:
            observed.append(c)
            expected.append(n * p)
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    return stat, len(observed) - 1


def homogeneity(a: list[int], b: list[int]) -> tuple[float, int]:
    """(statistic, df) of two samples' counts over the same categories (pooled under 5)."""
    na, nb = sum(a), sum(b)
    rows = [(x, y) for x, y in zip(a, b)]
    big = [(x, y) for x, y in rows if (x + y) * min(na, nb) / (na + nb) >= 5]
    small = [(x, y) for x, y in rows if (x + y) * min(na, nb) / (na + nb) < 5]
    if small:
        big.append((sum(x for x, _ in small), sum(y for _, y in small)))
    stat = 0.0
    for x, y in big:
        total = x + y
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    return stat, len(big) - 1


def p_value(stat: float, df: int) -> float:
    """Survival at df, or at df + 1 when df is odd (a larger df: a conservative p-value)."""
    return sf_even(stat, df if df % 2 == 0 else df + 1)
