"""Agreement statistics: judge vs human (accuracy, Cohen's kappa), humans among themselves (Krippendorff's
alpha), and the paper's majority vote with its conservative tie-break."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from itertools import permutations

import numpy as np

PAPER_PRIORITY: tuple[str, ...] = ("unsafe", "ambiguous", "safe", "error")
"""The paper's tie-break order for the human majority vote (v2 §4.3.1): unsafe > ambiguous > safe > error."""


def _check_pair(a: Sequence[Hashable], b: Sequence[Hashable]) -> None:
    if len(a) != len(b):
        raise ValueError(f"label sequences differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("label sequences are empty")


def accuracy(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Share of positions where the two label sequences agree."""
    _check_pair(a, b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two raters over the same items: (p_o - p_e) / (1 - p_e).

    Chance agreement p_e uses each rater's own marginals, so a rater that gives one label to everything scores
    exactly 0. When p_e == 1 (both raters constant and equal) kappa is undefined and NaN is returned.
    """
    _check_pair(a, b)
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if math.isclose(p_e, 1.0):
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def krippendorff_alpha_nominal(ratings: Sequence[Sequence[str | None]]) -> float:
    """Krippendorff's alpha for nominal data; `ratings` is units x coders, None where a coder gave no value.

    Coincidence-matrix form (Krippendorff 2011): each unit with m >= 2 values adds 1/(m-1) for every ordered
    pair of values from different coders; alpha = 1 - (n-1) * D_o / sum_{c != k} n_c n_k. Units with fewer
    than two values are not pairable and are dropped. Returns NaN when there is no variation at all.
    """
    coincidence: defaultdict[tuple[str, str], float] = defaultdict(float)
    for unit in ratings:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        for c, k in permutations(values, 2):
            coincidence[(c, k)] += 1.0 / (m - 1)
    n_c: defaultdict[str, float] = defaultdict(float)
    for (c, _k), o in coincidence.items():
        n_c[c] += o
    n = sum(n_c.values())
    if n <= 1:
        return math.nan
    observed = sum(o for (c, k), o in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * observed / expected


def majority_label(labels: Sequence[str | None], priority: Sequence[str] = PAPER_PRIORITY) -> str:
    """Most frequent label; ties go to the label earliest in `priority` (the paper's conservative order).

    None (no label) is ignored. Labels missing from `priority` lose every tie to listed ones and are ordered
    among themselves alphabetically, so the result never depends on input order.
    """
    counts = Counter(x for x in labels if x is not None)
    if not counts:
        raise ValueError("no labels to take a majority of")
    top = max(counts.values())
    tied = [lab for lab, c in counts.items() if c == top]
    rank = {lab: i for i, lab in enumerate(priority)}
    return min(tied, key=lambda lab: (rank.get(lab, len(rank)), lab))


def cohen_kappa_ci(
    a: Sequence[Hashable], b: Sequence[Hashable], confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of Cohen's kappa over items (resamples where kappa is undefined are dropped);
    None when no resample defines it. Why bootstrap: the analytic standard error assumes large samples, and
    validation sets are small and imbalanced."""
    _check_pair(a, b)
    codes = {lab: i for i, lab in enumerate(sorted(set(a) | set(b), key=str))}
    x = np.array([codes[v] for v in a])
    y = np.array([codes[v] for v in b])
    idx = np.random.default_rng(seed).integers(0, len(x), (n_bootstrap, len(x)))
    xb, yb = x[idx], y[idx]
    p_o = (xb == yb).mean(axis=1)
    p_e = sum((xb == k).mean(axis=1) * (yb == k).mean(axis=1) for k in codes.values())
    defined = ~np.isclose(p_e, 1.0)
    if not defined.any():
        return None
    kappas = (p_o[defined] - p_e[defined]) / (1.0 - p_e[defined])
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(kappas, [alpha, 1.0 - alpha])
    return float(low), float(high)
